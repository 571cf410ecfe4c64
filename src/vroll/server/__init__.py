"""``vroll serve``: D vLLM replicas of T workers each, behind one HTTP API.

- ``config``: ``ServeConfig``, the server's flags.
- ``replica``: the body of one replica process (an engine and its job loop).
- ``pool``: starts the replica processes on their device slices and dispatches jobs.
- ``app``: the FastAPI routes.
- ``main``: ties them together and handles signals.
"""
