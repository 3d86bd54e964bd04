"""Typed configs become command-line options and config files, so a flag and its help never drift apart.

A config is a dataclass whose fields carry a docstring (a string literal right after the field, as in
``saekit/sae/base.py``). :func:`add_dataclass_args` turns every field into ``--field-name`` with that
docstring as its help; :func:`dataclass_from_args` builds the dataclass back from the parsed options.
Config files (JSON or YAML) hold the same field names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields, gathered from the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _converter(tp: Any):
    """The argparse ``type`` and ``choices`` for one field type."""
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return type(choices[0]), choices, optional
    if tp is bool:
        return _parse_bool, None, optional
    if tp in (int, float, str):
        return tp, None, optional
    if typing.get_origin(tp) in (list, tuple):
        return None, None, optional  # handled as nargs
    return str, None, optional


def option_name(field_name: str, prefix: str = "") -> str:
    return "--" + (prefix + field_name).replace("_", "-")


def add_dataclass_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    skip: set[str] | frozenset[str] = frozenset(),
    required: set[str] | frozenset[str] = frozenset(),
    aliases: dict[str, str] | None = None,
) -> None:
    """Add one ``--option`` per dataclass field. Defaults are left as ``None`` so that values given in a
    config file can be told apart from values given on the command line. ``aliases`` maps extra option
    names to field names (e.g. ``{"l1": "l1_coeff"}``)."""
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        conv, choices, _ = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        if default is not None:
            help_text += f" (default: {default})"
        kwargs: dict[str, Any] = {"dest": prefix + f.name, "default": None, "help": help_text}
        if conv is None:  # a list: the option may be repeated (--hook a --hook b)
            inner = typing.get_args(_unwrap_optional(hints[f.name])[0])
            kwargs.update(action="append", type=inner[0] if inner else str)
        elif conv is _parse_bool:  # `--flag` alone means true; `--flag false` is accepted too
            kwargs.update(type=conv, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = conv
            if choices:
                kwargs["choices"] = choices
        if f.name in required:
            kwargs["required"] = True
        names = [option_name(f.name, prefix)]
        names += [f"--{a}" for a, target in (aliases or {}).items() if target == f.name]
        parser.add_argument(*names, **kwargs)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def reject_unknown_keys(
    cls: type, data: Mapping[str, Any], *, what: str | None = None, noun: str = "keys"
) -> None:
    """Raise ValueError naming every key of ``data`` that is not a field of dataclass ``cls`` (and the
    known ones): a typo in a config file or a saved record must not be silently dropped."""
    known = _field_names(cls)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown {noun} for {what or cls.__name__}: {unknown}; known {noun}: {sorted(known)}"
        )


def strict_from_dict(cls: type[T], data: Mapping[str, Any], *, what: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data`` and run its ``validate()`` if it has one.

    Unknown keys and missing required keys are errors that name them (``what`` names the record in the
    messages, default the class name); missing optional keys take their defaults. This is how every saved
    record and config is read back, so old files with fewer keys still load and typos never pass.
    """
    name = what or cls.__name__
    reject_unknown_keys(cls, data, what=name)
    required = {
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{name} is missing required keys: {missing}")
    obj = cls(**data)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def dataclass_from_args(
    cls: type[T],
    args: argparse.Namespace,
    *,
    prefix: str = "",
    base: dict[str, Any] | None = None,
    **fixed: Any,
) -> T:
    """Build ``cls`` from (in increasing priority) its defaults, ``base`` (e.g. a config file),
    options given on the command line, and ``fixed`` values. Unknown keys in ``base`` and required fields
    left unset are errors naming them."""
    values = dict(base or {})
    reject_unknown_keys(cls, values, noun="settings")
    for name in _field_names(cls):
        given = getattr(args, prefix + name, None)
        if given is not None:
            values[name] = given
    values.update(fixed)
    return strict_from_dict(cls, values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (sections are plain nested dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def save_config_file(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2) + "\n")
