"""fedpeft's console log: lines go through tqdm's own write, so a warning printed while a progress bar is
on screen lands above the bar instead of inside its line."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("fedpeft")


class BarSafeHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

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


def show_bars(progress: bool) -> bool:
    """Progress bars only on a terminal: written to a log file or a pipe, each redraw of a bar is one more
    carriage-return line of noise. The lines printed after each round stay."""
    return progress and sys.stderr.isatty()
