"""Which adapters `fedpeft serve` finds in run folders, device stores and --adapter folders, and what it
refuses before loading the base."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedpeft.config.tree import AdapterConfig, BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.base import load_base
from fedpeft.serve.catalog import base_entry, discover
from tests.serve.runs import write_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path, cache_dir: str) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    write_run(root / "lora", base, ["alice", "bob"])
    write_run(
        root / "ia3",
        base,
        ["alice"],
        cfg=AdapterConfig(kind="ia3", target_modules=("k_proj", "v_proj", "down_proj")),
    )
    prompt_base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    write_run(root / "prompt", prompt_base, ["alice"], cfg=AdapterConfig(kind="prompt", virtual_tokens=4))
    other = load_base(BaseConfig(model="tiny", quant="bf16", cache_dir=cache_dir))
    write_run(root / "other", other, ["carol"])
    return {p.name: p for p in root.iterdir()}


def names(entries: list) -> list[str]:
    return [e.name for e in entries]


def test_a_run_folder_gives_global_and_each_users_kept_adapter(runs: dict[str, Path]) -> None:
    entries = discover([str(runs["lora"])], [])
    assert names(entries) == ["global", "personal/alice", "personal/bob"]
    assert entries[1].files.path == runs["lora"] / "personal" / "alice" / "personal"
    assert "kept by the device" in entries[1].origin and entries[0].round == 3


def test_a_user_who_kept_the_global_adapter_is_served_that_one(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    (run / "personal" / "bob" / "choice.json").write_text('{"use": "global", "global_round": 3}')
    bob = discover([str(run)], [])[2]
    assert bob.name == "personal/bob" and bob.files.path == run / "personal" / "bob" / "global"


def test_a_device_store_gives_its_users_and_their_latest_global_copy(runs: dict[str, Path]) -> None:
    store = runs["lora"] / "personal"  # a device's --store holds the same user folders
    entries = discover([str(store)], [])
    assert names(entries) == ["personal/alice", "personal/bob", "global"]
    assert entries[2].files.path.parent.name in ("alice", "bob")


def test_named_adapters_and_what_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    g = runs["lora"] / "global"
    assert names(discover([], [f"mine={g}", f"team/v2={g}"])) == ["mine", "team/v2"]
    assert names(discover([str(g)], [])) == ["global"]  # an adapter folder given as a source
    for bad, why in [
        (([str(runs["lora"])], [f"global={g}"]), "two adapters are named 'global'"),
        (([], [f"base={g}"]), "not 'base'"),
        (([], ["a b=x"]), "use letters"),
        (([], ["noequals"]), "NAME=PATH"),
        (([], [f"x={tmp_path}"]), "not a fedpeft adapter folder"),
        (([str(tmp_path / "missing")], []), "no such folder"),
        (([str(tmp_path)], []), "nothing to serve in"),
        (([], []), "nothing to serve"),
        (([str(runs["lora"])], [f"o={runs['other'] / 'global'}"]), "another base"),
        (([str(runs["lora"] / "personal")], [f"p={runs['prompt'] / 'global'}"]), "several types"),
    ]:
        with pytest.raises(FedpeftError, match=why):
            discover(*bad)


def test_a_federations_adapter_naming_the_source_weights_is_served_beside_exact_ones(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    import json

    fed = tmp_path / "fed"  # a global adapter of devices of several quantizations names the source weights
    shutil.copytree(runs["lora"] / "global", fed)
    meta = json.loads((fed / "fedpeft.json").read_text())
    meta["base_fingerprint"] = meta["base"]["source"]
    (fed / "fedpeft.json").write_text(json.dumps(meta))
    entries = discover([str(runs["other"] / "personal")], [f"fed={fed}"])
    assert (
        names(entries) == ["personal/carol", "global", "fed"] and base_entry(entries).name == "personal/carol"
    )
    assert base_entry(discover([], [f"fed={fed}", f"b={runs['other'] / 'global'}"])).name == "b"  # its bf16
    with pytest.raises(FedpeftError, match="another base"):  # fp32 and bf16 adapters named exactly: two bases
        discover([str(runs["lora"] / "personal")], [f"fed={fed}", f"b={runs['other'] / 'global'}"])


def test_a_corrupt_adapter_is_refused_with_its_path(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    weights = run / "personal" / "alice" / "personal" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(FedpeftError, match="corrupt adapter weights .*alice"):
        discover([str(run)], [])


def test_a_choice_that_names_anything_but_its_two_adapters_is_refused(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    for doc, why in [
        ('{"use": "../../bob/personal"}', "'use' must be personal or global"),
        ("[1]", "not a JSON object"),
    ]:
        (run / "personal" / "alice" / "choice.json").write_text(doc)
        with pytest.raises(FedpeftError, match=why):
            discover([str(run)], [])
