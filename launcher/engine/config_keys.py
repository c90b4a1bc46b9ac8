"""Every key of a config dataclass tree with its type, default and help, for ``clicktower config``
and ``docs/config.md``.

The help is each class's own ``Args:`` docstring section, parsed here: the dataclasses are the
one source of keys, types, defaults and their descriptions, so the listing cannot drift.
Generic: it knows dataclasses, type hints and docstrings, not clicktower's sections.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

_MISSING_HELP = "(undocumented)"
REQUIRED = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()  # default of a field without one
HELP_CHARS = 150  # the CLI's help column is cut here (the whole text is in the markdown page)


@dataclass(frozen=True)
class Key:
    """One config key.

    Args:
        name: the dotted key (``optim.lr``; entries of a list of sections as ``data.mix[].weight``).
        type: the type as a user writes it (``float``, ``int | null``, ``mean | cls``).
        default: the default value (what the section holds when the key is not set).
        help: the key's description from its class's ``Args:`` section, on one line.
    """

    name: str
    type: str
    default: Any
    help: str


def config_keys(cls: type, prefix: str = "") -> list[Key]:
    """Every key of dataclass ``cls``, depth first, in field order.

    Args:
        cls: a config dataclass whose docstring has an ``Args:`` section for its fields.
        prefix: dotted prefix of its keys (``""`` at the top).
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    plain = [f for f in fields if not dataclasses.is_dataclass(hints[f.name])]
    defaults = _defaults(cls, plain) if plain else {}
    keys = []
    for f in fields:
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(config_keys(tp, f"{prefix}{f.name}."))
            continue
        keys.append(Key(f"{prefix}{f.name}", type_name(tp), defaults[f.name], helps.get(f.name, _MISSING_HELP)))
        entry = _list_entry_class(tp)
        if entry is not None:
            keys.extend(config_keys(entry, f"{prefix}{f.name}[]."))
    return keys


def field_help(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Args:`` section of ``cls``'s docstring, each
    description joined onto one line.

    Args:
        cls: a class whose docstring lists its fields as ``name: text`` under ``Args:``,
            continuation lines indented further.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return {}
    helps: dict[str, list[str]] = {}
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break   # the section ended (e.g. a "Returns:" heading)
        match = re.fullmatch(r"(\w+): ?(.*)", line.strip()) if depth == indent else None
        if match:
            current = match.group(1)
            helps[current] = [match.group(2)]
        elif current is not None:
            helps[current].append(line.strip())
    return {name: " ".join(" ".join(parts).split()) for name, parts in helps.items()}


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (the CLI's one-line help), without reST markup."""
    text = plain(text)
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!w\.r\.t)\.(\s|$)", text)
    text = text[: match.start() + 1] if match else text
    return text if len(text) <= HELP_CHARS else text[: HELP_CHARS - 3].rsplit(" ", 1)[0] + " ..."


def plain(text: str) -> str:
    """``text`` with reST double backquotes as plain text."""
    return text.replace("``", "")


def type_name(tp: Any) -> str:
    """A type hint as a user writes the value: ``int | null``, ``mean | cls``, ``list[float]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (dict, typing.Dict) or tp is dict:
        return "mapping"
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else Any
        if dataclasses.is_dataclass(inner):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(inner)) + "}"
        return f"list[{type_name(inner)}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def show(value: Any) -> str:
    """A value as YAML writes it on one line (``null``, ``true``, ``5.0e-05``, ``[0.9, 0.999]``)."""
    if value is REQUIRED:
        return "(required)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def lookup(cfg: Any, name: str) -> Any:
    """The value of dotted key ``name`` in a config instance (entries of lists: the list)."""
    value = cfg
    for part in name.split("[]")[0].split("."):
        value = getattr(value, part)
    return value


def _defaults(cls: type, fields: list[dataclasses.Field]) -> dict[str, Any]:
    """The default of each of ``fields``: of an instance built with no arguments where the
    class allows one (so that values ``__post_init__`` fills in show as such), else the
    declared one."""
    try:
        instance = cls()
    except (TypeError, ValueError):
        instance = None
    out = {}
    for f in fields:
        if instance is not None:
            out[f.name] = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def _list_entry_class(tp: Any) -> type | None:
    """The dataclass of a ``list[Section] | None`` key's entries, if it is one."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) in (list, tuple):
            inner = typing.get_args(arg)
            if inner and dataclasses.is_dataclass(inner[0]):
                return inner[0]
    return None


def render_text(keys: list[Key], cfg: Any = None) -> str:
    """One line per key: ``key=value``, its type and the first sentence of its help.

    Args:
        keys: from ``config_keys``.
        cfg: a config instance whose values to show (a changed one notes its default); None:
            the defaults.
    """
    rows = []
    for key in keys:
        value = key.default if cfg is None or "[]" in key.name else lookup(cfg, key.name)
        note = "" if show(value) == show(key.default) else f"(default {show(key.default)}) "
        rows.append((f"{key.name}={show(value)}", key.type, note + first_sentence(key.help)))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 44), (1, 24))]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows)


def render_markdown(cls: type, title: str, intro: str) -> str:
    """A markdown page: one table of keys (type, default, full help) per section.

    Args:
        cls: the config dataclass whose fields are the sections (each a dataclass).
        title: the page's heading.
        intro: paragraphs under the heading.
    """
    out = [f"# {title}", "", intro.strip(), ""]
    hints = typing.get_type_hints(cls)
    for name, section in ((f.name, hints[f.name]) for f in dataclasses.fields(cls)):
        out += [f"## {name}", "", f"`{section.__module__}.{section.__qualname__}`", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for key in config_keys(section, f"{name}."):
            cells = [f"`{key.name}`", key.type, f"`{show(key.default)}`", key.help.replace("``", "`")]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out)
