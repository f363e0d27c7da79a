"""Config schema: frozen dataclasses whose fields carry their help, built strictly from YAML data.

A config class declares each key once, with `setting(default, "one line of meaning")`; the same
declaration gives type checking, refusal of unknown keys, `--help` text and `strata config show`.
Values are coerced only where YAML cannot express the type (a list for a tuple, "1e-3" for a float);
anything else that does not fit is refused with the key and what it accepts.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
               "false": False, "no": False, "off": False, "0": False}


class ConfigError(ValueError):
    """A configuration that would fail: refused before any image is read."""


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            choices: Sequence[Any] | None = None, parse: Callable[[Any], Any] | None = None,
            shown: str | None = None) -> Any:
    """A config field: its default, one line of meaning, and optionally its valid choices, a parser for
    values that are objects of their own (e.g. `Preprocessing`), and how `--help` shows the default."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "parse": parse,
                "shown": shown}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass of settings), defaulting to its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "section": True})


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of a schema, as `--help` and the tests list it."""

    key: str
    type: str
    default: Any
    help: str
    choices: tuple | None
    shown: str | None = None  # the default as --help shows it, where show_value would not do


def _is_section(f: dataclasses.Field, tp: Any) -> bool:
    return bool(f.metadata.get("section")) or (dataclasses.is_dataclass(tp) and f.metadata.get("parse") is None
                                               and "help" not in f.metadata)


def keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of `cls`, sections flattened to `section.key`, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(f, tp):
            out += keys(tp, f"{prefix}{f.name}.")
            continue
        out.append(KeyDoc(f"{prefix}{f.name}", type_name(tp), _default(f), f.metadata.get("help", ""),
                          f.metadata.get("choices"), f.metadata.get("shown")))
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def type_name(tp: Any) -> str:
    """A short, YAML-minded name: `int`, `list[str]`, `float | null`, `mapping`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys("null" if a is type(None) else type_name(a) for a in args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return f"list[{type_name(args[0])}] of {len(args)}"
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]" if args and args[1] is not Any else "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    """A default as a user would type it on the command line."""
    if value is MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{}" if not value else str(dict(value))
    if dataclasses.is_dataclass(value):
        return str(to_plain(value))
    return str(value) if value != "" else '""'


def render_keys(title: str, docs: Sequence[KeyDoc]) -> str:
    """Keys as an aligned table (key, type, default, meaning) for `--help`."""
    rows = [(d.key, d.type, d.shown if d.shown is not None else show_value(d.default),
             d.help + (f"; one of: {', '.join(map(show_value, d.choices))}" if d.choices else "")) for d in docs]
    w0, w1 = max(len(r[0]) for r in rows), min(18, max(len(r[1]) for r in rows))
    w2 = min(16, max(len(r[2]) for r in rows))
    lines = [title]
    for key, tp, default, meaning in rows:
        lines.append(f"  {key:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {meaning}")
    return "\n".join(lines)


def to_plain(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) of a config object, as YAML would hold it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def build(cls: type, data: Any, *, where: str = "") -> Any:
    """A (nested) frozen config dataclass from plain data; unknown keys and misfit values raise ConfigError."""
    label = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping of keys, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(fields), n=1)
        raise ConfigError(f"unknown key(s) {unknown} in {label}; valid keys: {sorted(fields)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce_field(fields[name], hints[name], value, where=f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in kwargs and _default(f) is MISSING]
    if missing:
        raise ConfigError(f"{label}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{label}: {e}") from None


def coerce_field(f: dataclasses.Field, tp: Any, value: Any, *, where: str) -> Any:
    """`value` for field `f` of type `tp`: its own parser, else the type; then its choices."""
    parse = f.metadata.get("parse")
    if parse is not None and value is not None:
        try:
            value = parse(value)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    else:
        value = coerce(tp, value, where=where)
    choices = f.metadata.get("choices")
    if choices is not None and value is not None:
        items = value if isinstance(value, tuple) else (value,)
        bad = [v for v in items if v not in choices]
        if bad:
            raise ConfigError(f"{where}: {_shown(bad[0])} is not a valid choice; valid: {list(choices)}")
    return value


def coerce(tp: Any, value: Any, *, where: str) -> Any:
    """`value` as type `tp`, strictly: the conversions YAML needs, never a lossy one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(option, value, where=where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {_shown(value)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where=where)
    if origin is tuple:
        if value is None:
            raise ConfigError(f"{where}: expected {type_name(tp)}, got null")
        items = list(value) if isinstance(value, (list, tuple)) else [value]  # a scalar is a one-item list
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, where=f"{where}[{i}]") for i, v in enumerate(items))
        if len(items) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {_shown(value)}")
        return tuple(coerce(a, v, where=f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, items)))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        if args:
            return {coerce(args[0], k, where=where): coerce(args[1], v, where=f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        return _bool(value, where)
    if tp is int:
        return _int(value, where)
    if tp is float:
        return _float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # `layers: [1, -1]`, `weights: 2`
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # a schema bug, caught by the tests


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")


def _int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""))
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")


def _float(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
