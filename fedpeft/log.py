"""fedpeft's console log: lines go through tqdm's own write, so a warning printed while a progress bar is
on screen lands above the bar instead of inside its line."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

log = logging.getLogger("fedpeft")


class BarSafeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm  # tqdm.auto (it imports asyncio): off the CLI's start-up path

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler: a broken console must not stop the run
            self.handleError(record)


def setup_console() -> None:
    """One "fedpeft: ..." handler on the fedpeft logger (once per process), at INFO."""
    if not any(isinstance(h, BarSafeHandler) for h in log.handlers):
        handler = BarSafeHandler()
        handler.setFormatter(logging.Formatter("fedpeft: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def quiet_environment() -> None:
    """Read at import time by Flower, transformers and Python in Ray's worker processes, which inherit it."""
    for key, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("PYTHONWARNINGS", "ignore"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"),
    ):
        os.environ.setdefault(key, value)


def quiet_libraries() -> None:
    """Library noise off in a process that loads a model: the environment above, transformers' warnings."""
    quiet_environment()
    import transformers  # transformers: only commands that load a model quiet it

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def show_bars(progress: bool) -> bool:
    """Progress bars only on a terminal: written to a log file or a pipe, each redraw of a bar is one more
    carriage-return line of noise. The lines printed after each round stay."""
    return progress and sys.stderr.isatty()


class Waiting:
    """Progress of one long wait (an evaluation pass, the server's wait for replies): a tqdm bar on a terminal,
    shown only once the wait passes `delay` seconds; elsewhere (a log file, a pipe, a Ray actor) a log line
    after `first` seconds and then every `every` seconds with what is done and the rate. `total` and
    update() count `unit`s (tokens, blocks). Used as a context manager; `enabled` False shows nothing."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "tokens",
        enabled: bool = True,
        delay: float = 2.0,
        first: float = 10.0,
        every: float = 30.0,
    ) -> None:
        from tqdm.auto import tqdm  # tqdm.auto (it imports asyncio): off the CLI's start-up path

        self.desc, self.total, self.unit, self.every, self.done = desc, total, unit, every, 0
        self._clock = time.monotonic
        self._start = self._clock()
        self._next = self._start + first
        self._lines = enabled and not sys.stderr.isatty()
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=desc, unit=unit, delay=delay, leave=False, unit_scale=True)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._lines and (now := self._clock()) >= self._next:
            self._next = now + self.every
            log.info("%s", self.line(now - self._start))

    def line(self, elapsed: float) -> str:
        """`evaluating: 1,024 of 34,187 tokens (3%) in 30 s, 34 tokens/s`."""
        rate = self.done / max(elapsed, 1e-9)
        shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
        of = f" of {self.total:,}" if self.total else ""
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        return f"{self.desc}: {self.done:,}{of} {self.unit}{share} in {elapsed:.0f} s, {shown} {self.unit}/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Waiting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
