"""Command-line flags generated from the config tree: each field's flag, help, type, choices and default are
declared there once (fedpeft.config.tree for what travels in the run config, fedpeft.config.local for what
stays on this machine). Flags override a `--config FILE.toml`, which overrides the defaults. Every value
arrives as text and is parsed and checked by the code that reads config files and Flower's run config
(fedpeft.config.files), so a bad value gets the same line from every entry."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any

from fedpeft.config.fields import Field, check_value, choices
from fedpeft.config.files import dumps_toml, from_flat, parse_value, read_toml
from fedpeft.config.local import LocalConfig, local_fields
from fedpeft.config.tree import FEDERATION, RunConfig, fields
from fedpeft.errors import FedpeftError

TITLES = {
    "base": "base model",
    "adapter": "adapter",
    "data": "data",
    "train": "training",
    "federation": "federation",
    "server_opt": "server optimizer",
    "personal": "personalization (personal adapters stay on the device)",
    "privacy": "differential privacy (user level)",
    "device": "this device (its node-config.toml; nothing the server sends changes it)",
    "connect": "connection",
    "network": "network and security",
    "certs": "certificates",
    "serve": "adapters to serve",
    "export": "export",
    "generate": "generation",
    "eval": "evaluation",
}


@functools.cache
def command_fields() -> tuple[Field, ...]:
    """Every field a command may offer: the run config's, then the local tree's."""
    return fields() + local_fields()


def _offered(command: str) -> list[Field]:
    return [f for f in command_fields() if f.meta["flag"] is not None and command in f.commands]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _help(f: Field, command: str) -> str:
    """The tree's help, with the default the command has: the field's, or what the command does when the
    flag is left out (`unset`)."""
    text = f.meta["help"].replace("%", "%%")
    if command in f.meta["unset"]:
        return f"{text} (default: {f.meta['unset'][command]})"
    if f.hint is bool or f.default in (None, (), dataclasses.MISSING) or "(default:" in text:
        return text
    return f"{text} (default: {_shown(f.default)})"


def _add(group: argparse._ArgumentGroup, f: Field, command: str) -> None:
    """One flag, left out of the namespace unless typed (default SUPPRESS): only what the user typed
    overrides a config file, and a command sees which flags were left out."""
    m = f.meta
    kw: dict[str, Any] = dict(dest=_dest(m["flag"]), default=argparse.SUPPRESS, help=_help(f, command))
    if f.hint is bool:  # --secagg / --no-secagg: either way, so a flag can undo a config file's value
        group.add_argument(m["flag"], action=argparse.BooleanOptionalAction, **kw)
        return
    if f.default is dataclasses.MISSING:
        kw["required"] = True
    if m["many"] == "append":
        kw["action"] = "append"
    elif m["many"] == "+":
        kw["nargs"] = "+"
    options = choices(f.hint)
    shown = [o for o in options or () if o]  # "" in a Literal: not set here, never typed
    kw["metavar"] = m["metavar"] or ("{" + ",".join(shown) + "}" if options else None)
    group.add_argument(m["flag"], **kw)


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags of every field `command` offers, grouped by section (or a field's own `group`); a flag
    several fields share (--seed) is added once. Returns the groups by section, for command-specific
    flags."""
    titled: dict[str, argparse._ArgumentGroup] = {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    seen: set[str] = set()
    for f in _offered(command):  # a shared flag goes where the field that carries its help is
        title = f.meta["group"] or TITLES[f.section]
        if title not in titled:
            titled[title] = parser.add_argument_group(title)
        group = titled[title]
        groups.setdefault(f.section, group)
        if f.meta["flag"] not in seen and f.meta["help"]:
            seen.add(f.meta["flag"])
            _add(group, f, command)
    if command in FEDERATION:
        g = parser.add_argument_group("config file")
        g.add_argument(
            "--config",
            metavar="FILE.toml",
            help="options from a config file (see simulations/); flags given as well override it",
        )
        g.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved configuration as a config file and exit",
        )
    return groups


def _field(key: str) -> Field:
    return next(f for f in command_fields() if f.key == key)


def _typed(args: argparse.Namespace, f: Field) -> Any:
    """The value of f's flag as the field's type (--block-size 64 is an int), inside its range, or None
    when the flag was left out."""
    raw = getattr(args, _dest(f.meta["flag"]), None)
    if raw is None:
        return None
    value = parse_value(f, raw)
    check_value(f, value)
    return value


def field_value(args: argparse.Namespace, key: str) -> Any:
    """The value of a field's flag ("section.name", either tree), checked by the tree's rules (a one-line
    error), or None when it was left out: the command then decides (`unset`)."""
    return _typed(args, _field(key))


def local_section(args: argparse.Namespace, command: str, section: str) -> Any:
    """A section of the local tree (LocalConfig) from a command's flags: its defaults, then the flags typed,
    each parsed and checked as the tree says."""
    cls = typing.get_type_hints(LocalConfig)[section]
    values = {}
    for f in _offered(command):
        if f.section == section and (value := _typed(args, f)) is not None:
            values[f.name] = value
    return cls(**values)


def config_from_args(args: argparse.Namespace, command: str) -> RunConfig:
    """The config of a command: the defaults, then --config FILE, then the flags typed. Validated."""
    # the file and the flags are merged before anything is checked: a file may be valid only with the flags
    flat = read_toml(Path(args.config)) if getattr(args, "config", None) else {}
    for f in fields():
        flag = f.meta["flag"]
        if flag is not None and command in f.commands and hasattr(args, _dest(flag)):
            flat[f.key] = getattr(args, _dest(flag))
    return from_flat(flat, "the command line")


def add_run_flags(group: argparse._ArgumentGroup, out_help: str) -> None:
    """--out and resuming, for the commands that run a federation into a folder."""
    group.add_argument("--out", default=None, metavar="DIR", help=out_help)
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete round (also to extend it to more --rounds)",
    )
    group.add_argument(
        "--resume-from",
        type=int,
        default=None,
        metavar="N",
        help="continue from round N's checkpoint instead of the last one (e.g. when the last does not verify)",
    )


def print_config(args: argparse.Namespace, command: str) -> bool:
    """--print-config: print the resolved config as a config file; True if the command should stop."""
    if not getattr(args, "print_config", False):
        return False
    print(dumps_toml(config_from_args(args, command)), end="")
    return True


def require_out(args: argparse.Namespace) -> None:
    if args.out is None:
        raise FedpeftError(f"{args.command} needs --out DIR")
