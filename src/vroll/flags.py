"""Flags: typed config dataclasses <-> command-line flags and YAML, with one set of rules.

Every config in vroll is a dataclass whose fields carry a one-line docstring in
``metadata["help"]`` (see :func:`field`). This module turns such a dataclass into an
``argparse`` parser that accepts both ``--dash-case`` and ``--snake_case`` spellings
(users come from ``trl vllm-serve``, which uses underscores), merges a YAML file given
with ``--config`` under the command-line flags, and leaves validation to each
dataclass's ``__post_init__`` so a bad value fails with a ``ValueError`` naming it.

A component's config is written once and nested where it is used (:class:`Nested`): its
fields become fields of the owner, flat and prefixed (``vllm_gpu_memory_utilization`` in
the trainers, TRL's spelling), and ``owner.vllm`` is the component's config they make.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a one-line help text shown by ``--help``."""
    metadata = {"help": help, **kwargs.pop("metadata", {})}
    if "default_factory" in kwargs:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def parse_bool(value: str | bool) -> bool:
    """Parse ``true/false/yes/no/1/0`` the way users of HF-style CLIs type them."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _one_or_many(tp: Any) -> Any:
    """``list[X]`` for a field typed ``X | list[X]`` (or ``X | list[X] | None``), else ``tp``.

    Such a field takes one value or several (``--vllm_server_base_url a b``); on the command
    line it is parsed as the list, and the config normalizes a list of one to its value.
    """
    if get_origin(tp) not in (Union, types.UnionType):
        return tp
    args = [a for a in get_args(tp) if a is not type(None)]
    if len(args) == 2 and get_origin(args[1]) is list and get_args(args[1]) == (args[0],):
        return args[1] | None if type(None) in get_args(tp) else args[1]
    return tp


def _converter(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse ``type=`` and extra kwargs (nargs, choices) for a field type."""
    base, optional = _unwrap_optional(_one_or_many(tp))
    origin = get_origin(base)
    extra: dict[str, Any] = {}
    if base is bool:
        extra["nargs"] = "?"
        extra["const"] = True
        return parse_bool, extra
    if origin is Literal:
        choices = list(get_args(base))
        extra["choices"] = choices
        return type(choices[0]), extra
    if origin in (list, tuple) or base in (list, tuple):
        inner = get_args(base)[0] if get_args(base) else str
        inner_conv, _ = _converter(inner)
        extra["nargs"] = "*" if optional else "+"
        return inner_conv, extra
    if base in (int, float, str):
        return base, extra
    if base is Path:
        return Path, extra
    return str, extra


def _flag_names(name: str) -> list[str]:
    dash = "--" + name.replace("_", "-")
    snake = "--" + name
    return [dash] if dash == snake else [dash, snake]


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls`` (both spellings); defaults stay unset (None).

    Defaults are left to the dataclass so that a YAML ``--config`` can sit between
    the dataclass defaults and the command line.
    """
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        conv, extra = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        group.add_argument(
            *_flag_names(f.name),
            dest=f.name,
            type=conv,
            default=argparse.SUPPRESS,
            help=f"{help_text} (default: {default!r})",
            **extra,
        )


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields; dashes in keys are accepted too."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], values: dict[str, Any]) -> T:
    """Instantiate ``cls`` from a mapping, rejecting unknown keys with a clear error."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s): {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(names))}"
        )
    return cls(**values)


def from_namespace(cls: type[T], ns: argparse.Namespace, yaml_values: dict[str, Any]) -> T:
    """Merge dataclass defaults < YAML < command line into one ``cls`` instance."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {k: v for k, v in yaml_values.items() if k in names}
    values.update({k: v for k, v in vars(ns).items() if k in names})
    return build(cls, values)


def parse_config(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse ``argv`` (flags and an optional ``--config file.yaml``) into ``cls``."""
    # allow_abbrev=False: a typo or a prefix (--vllm_gpu 0.7) is an error, never silently another flag
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--config", type=Path, default=None, help="YAML file of config fields")
    add_dataclass_arguments(parser, cls)
    ns, unknown_flags = parser.parse_known_args(argv)
    if unknown_flags:
        parser.error(_unknown_flags_message(parser, unknown_flags))
    yaml_values = load_yaml(ns.config) if ns.config else {}
    unknown = sorted(set(yaml_values) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        parser.error(f"{ns.config}: unknown field(s) {', '.join(unknown)}")
    try:
        return from_namespace(cls, ns, yaml_values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def _unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """``unrecognized arguments: ...``, with the closest known flag for each unknown one."""
    import difflib

    known = [s for a in parser._actions for s in a.option_strings]  # noqa: SLF001 (argparse has no public list)
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
        if close:
            hints.append(f"{flag}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-friendly dict of a config dataclass (paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


class FieldError(ValueError):
    """A config field's bad value. Read alone it names the field as ``vroll serve`` spells flags
    (``--gpu-memory-utilization must be ...``); a :class:`Nested` owner names it its own way."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{dash_flag(name)} {reason}")
        self.name = name
        self.reason = reason


def dash_flag(name: str) -> str:
    """``gpu_memory_utilization`` -> ``--gpu-memory-utilization``."""
    return "--" + name.replace("_", "-")


def check_field(condition: bool, name: str, reason: str) -> None:
    """Raise :class:`FieldError` for field ``name`` unless ``condition``."""
    if not condition:
        raise FieldError(name, reason)


class Nested:
    """A component's config nested in an owner config, its fields flat and prefixed.

    In the owner's class body (before ``@dataclass`` runs)::

        vllm = Nested(EngineConfig, "vllm_", defaults={"gpu_memory_utilization": 0.3})

    adds one dataclass field per field of ``EngineConfig``: ``vllm_gpu_memory_utilization`` (same type
    and help, ``defaults`` and ``help`` override them per owner; ``exclude`` leaves fields out). They
    are ordinary fields: ``Owner(vllm_gpu_memory_utilization=0.7)``, ``--vllm_gpu_memory_utilization``,
    YAML and ``owner.vllm_gpu_memory_utilization`` all work, and ``asdict`` stays flat. ``owner.vllm``
    is the ``EngineConfig`` they make (validated; errors name the owner's flag, see :meth:`flag`).
    """

    def __init__(self, cls: type, prefix: str, *, defaults: dict[str, Any] | None = None,
                 help: dict[str, str] | None = None, exclude: tuple[str, ...] = (),  # noqa: A002
                 dash: bool = False) -> None:
        self.cls, self.prefix, self.exclude, self.dash = cls, prefix, exclude, dash
        self.defaults, self.help = defaults or {}, help or {}
        self.names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
        unknown = (set(self.defaults) | set(self.help) | set(exclude)) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Nested({cls.__name__}): no field(s) {sorted(unknown)}")

    def __set_name__(self, owner: type, name: str) -> None:
        hints = typing.get_type_hints(self.cls)
        annotations = owner.__dict__.get("__annotations__")
        if annotations is None:
            annotations = {}
            owner.__annotations__ = annotations
        for f in dataclasses.fields(self.cls):
            if f.name not in self.names:
                continue
            flat = self.prefix + f.name
            metadata = {**f.metadata, "help": self.help.get(f.name, f.metadata.get("help", ""))}
            default = self.defaults.get(f.name, f.default)
            annotations[flat] = hints[f.name]
            setattr(owner, flat, dataclasses.field(default=default, metadata=metadata))

    def __get__(self, owner: Any, owner_type: type | None = None) -> Any:
        if owner is None:
            return self
        try:
            return self.cls(**{name: getattr(owner, self.prefix + name) for name in self.names})
        except FieldError as exc:
            raise ValueError(f"{self.flag(exc.name)} {exc.reason}") from None

    def flag(self, name: str) -> str:
        """How the owner spells field ``name`` in its errors: ``--max-model-len`` or ``vllm_max_model_len``."""
        return dash_flag(self.prefix + name) if self.dash else self.prefix + name


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: the one validation idiom."""
    if not condition:
        raise ValueError(message)
