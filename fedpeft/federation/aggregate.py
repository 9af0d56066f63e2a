"""Aggregation as pure functions over named arrays and weights.

Every mode uses only the weighted *sum* of the clients' deltas and the total weight, so secure
aggregation (which reveals only a sum) composes with each of them.

- fedavg on LoRA averages A and B separately. The mean of the products B_i A_i is not the product
  of the means, so this is an approximation of "averaging the fine-tuned weight updates"
  (discussed in FFA-LoRA, Sun et al., ICLR 2024, and FedSA-LoRA, Guo et al., ICLR 2025).
- ffa (FFA-LoRA): A is frozen at a seeded init shared by all clients; only B is trained and sent,
  so mean(B_i) A = mean(B_i A): exact.
- IA3 vectors enter the layer linearly (an elementwise scale), so averaging them is exact too.
- Server optimizers treat the mean delta as a pseudo-gradient (Reddi et al., "Adaptive Federated
  Optimization", ICLR 2021, Algorithm 2): FedAvgM (Hsu et al. 2019), FedAdam, FedYogi.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpeft.config.tree import SERVER_OPTS, ServerOptConfig

Arrays = dict[str, np.ndarray]

DEFAULT_SERVER_LR: dict[str, float] = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 1e-3, "fedyogi": 1e-3}


def weighted_sum(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """sum_i w_i * u_i per name, accumulated in float64 in the given order. All updates need the same keys."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    keys = list(updates[0])
    for u in updates[1:]:
        if list(u) != keys:
            raise ValueError("updates have different keys")
    out = {k: np.zeros(updates[0][k].shape, dtype=np.float64) for k in keys}
    for u, w in zip(updates, weights, strict=True):
        for k in keys:
            out[k] += float(w) * u[k].astype(np.float64)
    return out


def divide(total: Arrays, weight: float) -> Arrays:
    """The mean from a sum and a total weight (what secure aggregation hands the server), as float32."""
    if weight <= 0:
        raise ValueError(f"total weight must be positive, got {weight}")
    return {k: (v / weight).astype(np.float32) for k, v in total.items()}


def weighted_mean(updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    return divide(weighted_sum(updates, weights), float(sum(weights)))


def server_update(
    global_arrays: Arrays, mean_delta: Arrays, cfg: ServerOptConfig, state: Arrays
) -> tuple[Arrays, Arrays]:
    """One server step x <- x + step(mean delta). Returns (new global, new optimizer state); pure.

    `state` holds the optimizer moments under "m/<name>" and "v/<name>" (empty at round 1), so it
    checkpoints as named arrays like everything else. Only names in `mean_delta` move.
    """
    if cfg.name not in SERVER_OPTS:
        raise ValueError(f"unknown server optimizer {cfg.name!r}")
    lr = DEFAULT_SERVER_LR[cfg.name] if cfg.lr is None else cfg.lr
    new_global = {k: v.copy() for k, v in global_arrays.items()}
    new_state: Arrays = {}
    for k, d in mean_delta.items():
        d = d.astype(np.float64)
        if cfg.name == "fedavg":
            step = d
        elif cfg.name == "fedavgm":
            m = cfg.momentum * state.get(f"m/{k}", np.zeros_like(d)) + d
            new_state[f"m/{k}"] = m
            step = m
        else:
            m = cfg.beta1 * state.get(f"m/{k}", np.zeros_like(d)) + (1 - cfg.beta1) * d
            v_prev = state.get(f"v/{k}", np.full_like(d, cfg.tau**2))
            d2 = d * d
            if cfg.name == "fedadam":
                v = cfg.beta2 * v_prev + (1 - cfg.beta2) * d2
            else:  # Yogi (Zaheer et al., NeurIPS 2018): additive, sign-controlled second moment
                v = v_prev - (1 - cfg.beta2) * d2 * np.sign(v_prev - d2)
            new_state[f"m/{k}"], new_state[f"v/{k}"] = m, v
            step = m / (np.sqrt(v) + cfg.tau)
        new_global[k] = (global_arrays[k].astype(np.float64) + lr * step).astype(global_arrays[k].dtype)
    return new_global, new_state
