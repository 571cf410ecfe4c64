"""User code named on the command line: ``package.module:attribute``.

Reward functions, environment factories and tools are all given this way
(``--reward_funcs my.rewards:judge``, ``--environment my.envs:Guess``, ``--tools my.tools:add``);
one loader, in the bottom layer, so each of those rooms can use it without importing another.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def import_callable(spec: str, kind: str = "reward function") -> Callable[..., Any]:
    """Load ``package.module:function`` (the attribute part may be dotted, e.g. ``Cls.method``).

    ``kind`` names what is loaded in the errors (a reward function, an environment factory).
    """
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{kind} {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"{kind} {spec!r}: {module_name!r} has no {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"{kind} {spec!r} is not callable ({type(obj).__name__})")
    return obj
