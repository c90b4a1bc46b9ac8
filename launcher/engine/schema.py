"""YAML sections to typed config dataclasses: dotted overrides, key and type checks.

Generic: it knows dataclasses and type hints, not clicktower's components, so that anything
(config composition, checkpoint conversion) can build a section without importing the rest.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clicktower.launcher.errors import ConfigError


def read_yaml_sections(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a YAML mapping of sections and apply ``key.sub=value`` overrides to it.

    Args:
        path: YAML file whose top level is a mapping; None starts from an empty one.
        overrides: strings ``section.key=value``; the value is parsed as YAML.

    Raises:
        ConfigError: unreadable file, invalid YAML, a top level that is not a mapping, or a
            malformed override.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML {yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``raw[a][b] = value`` for an override ``a.b=value`` (value parsed as YAML)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        if text.strip()[:1] in ("{", "["):  # meant as a mapping or list: say where it breaks
            raise ConfigError(f"override {key}=...: invalid YAML {yaml_problem(exc, 'of the value')}") from None
        value = text  # an unparseable value stays a string; the type check judges it
    if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
        # Keep the raw text too: a str field given ``123`` or ``null`` should get that text.
        value = _RawScalar(value, text)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def yaml_problem(exc: yaml.YAMLError, where: str = "") -> str:
    """``at line L, column C: what`` for a YAML (or JSON) syntax error: the position of the
    problem itself (PyYAML's message starts with where the enclosing mapping began, often
    column 1), 1-based; then the enclosing construct's start.

    Args:
        exc: the error ``yaml.safe_load`` raised.
        where: words after the position (``"of the value"``).
    """
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return f": {' '.join(str(exc).split())}"
    text = f"at line {mark.line + 1}, column {mark.column + 1}{' ' + where if where else ''}: {exc.problem}"
    context = getattr(exc, "context_mark", None)
    if getattr(exc, "context", None) and context is not None:
        text += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    return text


@dataclass(frozen=True)
class _RawScalar:
    """A scalar parsed from a CLI override, remembering its text for str fields."""

    value: Any
    text: str


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain-dict (YAML-ready) form of a config, used to save the resolved config."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively.

    Args:
        cls: a dataclass type.
        raw: the mapping read from YAML.
        prefix: dotted key path of ``raw`` for error messages ("" at the top).
    """
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        close = ", ".join(sorted(names))
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys in {where}: {close})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and convert where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if isinstance(value, _RawScalar) and value.value is None and type(None) in args:
            return None
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)   # the exception itself: re-raised as is when only one
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: invalid value {_show(value)}")
    if origin is Literal:
        plain = value.value if isinstance(value, _RawScalar) else value
        if plain is False and "no" in args:  # YAML 1.1 reads a bare no/off as false
            plain = "no"
        if plain not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {_show(value)}")
        return plain
    if dataclasses.is_dataclass(tp):
        # Shallow: the section's own fields still need their override text (str fields).
        return from_dict(tp, value.value if isinstance(value, _RawScalar) else value, f"{key}.")
    if tp is Any:
        return _unwrap(value)
    if origin in (dict, typing.Dict) or tp is dict:
        value = _unwrap(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        value = _unwrap(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is str:
        if isinstance(value, _RawScalar):
            return value.text.strip()
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    plain = _unwrap(value)
    if tp is bool:
        if isinstance(plain, bool):
            return plain
        raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(plain, int) and not isinstance(plain, bool):
            return plain
        raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(plain, (int, float)) and not isinstance(plain, bool):
            return float(plain)
        if isinstance(plain, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(plain)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {_show(value)}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # a bug in a config class


def _unwrap(value: Any) -> Any:
    """The plain value, with override wrappers removed at any depth (free-form mappings)."""
    if isinstance(value, _RawScalar):
        return value.value
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _show(value: Any) -> str:
    return repr(value.text if isinstance(value, _RawScalar) else value)


def _describe(value: Any) -> str:
    value = _unwrap(value)
    return f"{type(value).__name__} {value!r}"
