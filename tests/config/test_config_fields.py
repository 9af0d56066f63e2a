"""The field machinery on a tree of its own: leaves, choices, ranges, the commands a flag belongs to."""

from dataclasses import dataclass
from typing import Literal

import pytest

from fedpeft.config.fields import check_value, choices, leaves, option, section
from fedpeft.errors import FedpeftError


@dataclass(frozen=True)
class Inner:
    mode: Literal["a", "b"] = option("a", "the mode", flag="--mode")
    rate: float | None = option(None, "a rate", flag="--rate", gt=0, le=1)
    count: int = option(3, "a count", flag="--count", ge=1, commands=("x",))
    hidden: int = option(0)  # config files only


@dataclass(frozen=True)
class Tree:
    inner: Inner = section(Inner, ("x", "y"))


def test_leaves_carry_key_label_default_and_commands() -> None:
    by_key = {f.key: f for f in leaves(Tree)}
    assert list(by_key) == ["inner.mode", "inner.rate", "inner.count", "inner.hidden"]
    assert by_key["inner.count"].commands == ("x",) and by_key["inner.mode"].commands == ("x", "y")
    assert by_key["inner.hidden"].label == "inner.hidden" and by_key["inner.rate"].label == "--rate"
    assert by_key["inner.rate"].get(Tree(Inner(rate=0.5))) == 0.5


def test_choices_come_from_literal_types() -> None:
    assert choices(Literal["a", "b"]) == ("a", "b")
    assert choices(Literal["a"] | None) == ("a",)
    assert choices(int) is None


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("inner.mode", "c", "--mode must be one of a, b, got 'c'"),
        ("inner.rate", 0.0, "--rate must be in (0, 1], got 0.0"),
        ("inner.rate", 1.5, "--rate must be in (0, 1], got 1.5"),
        ("inner.count", 0, "--count must be at least 1, got 0"),
    ],
)
def test_check_value_names_the_flag(key: str, value: object, match: str) -> None:
    f = {f.key: f for f in leaves(Tree)}[key]
    with pytest.raises(FedpeftError) as e:
        check_value(f, value)
    assert str(e.value) == match


def test_values_inside_the_rules_pass_and_none_is_no_value() -> None:
    fields = {f.key: f for f in leaves(Tree)}
    for key, value in (("inner.mode", "b"), ("inner.rate", None), ("inner.rate", 1.0), ("inner.count", 1)):
        check_value(fields[key], value)


def test_mutable_defaults_are_refused() -> None:
    with pytest.raises(TypeError):
        option([1, 2])
