"""The forgetting guard's reference text and rules (fedpeft.federation.forgetting); the guard in a federation is in
tests/simulation/test_simulate.py and tests/personal/test_personalize.py."""

from pathlib import Path

import pytest

from fedpeft.config.tree import DataConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.forgetting import forgets, reference_blocks, reference_metrics, reference_path


class _Bytes:
    """A byte tokenizer: one token per byte, EOS 0."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode())}


def test_the_default_is_public_domain_text_every_install_has() -> None:
    path = reference_path("default")
    assert path is not None and path.name == "hamlet.txt" and "Hamlet" in path.read_text()[:200]
    assert reference_path("off") is None


def test_a_missing_reference_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="no such file"):
        reference_blocks(DataConfig(reference_text=str(tmp_path / "nope.txt")), _Bytes())
    (tmp_path / "binary.txt").write_bytes(b"PK\x03\x04\0\0")
    with pytest.raises(FedpeftError, match="is not text"):
        reference_blocks(DataConfig(reference_text=str(tmp_path / "binary.txt")), _Bytes())
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FedpeftError, match="is empty"):
        reference_blocks(DataConfig(reference_text=str(tmp_path / "empty.txt")), _Bytes())


def test_the_blocks_are_a_fixed_prefix_of_the_text(tmp_path: Path) -> None:
    (tmp_path / "ref.txt").write_text("x" * 1000)
    blocks = reference_blocks(
        DataConfig(reference_text=str(tmp_path / "ref.txt"), block_size=64, eval_max_tokens=200), _Bytes()
    )
    assert [len(b) for b in blocks] == [64, 64, 64, 8]
    assert reference_blocks(DataConfig(reference_text="off"), _Bytes()) == []


def test_the_median_of_the_reports_so_one_client_cannot_move_it() -> None:
    honest = {"reference_loss": 3.0, "base_reference_loss": 2.9}
    liar = {"reference_loss": 0.1, "base_reference_loss": 9.0}
    m = reference_metrics([honest, honest, liar, {}])
    assert m["reference_clients"] == 3
    assert m["forgetting"] == pytest.approx(100 * (2.718281828**0.1 - 1), rel=1e-6)
    assert reference_metrics([{}]) == {}


def test_the_rule() -> None:
    m = {"reference_ppl": 30.0, "base_reference_ppl": 25.0, "forgetting": 20.0}
    assert forgets(m, 0) == "" and forgets(m, 25) == ""
    assert "20.0% above the base's 25.00 (--max-forgetting 10)" in forgets(m, 10)
    assert "cannot check" in forgets({}, 10)  # a round nobody measured is not vouched for


def test_the_guard_needs_its_yardstick_every_round() -> None:
    from fedpeft.config.tree import FederationConfig, RunConfig, validate

    with pytest.raises(FedpeftError, match="needs --reference-text"):
        validate(
            RunConfig(data=DataConfig(reference_text="off"), federation=FederationConfig(max_forgetting=5))
        )
    with pytest.raises(FedpeftError, match="--eval-every 1"):
        validate(RunConfig(federation=FederationConfig(max_forgetting=5, eval_every=2)))
