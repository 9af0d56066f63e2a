"""The personalization methods' registry: one strategy per --personalize choice, and what each changes."""

from __future__ import annotations

import subprocess
import sys
import typing

from fedpeft.config.tree import FederationConfig, PersonalConfig, RunConfig
from fedpeft.personal.strategies import STRATEGIES, strategy_for


def test_one_strategy_per_choice_of_the_flag() -> None:
    choices = typing.get_args(typing.get_type_hints(PersonalConfig)["method"])
    assert sorted(STRATEGIES) == sorted(choices)
    assert all(name == s.name for name, s in STRATEGIES.items())
    assert [n for n, s in STRATEGIES.items() if s.personal] == ["finetune", "fedsa", "ditto"]


def test_which_rounds_evaluate_personal_adapters() -> None:
    """fedsa and ditto hold personal adapters from their first sampled round on; finetune makes them at the
    federation's last round only; none never has any."""
    table = {m: [STRATEGIES[m].evaluates_personal(r, 3) for r in range(4)] for m in STRATEGIES}
    assert table == {
        "none": [False] * 4,
        "finetune": [False, False, False, True],
        "fedsa": [False, True, True, True],
        "ditto": [False, True, True, True],
    }
    cfg = RunConfig(federation=FederationConfig(rounds=0), personal=PersonalConfig(method="finetune"))
    assert not strategy_for(cfg).evaluates_personal(0, 0)


def test_what_the_server_aggregates() -> None:
    names = ["m.lora_A.weight", "m.lora_B.weight"]
    assert STRATEGIES["fedsa"].shared_keys(names) == ["m.lora_A.weight"]
    assert all(STRATEGIES[m].shared_keys(names) == names for m in ("none", "finetune", "ditto"))
    assert [m for m, s in STRATEGIES.items() if s.aggregation_note()] == ["fedsa"]
    assert [m for m, s in STRATEGIES.items() if not s.resaves_personal] == ["ditto"]


def test_the_server_side_of_personalization_imports_no_torch() -> None:
    code = (
        "import sys, fedpeft.personal.strategies, fedpeft.personal.store, fedpeft.federation.personal_summary;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr
