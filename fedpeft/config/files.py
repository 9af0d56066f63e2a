"""The config tree in and out: Flower's flat run config, TOML config files, and the defaults table of
`[tool.flwr.app.config]`. Every reader ends in fedpeft.config.tree.validate()."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedpeft.config.fields import Field
from fedpeft.config.tree import RunConfig, fields, validate
from fedpeft.errors import FedpeftError

# Keys of Flower's run config that are not part of the tree: where the ServerApp writes, and the checkpoint
# round a resumed federation continues from (-1: a new federation). `fedpeft server` sets both.
APP_KEYS: dict[str, Any] = {"out": "runs/flwr", "resume-round": -1}


def to_run_config(cfg: RunConfig) -> dict[str, Any]:
    """Flatten to Flower's run config: keys "section.field", values str/int/float/bool.
    Tuples become comma-joined strings, None becomes ""."""
    return {f.key: _flat(f.get(cfg)) for f in fields()}


def _flat(value: Any) -> Any:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else value


def parse_value(f: Field, raw: Any) -> Any:
    """A value from a flat run config, a TOML file or a flag string, as the field's type; a one-line
    FedpeftError naming the flag when it is not one."""
    hint = f.hint
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if raw in ("", None):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        texts = tuple(str(x).strip() for x in items if str(x).strip())
        if typing.get_args(hint)[0] is int:  # a list of integers (--client-ranks 2,4,8)
            if not all(t.isdigit() for t in texts):
                raise FedpeftError(f"{f.label} must be comma-separated whole numbers, got {raw!r}")
            return tuple(int(t) for t in texts)
        return texts
    if origin is Literal or hint is str:
        if not isinstance(raw, str):
            raise FedpeftError(f"{f.label} must be text, got {raw!r}")
        return raw
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise FedpeftError(f"{f.label} must be true or false, got {raw!r}")
        return text in ("true", "1", "yes")
    try:
        if isinstance(raw, bool):
            raise ValueError
        if hint is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return hint(raw)
    except (TypeError, ValueError):
        kind = "an integer" if hint is int else "a number"
        raise FedpeftError(f"{f.label} must be {kind}, got {raw!r}") from None


def from_flat(flat: dict[str, Any], where: str, start: RunConfig | None = None) -> RunConfig:
    """A config from flat "section.field" keys over `start` (default: the defaults), validated. Unknown keys
    are an error naming `where` they came from."""
    by_key = {f.key: f for f in fields()}
    sections: dict[str, dict[str, Any]] = {}
    for key, raw in flat.items():
        f = by_key.get(key)
        if f is None:
            raise FedpeftError(f"unknown key {key!r} in {where}")
        sections.setdefault(f.section, {})[f.name] = parse_value(f, raw)
    cfg = start or RunConfig()
    cfg = dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in sections.items()}
    )
    return validate(cfg)


def from_run_config(flat: dict[str, Any]) -> RunConfig:
    """The one parser for Flower's flat run config (unknown keys are an error; missing keys keep defaults)."""
    return from_flat(flat, "the run config")


def read_toml(path: Path) -> dict[str, Any]:
    """A config file as flat "section.field" keys, unvalidated (the flags of a command may still override
    it): TOML with one table per section (`[federation]`, `rounds = 3`), the keys of the tree. Unknown keys
    and unreadable files are one-line errors naming the file."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedpeftError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FedpeftError(f"cannot read config file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise FedpeftError(f"config file {path} is not valid TOML: {e}") from None
    known = {f.key for f in fields()}
    flat: dict[str, Any] = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise FedpeftError(
                f"unknown key {name!r} in {path}: options belong in a table such as [federation]"
            )
        for key, value in table.items():
            if f"{name}.{key}" not in known:
                raise FedpeftError(f"unknown key '{name}.{key}' in {path}")
            flat[f"{name}.{key}"] = value
    return tie(flat, str(path))


def tie(flat: dict[str, Any], where: str) -> dict[str, Any]:
    """Fields that share a flag are one option (--seed sets adapter.seed, train.seed and federation.seed):
    a file or flag that sets one of them sets them all; two different values are an error."""
    groups: dict[str, list[str]] = {}
    for f in fields():
        if f.meta["flag"]:
            groups.setdefault(f.meta["flag"], []).append(f.key)
    out = dict(flat)
    for flag, keys in groups.items():
        given = {k: flat[k] for k in keys if k in flat}
        if len(keys) < 2 or not given:
            continue
        if len({repr(v) for v in given.values()}) > 1:
            raise FedpeftError(f"{', '.join(given)} are one option ({flag}) but differ in {where}")
        out.update(dict.fromkeys(keys, next(iter(given.values()))))
    return out


def load_toml(path: Path, start: RunConfig | None = None) -> RunConfig:
    """A config file over `start` (default: the defaults), validated."""
    return from_flat(read_toml(path), str(path), start)


def dumps_toml(cfg: RunConfig, only_changed: bool = False) -> str:
    """The config as a TOML config file that load_toml reads back to the same config; `only_changed` keeps
    the values that differ from the defaults. None is written as "" (as in the run config)."""
    doc: dict[str, dict[str, Any]] = {}
    for f in fields():
        value = f.get(cfg)
        if not only_changed or value != f.default:
            doc.setdefault(f.section, {})[f.name] = list(value) if isinstance(value, tuple) else _flat(value)
    return tomli_w.dumps(doc)


def overrides(cfg: RunConfig) -> dict[str, Any]:
    """The flat run config entries that differ from the defaults: what a Flower run needs on top of the
    app's `[tool.flwr.app.config]`."""
    return {f.key: _flat(f.get(cfg)) for f in fields() if f.get(cfg) != f.default}


def flwr_app_config() -> dict[str, Any]:
    """`[tool.flwr.app.config]` of pyproject.toml: the tree's defaults, nested as Flower flattens them back
    to "section.field" keys, plus the app's own keys. tests/config/test_config_io.py keeps pyproject.toml equal."""
    doc: dict[str, Any] = dict(APP_KEYS)
    for f in fields():
        doc.setdefault(f.section, {})[f.name] = _flat(f.default)
    return doc


def flwr_app_table() -> dict[str, Any]:
    """`[tool.flwr.app]` of pyproject.toml (`flwr run .`) and of the app `fedpeft server` launches when
    fedpeft is installed without its source tree. The FAB carries no code: the SuperLink and every
    SuperNode import the apps from their installed fedpeft (a device needs it for the base and torch
    anyway), so a run never mixes two versions of the code."""
    return {
        "publisher": "fedpeft",
        "components": {"serverapp": "server.app:app", "clientapp": "client.app:app"},
        "fab-include": ["/LICENSE"],
        "config": flwr_app_config(),
    }


if __name__ == "__main__":  # the [tool.flwr.app] block of pyproject.toml
    print(tomli_w.dumps({"tool": {"flwr": {"app": flwr_app_table()}}}), end="")
