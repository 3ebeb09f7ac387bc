"""Typed settings: a dataclass checked when it is built, and the command-line flags made from it.

A settings class derives from `Options` and documents each field with a one-line docstring
under it. `add_flags` turns the class into argparse flags (type, default, choices and help
from the annotations and docstrings); `Options.__post_init__` checks every field's type and
choices and then calls `validate()`, so a bad value is refused when the object is built,
from the command line or from Python, before anything loads.

    @dataclass
    class MergeOptions(Options):
        model: str = option(aliases=("--base",))
        '''base model directory (safetensors)'''
        dtype: Literal["bf16", "fp16", "fp32"] | None = None
        '''cast the merged weights; default: keep the base's dtype'''

Flags are spelled with underscores (`--output_dir`), as DeepSpeed and transformers spell
theirs; a flag that means the same in two commands is spelled the same in both. The dash
spelling (`--output-dir`) and any `aliases` (old spellings) are accepted but not shown. A bool
field that defaults to False is a switch (`--merged`); one that defaults to True or None also
gets its opposite (`--checkpointing` / `--no_checkpointing`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, NoReturn

from lora_dist.errors import ConfigError

_NO_DEFAULT = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    positional: bool = False,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A dataclass field with command-line extras; a field without a default is required.

    `minimum` (inclusive), `above` and `below` (exclusive) bound a number; they are checked
    when the settings are built, like the type and the choices.
    """
    meta = {"positional": positional, "aliases": tuple(aliases), "metavar": metavar}
    meta |= {"minimum": minimum, "above": above, "below": below}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it}, for a class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _kind(hint: Any) -> tuple[type, tuple[Any, ...] | None, bool]:
    """(scalar type, choices or None, is_list) of a field annotation."""
    hint, _ = _unwrap_optional(hint)
    is_list = typing.get_origin(hint) is list
    if is_list:
        (hint,) = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, is_list
    if hint in (str, int, float, bool, Path):
        return hint, None, is_list
    raise TypeError(f"unsupported option type {hint!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


class Options:
    """Base of every command's settings: typed, documented, validated on construction."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            hint, optional = _unwrap_optional(hints[f.name])
            if value is None:
                if not optional:
                    raise ConfigError(f"--{f.name} is required")
                continue
            kind, choices, is_list = _kind(hint)
            values = value if is_list else [value]
            if is_list and not isinstance(value, list):
                raise ConfigError(f"--{f.name} must be a list, got {value!r}")
            for v in values:
                if kind is float and isinstance(v, int) and not isinstance(v, bool):
                    continue
                if kind is Path and isinstance(v, str):
                    continue
                if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                    raise ConfigError(f"--{f.name} must be {kind.__name__}, got {v!r}")
                if choices is not None and v not in choices:
                    shown = ", ".join(str(c) for c in choices)
                    raise ConfigError(f"--{f.name} {v!r} is not one of: {shown}")
                _check_bounds(f, v)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; raise ConfigError with what to change."""


def _check_bounds(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    low, above, below = meta.get("minimum"), meta.get("above"), meta.get("below")
    if low is not None and value < low:
        raise ConfigError(f"--{f.name} must be at least {low:g}, got {value!r}")
    if above is not None and not value > above:
        raise ConfigError(f"--{f.name} must be greater than {above:g}, got {value!r}")
    if below is not None and not value < below:
        raise ConfigError(f"--{f.name} must be less than {below:g}, got {value!r}")


def existing_file(flag: str, path: str | Path | None) -> None:
    """Refuse a path that is not an existing file (None passes)."""
    if path is not None and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"{flag} {path} {what}; pass an existing file")


def existing_dir(flag: str, path: str | Path | None) -> None:
    """Refuse a path that is not an existing directory (None passes)."""
    if path is not None and not Path(path).is_dir():
        what = "is a file" if Path(path).exists() else "does not exist"
        raise ConfigError(f"{flag} {path} {what}; pass an existing directory")


def output_dir(flag: str, path: str | Path) -> None:
    """Refuse an output directory that is, or lies under, something other than a directory."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            if candidate.is_dir():
                return
            where = "is a file" if candidate == Path(path) else f"lies under the file {candidate}"
            raise ConfigError(f"{flag} {path} {where}; choose a directory path")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def add_flags(parser: argparse.ArgumentParser, cls: type[Options]) -> None:
    """One argparse argument per field of `cls`, with type, default, choices and help."""
    docs = attribute_docs(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in docs:
            raise TypeError(f"{cls.__name__}.{f.name} has no docstring; every flag needs help")
        meta = f.metadata
        kind, choices, is_list = _kind(hints[f.name])
        required = f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT
        default = (
            None
            if required
            else (
                f.default if f.default is not _NO_DEFAULT else f.default_factory()  # type: ignore[misc]
            )
        )
        help_text = docs[f.name]
        if required and not meta.get("positional"):
            help_text += " (required)"  # checked when the settings are built: aliases count
        elif default not in (None, False, []):
            help_text += f" [default: {default}]"
        kwargs: dict[str, Any] = {"help": help_text}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if choices is not None:
            kwargs["choices"] = choices
        two_way = kind is bool and not is_list and default is not False
        if kind is bool and not is_list:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        else:
            kwargs["type"] = _parse_bool if kind is bool else kind
            if is_list:
                kwargs["nargs"] = "+" if meta.get("positional") else None
                kwargs["action"] = None if meta.get("positional") else "append"
                kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if meta.get("positional"):
            if not required:
                kwargs["nargs"] = "?"
                kwargs["default"] = default
            parser.add_argument(f.name, **kwargs)
            continue
        flag = f"--{f.name}"
        parser.add_argument(flag, dest=f.name, default=None if is_list else default, **kwargs)
        spellings = [flag, *meta.get("aliases", ())]
        hidden = [s for s in _dashed(spellings) if s != flag]
        if hidden:
            alias_kwargs = {**kwargs, "help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
            parser.add_argument(*hidden, dest=f.name, **alias_kwargs)
        if two_way:
            off = {"dest": f.name, "action": "store_const", "const": False}
            shown = f"--no_{f.name}"
            parser.add_argument(shown, help=f"the opposite of {flag}", **off)
            negatives = _dashed([f"--no_{s[2:]}" for s in spellings if s.startswith("--")])
            negatives = [s for s in negatives if s != shown]
            parser.add_argument(
                *negatives, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **off
            )


def _dashed(spellings: list[str]) -> list[str]:
    """Each spelling and, for long flags, its dash form (`--output-dir`), without repeats."""
    out: list[str] = []
    for spelling in spellings:
        out.append(spelling)
        if spelling.startswith("--"):
            out.append("--" + spelling[2:].replace("_", "-"))
    return list(dict.fromkeys(out))


def from_args(cls: type[Options], args: argparse.Namespace) -> Any:
    """Build (and so validate) `cls` from parsed flags."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name, None)
        if value is None and f.default_factory is not _NO_DEFAULT:
            value = f.default_factory()  # type: ignore[misc]
        values[f.name] = value
    return cls(**values)
