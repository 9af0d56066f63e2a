"""Command-line flags generated from the config tree (fedpeft.config.tree): each field's flag, help, type,
choices and default are declared there once. Flags override a `--config FILE.toml`, which overrides the
defaults."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedpeft.config.fields import Field, choices
from fedpeft.config.tree import FEDERATION, RunConfig, fields

TITLES = {
    "base": "base model",
    "adapter": "adapter",
    "data": "data",
    "train": "training",
    "federation": "federation",
    "server_opt": "server optimizer",
    "personal": "personalization (personal adapters stay on the device)",
    "privacy": "differential privacy (user level)",
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _shown(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _add(group: argparse._ArgumentGroup, f: Field) -> None:
    """One flag. Values arrive as text and are parsed and checked by the same code as a config file's or the
    run config's (fedpeft.config.files), so a bad value gets the same line from every entry."""
    m = f.meta
    text = m["help"].replace("%", "%%")
    if f.hint is bool:  # --secagg / --no-secagg: either way, so a flag can undo a config file's value
        action = argparse.BooleanOptionalAction
        group.add_argument(
            m["flag"], dest=_dest(m["flag"]), action=action, default=argparse.SUPPRESS, help=text
        )
        return
    if f.default is not None and "(default:" not in text:
        text += f" (default: {_shown(f.default)})"
    options = choices(f.hint)
    metavar = m["metavar"] or ("{" + ",".join(options) + "}" if options else None)
    group.add_argument(
        m["flag"], dest=_dest(m["flag"]), metavar=metavar, default=argparse.SUPPRESS, help=text
    )


def add_field_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, key: str, default_help: str | None = None
) -> None:
    """One field's flag on a hand-written command (client, serve, generate), with the tree's help; the value
    is read back with field_value(). `default_help` replaces "(default: ...)" where the command's default
    is not the tree's (None in the namespace means "as the tree or the federation says")."""
    f = next(f for f in fields() if f.key == key)
    text = f.meta["help"].replace("%", "%%")
    text += f" (default: {default_help or _shown(f.default)})"
    options = choices(f.hint)
    metavar = f.meta["metavar"] or ("{" + ",".join(options) + "}" if options else None)
    parser.add_argument(f.meta["flag"], dest=_dest(f.meta["flag"]), metavar=metavar, default=None, help=text)


def field_value(args: argparse.Namespace, key: str) -> Any:
    """The value of add_field_flag's flag, checked by the tree's own rules (a one-line error), or None."""
    from fedpeft.config.fields import check_value
    from fedpeft.config.files import parse_value

    f = next(f for f in fields() if f.key == key)
    value = getattr(args, _dest(f.meta["flag"]), None)
    if value is not None:
        value = parse_value(f, value)  # as the field's type: --block-size 64 is an int
        check_value(f, value)
    return value


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse._ArgumentGroup]:
    """Add the flags of every field `command` offers, grouped by section; a flag several fields share
    (--seed) is added once. Flags left out are absent from the namespace (default SUPPRESS), so only what
    the user typed overrides a config file. Returns the groups by section, for command-specific flags."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    offered = [f for f in fields() if f.meta["flag"] is not None and command in f.commands]
    for section in dict.fromkeys(f.section for f in offered):
        groups[section] = parser.add_argument_group(TITLES[section])
    seen: set[str] = set()
    for f in offered:  # a shared flag goes where the field that carries its help is
        flag = f.meta["flag"]
        if flag not in seen and f.meta["help"]:
            seen.add(flag)
            _add(groups[f.section], f)
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


def config_from_args(args: argparse.Namespace, command: str) -> RunConfig:
    """The config of a command: the defaults, then --config FILE, then the flags typed. Validated."""
    from fedpeft.config.files import from_flat, read_toml

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


def add_base_location(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Where an existing adapter's base is, when it moved (export, generate, serve): not part of the config
    tree, whose --model builds a new base rather than finding an adapter's."""
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="the base model, if it is no longer where the adapter says (default: from the adapter)",
    )
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="cache of converted bases")


def print_config(args: argparse.Namespace, command: str) -> bool:
    """--print-config: print the resolved config as a config file; True if the command should stop."""
    if not getattr(args, "print_config", False):
        return False
    from fedpeft.config.files import dumps_toml

    print(dumps_toml(config_from_args(args, command)), end="")
    return True


def require_out(args: argparse.Namespace) -> None:
    if args.out is None:
        from fedpeft.errors import FedpeftError

        raise FedpeftError(f"{args.command} needs --out DIR")
