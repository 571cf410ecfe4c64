"""Built-in verifiable tasks (datasets + reward functions) for demos and tests."""
