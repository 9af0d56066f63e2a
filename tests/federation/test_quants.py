"""Devices of several quantizations of one base in one federation (fedpeft.model.fingerprint's source
fingerprint, fedpeft.federation.roster, fedpeft.federation.kinds): who ran what, per-kind quality, plain and
secure rounds, and the global adapter loading on every quantization of the weights and on no other."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config.tree import BaseConfig, RunConfig
from fedpeft.config.validate import validate
from fedpeft.device import runtime
from fedpeft.errors import FedpeftError
from fedpeft.federation.kinds import by_quant
from fedpeft.federation.metrics import as_metrics
from fedpeft.federation.state import checkpoint_path, load_checkpoint
from fedpeft.model.adapters import check_fingerprint, read_adapter
from fedpeft.model.base import load_base
from tests.federation.test_loop import _cfg, _run, users  # noqa: F401  (users: the module's fixture)


def _mixed(users: Path, cache_dir: str, **fed) -> RunConfig:  # noqa: F811
    return _cfg(users, cache_dir, clients=4, fraction=1.0, rounds=2, client_quants=("bf16", "nf4"), **fed)


def test_client_quants_are_checked() -> None:
    cfg = RunConfig()
    for fed, message in (
        ({"client_quants": ("nf4", "fp8")}, "--client-quants takes"),
        ({"client_quants": ("nf4", "bf16"), "lora_mode": "sb"}, "drop --client-quants"),
        ({"client_quants": ("nf4", "bf16"), "clients_per_actor": 2}, "lockstep group shares one base"),
    ):
        with pytest.raises(FedpeftError, match=message):
            validate(replace(cfg, federation=replace(cfg.federation, **fed)))


def test_nf4_and_bf16_devices_federate_each_kind_is_reported_and_secure_equals_plain(
    tmp_path: Path,
    users: Path,  # noqa: F811
    cache_dir: str,
    tiny_path: Path,
) -> None:
    cfg = _mixed(users, cache_dir)
    _run(cfg, tmp_path / "plain")
    # one process simulated both kinds of device: it kept one base of each, not one reloaded per client
    assert sorted(k[0].base.quant for k in runtime._DEVICES) == ["bf16", "nf4"]
    _run(replace(cfg, federation=replace(cfg.federation, secagg=True, secagg_k=2)), tmp_path / "secure")
    plain, secure = (load_checkpoint(checkpoint_path(tmp_path / r, 2)) for r in ("plain", "secure"))
    zero, last = plain.history[0], plain.history[-1]
    assert zero["quants"] == {"user0": "bf16", "user1": "nf4", "user2": "bf16", "user3": "nf4"}
    assert all(len(h["accepted"]) == 4 and not h.get("rejected") for h in plain.history[1:])
    assert last["eval_ppl"] < zero["eval_ppl"]
    groups = by_quant([as_metrics(h) for h in plain.history])
    assert sorted(groups) == ["bf16", "nf4"] and all(g["clients"] == 2 for g in groups.values())
    assert all(g["ppl"] < g["ppl_start"] for g in groups.values())
    # under SecAgg+ the same sum within its rounding: compared after round 1, before round 2's training
    # amplifies that rounding through AdamW's normalized steps
    plain1, secure1 = (load_checkpoint(checkpoint_path(tmp_path / r, 1)) for r in ("plain", "secure"))
    for k, v in plain1.arrays.items():
        np.testing.assert_allclose(secure1.arrays[k], v, atol=1e-7)
    assert secure.history[-1]["eval_ppl"] == pytest.approx(plain.history[-1]["eval_ppl"], rel=1e-4)

    # the global adapter names the shared source weights: every quantization of them loads it, no other base
    files = read_adapter(tmp_path / "plain" / "global")
    nf4, fp32 = (load_base(BaseConfig(model="tiny", quant=q, cache_dir=cache_dir)) for q in ("nf4", "none"))
    assert files.fingerprint == nf4.source == fp32.source
    check_fingerprint(files.fingerprint, nf4, "global adapter")
    check_fingerprint(files.fingerprint, fp32, "global adapter")
    with pytest.raises(FedpeftError, match="another base"):
        check_fingerprint(files.fingerprint, replace(fp32, source="0" * 64), "global adapter")


def test_a_device_stores_the_base_as_it_chooses_except_under_fed_sb(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord, RecordDict

    from fedpeft.config.files import to_run_config
    from fedpeft.config.node import DeviceConfig
    from fedpeft.device.tasks import config_for

    def sent(mode: str) -> RecordDict:
        cfg = RunConfig(base=BaseConfig(quant="bf16"))
        cfg = replace(cfg, federation=replace(cfg.federation, lora_mode=mode))
        return RecordDict({"config": ConfigRecord(to_run_config(cfg))})

    node = DeviceConfig(data_path=str(tmp_path), quant="nf4")
    assert config_for(sent("fedavg"), node).base.quant == "nf4"
    assert config_for(sent("fedavg"), DeviceConfig(data_path=str(tmp_path))).base.quant == "bf16"
    with pytest.raises(FedpeftError, match="drop --quant"):
        config_for(sent("sb"), node)
