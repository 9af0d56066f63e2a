"""Console log lines go through the progress bar's own write."""

import sys

import pytest
from tqdm import tqdm

from fedpeft.log import log, setup_console


def test_a_log_line_is_written_above_an_open_progress_bar(capsys: pytest.CaptureFixture) -> None:
    setup_console()
    setup_console()  # idempotent: one handler, one line per message
    bar = tqdm(total=3, desc="rounds", file=sys.stderr)
    bar.update(1)
    log.warning("round 1: refused ann: schema differs")
    bar.close()
    err = capsys.readouterr().err
    assert err.count("fedpeft: round 1: refused ann") == 1
    before = err[: err.index("fedpeft: round 1")]
    # the bar's line was cleared first (a plain handler would append the message to "... 1/3 [...]")
    assert before.endswith(("\r", "\n")), repr(before[-40:])


class Clock:
    """time.monotonic that moves `step` seconds at each call: a slow wait without waiting."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_long_wait_on_a_non_terminal_logs_what_is_done_and_the_rate(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from fedpeft.log import Waiting

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(time, "monotonic", Clock(6.0))
    with caplog.at_level("INFO", logger="fedpeft"), Waiting("evaluating", 1000, "tokens") as wait:
        for _ in range(10):
            wait.update(100)
    lines = [r.getMessage() for r in caplog.records]
    # the first line after 10 s, then one every 30 s: not one per update
    assert 1 < len(lines) < 5, lines
    assert lines[0].startswith("evaluating: 200 of 1,000 tokens (20%) in 12 s, 17 tokens/s"), lines[0]


def test_a_quick_wait_and_a_quiet_one_log_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from fedpeft.log import Waiting

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(time, "monotonic", Clock(0.1))
    with caplog.at_level("INFO", logger="fedpeft"):
        with Waiting("evaluating", 10) as wait:
            wait.update(10)
        monkeypatch.setattr(time, "monotonic", Clock(60.0))
        with Waiting("evaluating", 10, enabled=False) as wait:
            wait.update(10)
    assert caplog.records == []


def test_a_slow_evaluation_says_how_far_it_got(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, cache_dir: str, tiny_path
) -> None:
    import time

    import torch

    from fedpeft.config.tree import AdapterConfig, BaseConfig
    from fedpeft.model.adapters import inject
    from fedpeft.model.base import load_base
    from fedpeft.training.local import evaluate

    base = load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir))
    model = inject(base, AdapterConfig())
    blocks = [torch.randint(0, 256, (33,), generator=torch.Generator().manual_seed(i)) for i in range(32)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(time, "monotonic", Clock(20.0))  # each batch of 8 blocks "takes" 20 s
    with caplog.at_level("INFO", logger="fedpeft"):
        result = evaluate(model, blocks, 0, base.compute, batch_size=8, desc="evaluating the base")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating the base")]
    assert lines and f"of {result.tokens:,} tokens" in lines[0] and "tokens/s" in lines[0]
