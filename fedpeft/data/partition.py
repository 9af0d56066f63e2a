"""Split a corpus into N federated clients: natural (one user each), IID, or Dirichlet over labels.

Client i is always the i-th entry of the returned list, so ids are stable across runs for the same
data, split, N and seed. Held-out blocks follow the same split as the training blocks, so each
client is evaluated on text from its own distribution.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.config.tree import SPLITS, DataConfig
from fedpeft.data.blocks import UserData, fit_note, tokenize_user
from fedpeft.data.clients import Clients, PackedBlocks
from fedpeft.data.users import UserText, load_users
from fedpeft.errors import FedpeftError, TooLittleData, require

log = logging.getLogger("fedpeft")

DIRICHLET_DRAWS = 1000  # redraws allowed until every client gets training and held-out text


@dataclass(frozen=True)
class _Usable:
    """What choosing the natural split's users needs of a user, without keeping its blocks."""

    text: UserText
    train_tokens: int
    truncated: int
    dropped: int


def _usable(cfg: DataConfig, tokenizer: Any, users: list[UserText]) -> Iterator[tuple[UserText, UserData]]:
    """The users with enough text, each with its blocks, one at a time: the caller keeps what it needs."""
    for u in users:
        try:
            yield u, tokenize_user(u, tokenizer, cfg)
        except TooLittleData:  # too little text: such a user cannot be a client on its own
            continue


def partition(
    cfg: DataConfig, tokenizer: Any, n: int, split: str = "natural", alpha: float = 0.5, seed: int = 0
) -> Clients:
    """N clients' data, tokenized as each is used (fedpeft.data.clients). natural: the N users with the most
    text (sorted by id); iid: all blocks shuffled and dealt evenly; dirichlet: per label, block shares drawn
    from Dir(alpha) (Hsu et al. 2019)."""
    if split not in SPLITS:
        raise FedpeftError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 1:
        raise FedpeftError(f"--clients must be at least 1, got {n}")
    corpus = load_users(cfg)
    if split != "natural" and corpus[0].examples:
        return _split_examples(cfg, tokenizer, corpus, n, split, alpha, seed)
    if split == "natural":
        usable = [
            _Usable(u, d.train_tokens, d.truncated, d.dropped) for u, d in _usable(cfg, tokenizer, corpus)
        ]
        return _natural(cfg, tokenizer, usable, n)
    train_blocks, held_blocks = PackedBlocks(), PackedBlocks()
    labels: list[str | None] = []  # per usable user
    t_labels: list[str | None] = []  # per block
    e_labels: list[str | None] = []
    for u, data in _usable(cfg, tokenizer, corpus):
        train_blocks.add(data.train)
        held_blocks.add(data.eval)
        labels.append(u.label)
        t_labels += [u.label] * len(data.train)
        e_labels += [u.label] * len(data.eval)
    train_blocks.close()
    held_blocks.close()
    t_own, e_own = _owners(cfg, labels, t_labels, e_labels, n, split, alpha, seed)
    counts = np.bincount(t_own, minlength=n), np.bincount(e_own, minlength=n)
    empty = [i for i in range(n) if not counts[0][i] or not counts[1][i]]
    if empty:
        raise FedpeftError(
            f"{len(empty)} of {n} clients get no text under the {split} split "
            f"(e.g. {split}-{empty[0]:03d}{f' in {DIRICHLET_DRAWS} draws' if split == 'dirichlet' else ''}); "
            f"use fewer --clients{' or a larger --dirichlet-alpha' if split == 'dirichlet' else ''}"
        )
    # a client's blocks in corpus order: a stable sort by owner, cut where each owner's blocks end
    t_order, e_order = np.argsort(t_own, kind="stable"), np.argsort(e_own, kind="stable")
    t_cut, e_cut = (np.concatenate([[0], np.cumsum(c)]) for c in counts)
    lengths = np.diff(train_blocks.starts)

    def make(i: int) -> UserData:
        return UserData(
            f"{split}-{i:03d}",
            train_blocks.take(t_order[t_cut[i] : t_cut[i + 1]]),
            held_blocks.take(e_order[e_cut[i] : e_cut[i + 1]]),
        )

    tokens = np.bincount(t_own, weights=lengths, minlength=n).astype(int).tolist()
    return Clients([f"{split}-{i:03d}" for i in range(n)], make, tokens)


def _owners(
    cfg: DataConfig,
    labels: list[str | None],
    t_labels: list[str | None],
    e_labels: list[str | None],
    n: int,
    split: str,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Which client gets each training and each held-out block."""
    rng = np.random.default_rng([seed, 1234])
    if split == "iid":
        return rng.permutation(len(t_labels)) % n, rng.permutation(len(e_labels)) % n
    if not labels or any(label is None for label in labels):
        raise FedpeftError(f"a Dirichlet split needs labelled users; {cfg.data} has none")
    t_own, e_own = np.empty(len(t_labels), int), np.empty(len(e_labels), int)
    # A small alpha leaves some clients without any block; draw again, as NIID-Bench does (Li et al.,
    # ICDE 2022: redraw until every party has a minimum of samples). The first draw is kept when it
    # already gives every client text, so such splits are unchanged.
    for _ in range(DIRICHLET_DRAWS):
        for label in sorted(set(labels)):
            shares = rng.dirichlet(np.full(n, alpha))
            for items, own in ((t_labels, t_own), (e_labels, e_own)):
                idx = rng.permutation([i for i, lab in enumerate(items) if lab == label])
                cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                for client, part in enumerate(np.split(idx, cuts)):
                    own[part] = client
        if len(set(t_own.tolist())) == n and len(set(e_own.tolist())) == n:
            break
    return t_own, e_own


def _natural(cfg: DataConfig, tokenizer: Any, users: list[_Usable], n: int) -> Clients:
    """The N users with the most training tokens, sorted by id."""
    if len(users) < n:
        raise FedpeftError(
            f"only {len(users)} users in {cfg.data} have enough text for a client; asked for {n}"
        )
    chosen = sorted(users, key=lambda u: (-u.train_tokens, u.text.user))[:n]
    chosen.sort(key=lambda u: u.text.user)
    _note(cfg, sum(u.truncated for u in chosen), sum(u.dropped for u in chosen))
    return Clients(
        [u.text.user for u in chosen],
        lambda i: tokenize_user(chosen[i].text, tokenizer, cfg),
        [u.train_tokens for u in chosen],
    )


def _note(cfg: DataConfig, truncated: int, dropped: int) -> None:
    note = fit_note(truncated, dropped, cfg)
    if note:
        log.warning("%s", note)


def _split_examples(
    cfg: DataConfig, tokenizer: Any, users: list[UserText], n: int, split: str, alpha: float, seed: int
) -> Clients:
    """Task examples of every user dealt to N clients by Flower Datasets' partitioners: IID (the examples
    shuffled with the seed, then cut in N) or Dirichlet over the labels (DirichletPartitioner, which
    redraws until every client holds --min-examples). Each client then holds out its own tail."""
    # datasets, flwr_datasets: only splitting examples needs them (fedpeft.data.records.read_table); the
    # latter is not in a device's install
    require("flwr_datasets", "simulation", "splitting examples among clients")
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    examples = [e for u in users for e in u.examples]
    if split == "dirichlet" and any(e.label is None for e in examples):
        raise FedpeftError(f"a Dirichlet split needs labeled examples (--label-column); {cfg.data} has none")
    table = datasets.Dataset.from_dict(
        {"i": list(range(len(examples))), "label": [e.label or "" for e in examples]}
    )
    if split == "iid":
        part: Any = IidPartitioner(num_partitions=n)
        table = table.shuffle(seed=seed).flatten_indices()
    else:
        part = DirichletPartitioner(n, "label", alpha, min_partition_size=cfg.min_examples, seed=seed)
    part.dataset = table
    try:
        dealt = [part.load_partition(i)["i"] for i in range(n)]
    except ValueError as e:  # the Dirichlet draws never gave every client enough examples
        raise FedpeftError(
            f"the {split} split of {len(examples)} examples into {n} clients failed ({e}); use fewer --clients or a larger alpha"
        ) from None
    texts = [
        UserText(f"{split}-{i:03d}", "", examples=tuple(examples[j] for j in idx), labels=users[0].labels)
        for i, idx in enumerate(dealt)
    ]
    tokens, truncated, dropped = [], 0, 0
    for user in texts:  # each client once now: one with too few examples stops the run before it starts
        data = tokenize_user(user, tokenizer, cfg)
        tokens.append(data.train_tokens)
        truncated, dropped = truncated + data.truncated, dropped + data.dropped
    _note(cfg, truncated, dropped)
    return Clients([u.user for u in texts], lambda i: tokenize_user(texts[i], tokenizer, cfg), tokens)
