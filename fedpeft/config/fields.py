"""The machinery behind the config tree (fedpeft.config.tree): fields that carry their flag, help and range,
and the flat list of leaves that the CLI, config files and Flower's run config are generated from."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from fedpeft.errors import FedpeftError

# A field without a default: its flag must be given (`fedpeft client --server`), and the section cannot be
# built without it.
REQUIRED: Any = dataclasses.MISSING


def option(
    default: Any,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    commands: tuple[str, ...] | None = None,
    group: str | None = None,
    many: Literal["append", "+"] | None = None,
    unset: dict[str, str] | None = None,
) -> Any:
    """A config field with everything the entries need: `flag` (None: config files and the run config
    only; several fields may share one, e.g. --seed), `help` (a flag's help; "(default: X)" is appended
    unless the default is None or empty), a range checked by validate(), the `commands` that offer the flag
    (default: those of its section). A bool's flag comes with its --no- form. `default` REQUIRED: a flag
    the command needs. `group`: the help section of the flag when not its config section's. `many`: a tuple
    given by repeating the flag ("append") or as several values ("+") instead of a comma list. `unset`:
    commands on which a flag left out leaves the choice to the command, and what it then does (its help's
    "(default: ...)"; fedpeft.config.flags.field_value is None)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    meta = dict(help=help, flag=flag, metavar=metavar, gt=gt, ge=ge, lt=lt, le=le, commands=commands)
    meta |= dict(group=group, many=many, unset=unset or {})
    return field(default=default, metadata=meta)


def section(cls: type, commands: tuple[str, ...]) -> Any:
    """A section of the tree and the commands whose flags include it."""
    return field(default_factory=cls, metadata={"commands": commands})


@dataclass(frozen=True)
class Field:
    """One leaf of the tree, as the entries see it."""

    key: str  # "section.name": the run config and config file key
    section: str
    name: str
    hint: Any  # the resolved type
    default: Any
    meta: dict[str, Any]
    commands: tuple[str, ...]

    @property
    def label(self) -> str:
        """How errors name the field: its flag, or its key when it has none."""
        return self.meta["flag"] or self.key

    def get(self, root: Any) -> Any:
        return getattr(getattr(root, self.section), self.name)


def leaves(root: type) -> list[Field]:
    """Every leaf of a two-level config tree (sections of fields), in declaration order."""
    out = []
    hints = typing.get_type_hints(root)
    for s in dataclasses.fields(root):
        cls = hints[s.name]
        sub_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            commands = meta.get("commands") or s.metadata["commands"]
            out.append(
                Field(f"{s.name}.{f.name}", s.name, f.name, sub_hints[f.name], f.default, meta, commands)
            )
    return out


def choices(hint: Any) -> tuple[str, ...] | None:
    """The values of a Literal type (Optional unwrapped), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return None


def check_value(f: Field, value: Any) -> None:
    """A leaf's own rules: one of its choices, inside its range. One-line FedpeftError naming the flag."""
    options = choices(f.hint)
    if options is not None and value is not None and value not in options:
        # "" among a Literal's values means "not set here" (a device's compute dtype): never offered
        raise FedpeftError(f"{f.label} must be one of {', '.join(o for o in options if o)}, got {value!r}")
    m = f.meta
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    gt, ge, lt, le = m.get("gt"), m.get("ge"), m.get("lt"), m.get("le")
    ok = (gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
    if ok and (le is None or value <= le):
        return
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    if hi is None:
        want = "positive" if gt == 0 else "not negative" if ge == 0 else f"at least {lo}"
    elif lo is None:
        want = f"at most {hi}"
    elif gt is not None and le is not None:
        want = f"in ({lo}, {hi}]"
    elif ge is not None and lt is not None:
        want = f"in [{lo}, {hi})"
    else:
        want = f"between {lo} and {hi}"
    raise FedpeftError(f"{f.label} must be {want}, got {value}")
