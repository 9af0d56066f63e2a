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
