"""Argparse flags built from a dataclass's fields and the docstrings under them.

Owns :func:`field_docs` (the string literal under each field, read with :mod:`ast` and made
plain for ``--help``), :func:`add_dataclass_flags` (one typed ``--field-name`` per field, its
help = that docstring + the dataclass default) and :func:`dataclass_kwargs` (the fields the user
gave, for ``cls(**kw)`` / :func:`dataclasses.replace`). Flags default to ``argparse.SUPPRESS``,
so an omitted flag is absent from the namespace and the dataclass stays the one source of
defaults; a CLI never repeats a default or a help text by hand.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import re
import textwrap
import types
import typing
from typing import Any, Callable, Iterable, Literal, Mapping

_ROLE = re.compile(r":([\w.-]+(?::[\w.-]+)*):`([^`]+)`")  # :class:`X`, :py:func:`a.b`
_CODE = re.compile(r"``(.+?)``")
_UNIONS = (typing.Union, types.UnionType)
_SCALARS = (bool, int, float, str)


def _plain(text: str) -> str:
    def role(m: re.Match) -> str:
        kind, target = m.group(1), m.group(2).strip()
        if target.endswith(">") and "<" in target:  # :role:`title <target>`
            return target[: target.index("<")].strip()
        target = target.lstrip("~")
        # a module's last part alone ("models") says less than its full name
        return target if kind.endswith("mod") else target.rsplit(".", 1)[-1]

    return _CODE.sub(r"\1", _ROLE.sub(role, " ".join(text.split())))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its docstring on one line, Sphinx roles and ````code```` made plain text.
    Fields inherited from dataclass bases keep their base's docstring unless redocumented."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (REPL, make_dataclass): flags just lack help
            continue
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = _plain(nxt.value.value)
    return docs


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse's "invalid NAME value" message reads it
    return fn


def _scalars(kinds: list[type]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (k for k in (int, float) if k in kinds):  # "3" is epoch 3, not tag "3"
            with contextlib.suppress(ValueError):
                return kind(text)
        if str in kinds:
            return text
        raise ValueError(text)
    return _named(convert, " or ".join(k.__name__ for k in kinds))


def _mapping(coerce: type | None) -> Callable[[str], dict]:
    def convert(text: str) -> dict:
        try:
            if text.strip().startswith("{"):
                obj = json.loads(text)
                return {k: coerce(v) for k, v in obj.items()} if coerce else obj
            out = {}
            for item in filter(str.strip, text.split(",")):
                key, value = (s.strip() for s in item.split("=", 1))
                if not key:
                    raise ValueError(item)
                out[key] = (coerce or float)(value)
            return out
        except (ValueError, TypeError):  # JSONDecodeError is a ValueError
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE[,KEY=VALUE...] or a JSON object, got {text!r}") from None
    return _named(convert, "mapping")


def _or_none(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    return _named(lambda text: None if text.lower() == "none" else conv(text),
                  getattr(conv, "__name__", "value"))


def _argument(tp: Any) -> dict[str, Any]:
    """add_argument keywords (type, action, nargs, choices, metavar) for one annotation."""
    union = typing.get_origin(tp) in _UNIONS
    members = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    optional = union and len(members) < len(typing.get_args(tp))
    tp = members[0]
    origin, args, kw = typing.get_origin(tp), typing.get_args(tp), {}
    if len(members) > 1:
        kinds = [m for m in _SCALARS if m in members]
        conv = _scalars(kinds if len(kinds) == len(members) else kinds + [str])
    elif tp is bool:  # bool | None too: None stays reachable by omitting the flag
        return {"action": argparse.BooleanOptionalAction}
    elif origin is Literal:
        conv, kw["choices"] = type(args[0]), list(args) + [None] * optional
    elif origin is list or tp is list:
        elem = args[0] if args and args[0] in (int, float, str) else str
        conv, kw["nargs"] = elem, "+"
    elif origin is dict or tp is dict:
        coerce = args[1] if len(args) == 2 and args[1] in (int, float, str) else None
        conv, kw["metavar"] = _mapping(coerce), "KEY=VALUE[,...]"
    else:
        conv = tp if callable(tp) else str
    return {"type": _or_none(conv) if optional else conv, **kw}


def add_dataclass_flags(parser_or_group: Any, cls: type, *, skip: Iterable[str] = (),
                        rename: Mapping[str, str] | None = None, required: Iterable[str] = (),
                        defaults: Mapping[str, Any] | None = None) -> dict[str, argparse.Action]:
    """Add ``--field-name`` (``dest`` = the field name) for every init field of dataclass ``cls``
    not in ``skip``; returns field name -> action. ``rename`` gives a field another flag name
    (``{"run_dir": "out"}`` -> ``--out``); ``required`` fields must be given; ``defaults`` gives a
    field a CLI-specific value used (and shown in the help) when its flag is omitted, while
    every other omitted flag stays out of the namespace."""
    skip, required = set(skip), set(required)
    rename, defaults = dict(rename or {}), dict(defaults or {})
    fields = [f for f in dataclasses.fields(cls) if f.init]
    unknown = (skip | required | set(rename) | set(defaults)) - {f.name for f in fields}
    if unknown:  # a typo in a CLI's wiring should fail when the parser is built, not silently
        raise ValueError(f"{cls.__name__} has no init field(s) {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    actions = {}
    for f in fields:
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        text = docs.get(f.name, "")
        if f.name not in required and default is not dataclasses.MISSING:
            shown = repr(default) if default == "" else default  # '' would read as nothing
            text = f"{text} (default: {shown})".strip()
        flag = "--" + rename.get(f.name, f.name.replace("_", "-")).lstrip("-")
        actions[f.name] = parser_or_group.add_argument(
            flag, dest=f.name, required=f.name in required, help=text.replace("%", "%%"),
            default=defaults.get(f.name, argparse.SUPPRESS), **_argument(hints[f.name]))
    return actions


def dataclass_kwargs(namespace: argparse.Namespace, cls: type, *,
                     skip: Iterable[str] = ()) -> dict[str, Any]:
    """The init fields of ``cls`` present in ``namespace`` (the flags the user gave)."""
    skip = set(skip)
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
            if f.init and f.name not in skip and hasattr(namespace, f.name)}
