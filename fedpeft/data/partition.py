"""Split a corpus into N federated clients: natural (one user each), IID, or Dirichlet over labels.

Client i is always the i-th entry of the returned list, so ids are stable across runs for the same
data, split, N and seed. Held-out blocks follow the same split as the training blocks, so each
client is evaluated on text from its own distribution.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from fedpeft.config.tree import SPLITS, DataConfig
from fedpeft.data.blocks import UserData, fit_note, tokenize_user
from fedpeft.data.users import UserText, load_users
from fedpeft.errors import FedpeftError, TooLittleData, require

log = logging.getLogger("fedpeft")

DIRICHLET_DRAWS = 1000  # redraws allowed until every client gets training and held-out text


def _usable(cfg: DataConfig, tokenizer: Any, users: list[UserText]) -> list[tuple[UserData, str | None]]:
    out = []
    for u in users:
        try:
            out.append((tokenize_user(u, tokenizer, cfg), u.label))
        except TooLittleData:  # too little text: such a user cannot be a client on its own
            continue
    return out


def _deal(blocks: list, owners: np.ndarray, n: int) -> list[list]:
    return [[b for b, o in zip(blocks, owners, strict=True) if o == i] for i in range(n)]


def partition(
    cfg: DataConfig, tokenizer: Any, n: int, split: str = "natural", alpha: float = 0.5, seed: int = 0
) -> list[UserData]:
    """N clients' data. natural: the N users with the most text (sorted by id); iid: all blocks shuffled and
    dealt evenly; dirichlet: per label, block shares drawn from Dir(alpha) (Hsu et al. 2019)."""
    if split not in SPLITS:
        raise FedpeftError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if n < 1:
        raise FedpeftError(f"--clients must be at least 1, got {n}")
    corpus = load_users(cfg)
    if split != "natural" and corpus[0].examples:
        clients = _split_examples(cfg, tokenizer, corpus, n, split, alpha, seed)
        _note(cfg, clients)
        return clients
    users = _usable(cfg, tokenizer, corpus)
    if split == "natural":
        return _natural(cfg, users, n)

    rng = np.random.default_rng([seed, 1234])
    train = [(b, label) for d, label in users for b in d.train]
    held = [(b, label) for d, label in users for b in d.eval]
    if split == "iid":
        t_own = rng.permutation(len(train)) % n
        e_own = rng.permutation(len(held)) % n
    else:
        labels = sorted({label for _, label in users if label is not None})
        if not labels or any(label is None for _, label in users):
            raise FedpeftError(f"a Dirichlet split needs labelled users; {cfg.data} has none")
        t_own, e_own = np.empty(len(train), int), np.empty(len(held), int)
        # A small alpha leaves some clients without any block; draw again, as NIID-Bench does (Li et al.,
        # ICDE 2022: redraw until every party has a minimum of samples). The first draw is kept when it
        # already gives every client text, so such splits are unchanged.
        for _ in range(DIRICHLET_DRAWS):
            for label in labels:
                shares = rng.dirichlet(np.full(n, alpha))
                for items, own in ((train, t_own), (held, e_own)):
                    idx = rng.permutation([i for i, (_, lab) in enumerate(items) if lab == label])
                    cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
                    for client, part in enumerate(np.split(idx, cuts)):
                        own[part] = client
            if len(set(t_own.tolist())) == n and len(set(e_own.tolist())) == n:
                break
    clients = [
        UserData(f"{split}-{i:03d}", t, e)
        for i, (t, e) in enumerate(
            zip(_deal([b for b, _ in train], t_own, n), _deal([b for b, _ in held], e_own, n), strict=True)
        )
    ]
    empty = [c.user for c in clients if not c.train or not c.eval]
    if empty:
        raise FedpeftError(
            f"{len(empty)} of {n} clients get no text under the {split} split "
            f"(e.g. {empty[0]}{f' in {DIRICHLET_DRAWS} draws' if split == 'dirichlet' else ''}); "
            "use fewer --clients or a larger Dirichlet alpha"
        )
    return clients


def _natural(cfg: DataConfig, users: list[tuple[UserData, str | None]], n: int) -> list[UserData]:
    """The N users with the most training tokens, sorted by id."""
    if len(users) < n:
        raise FedpeftError(
            f"only {len(users)} users in {cfg.data} have enough text for a client; asked for {n}"
        )
    chosen = sorted(users, key=lambda x: (-x[0].train_tokens, x[0].user))[:n]
    _note(cfg, [d for d, _ in chosen])
    return sorted((d for d, _ in chosen), key=lambda d: d.user)


def _note(cfg: DataConfig, clients: list[UserData]) -> None:
    note = fit_note(clients, cfg)
    if note:
        log.warning("%s", note)


def _split_examples(
    cfg: DataConfig, tokenizer: Any, users: list[UserText], n: int, split: str, alpha: float, seed: int
) -> list[UserData]:
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
    clients = []
    for i, idx in enumerate(dealt):
        user = UserText(
            f"{split}-{i:03d}", "", examples=tuple(examples[j] for j in idx), labels=users[0].labels
        )
        clients.append(tokenize_user(user, tokenizer, cfg))  # a client with too few examples stops the run
    return clients
