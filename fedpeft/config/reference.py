"""The configuration reference as Markdown, rendered from the config tree (fedpeft.config.tree.fields()):
one table per section with each field's key, flag, type, default and help. The docs site builds its
reference page from it at build time (docs/hooks.py), so the page cannot drift from the tree;
`python -m fedpeft.config.reference` prints it."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from fedpeft.config.fields import Field
from fedpeft.config.local import local_fields
from fedpeft.config.tree import fields

INTRO = """# Configuration reference

Generated from the config tree (`fedpeft.config.tree`) by `python -m fedpeft.config.reference`: every
option, declared there once. Each section is a table of a config file (`[federation]` / `rounds = 3`), each
key is also Flower's run-config key (`federation.rounds=3`), and the flag is what `fedpeft simulate`,
`server`, `deploy-local` and `train` take (the commands a section offers are named under it). A field with
no flag (-) is set in config files or the run config only. Defaults are written as in a config file; `""`
means unset (the help says what is used then). How files, flags and the run config combine:
[Configuration](../configuration.md).
"""


LOCAL_INTRO = """# Options of one command

These options belong to a single command (a device's, the server's network, serve's, ...): they are flags
of that command only and never travel in Flower's run config. One without a flag (-) is set by the
command itself.
"""


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no raw HTML, pipes or emphasis markers."""
    return text.replace("<", "&lt;").replace("|", "\\|").replace("*", "\\*")


def _toml(value: Any) -> str:
    """A default as a config file writes it (None is written as "")."""
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _default(f: Field) -> str:
    value = _toml(f.default)
    return value if f.default is dataclasses.MISSING else f"`{value}`"


def _type(f: Field) -> str:
    """The field's type in words, with its choices and range."""
    args = [a for a in typing.get_args(f.hint) if a is not type(None)]
    hint = args[0] if type(None) in typing.get_args(f.hint) and len(args) == 1 else f.hint  # Optional[X]
    if typing.get_origin(hint) is Literal:
        kind = "one of " + ", ".join(f"`{o}`" for o in typing.get_args(hint))
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0].__name__
        kind = f"list of {item} (a flag takes them comma-separated)"
    else:
        kind = getattr(hint, "__name__", str(hint))
    bounds = _range(f.meta)
    return f"{kind}, {bounds}" if bounds else kind


def _range(meta: dict[str, Any]) -> str:
    """The range validate() checks, as an interval: (0, 1], ≥ 0, ..."""
    lo = meta["gt"] if meta.get("gt") is not None else meta.get("ge")
    hi = meta["lt"] if meta.get("lt") is not None else meta.get("le")
    if lo is None and hi is None:
        return ""
    if hi is None:
        return ("> " if meta.get("gt") is not None else "≥ ") + str(lo)
    if lo is None:
        return ("below " if meta.get("lt") is not None else "≤ ") + str(hi)
    left = "(" if meta.get("gt") is not None else "["
    right = ")" if meta.get("lt") is not None else "]"
    return f"in {left}{lo}, {hi}{right}"


def _flag(f: Field) -> str:
    flag = f.meta.get("flag")
    if flag is None:
        return "-"
    if f.hint is bool:
        return f"`{flag}` / `--no-{flag[2:]}`"
    return f"`{flag}`"


def _help(f: Field, carriers: dict[str, Field], usual: tuple[str, ...]) -> str:
    """The field's help; a field that shares its flag (--seed) points to the field whose help it carries,
    and a field offered by other commands than its section's names them."""
    text = f.meta.get("help") or ""
    flag = f.meta.get("flag")
    if not text and flag in carriers and carriers[flag] is not f:
        text = f"set with `{carriers[flag].key}` by the same flag"
    parts = [_cell(text)] if text else []
    if f.commands != usual:
        parts.append("(flag on " + ", ".join(f"`{c}`" for c in f.commands) + ")")
    return " ".join(parts) or "-"


def _section(name: str, leaves: list[Field], carriers: dict[str, Field]) -> list[str]:
    usual = Counter(f.commands for f in leaves).most_common(1)[0][0]
    lines = [
        f"## `[{name}]`",
        "",
        "Flags on " + ", ".join(f"`fedpeft {c}`" for c in usual) + ".",
        "",
        "| key | flag | type | default | help |",
        "|---|---|---|---|---|",
    ]
    for f in leaves:
        row = (f"`{f.key}`", _flag(f), _cell(_type(f)), _default(f), _help(f, carriers, usual))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _sections(leaves: Sequence[Field]) -> list[str]:
    carriers = {f.meta["flag"]: f for f in leaves if f.meta.get("flag") and f.meta.get("help")}
    sections: dict[str, list[Field]] = {}
    for f in leaves:
        sections.setdefault(f.section, []).append(f)
    lines: list[str] = []
    for name, members in sections.items():
        lines += _section(name, members, carriers)
    return lines


def render(local: Sequence[Field] | None = None) -> str:
    """The whole reference page: the run config's sections in the tree's order, then `local`, options that
    one command takes and that never travel in the run config (a device's, serve's, ...; default: all)."""
    local = local_fields() if local is None else local
    lines = [INTRO, *_sections(fields())]
    if local:
        lines += [LOCAL_INTRO, *_sections(local)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
