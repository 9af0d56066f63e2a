"""The federation's clients, tokenized when they are used.

A simulation samples a few of its virtual clients a round, yet every actor held every client's token
blocks: memory grew with the number of clients (benchmarks/README.md, federation scale). `Clients` keeps
only what forms each client (its raw text or examples, or, for a split of text blocks among clients, the
corpus's tokens packed once into one array) and tokenizes a client when it is asked for, keeping the last
KEEP it made. A client's data is the same however often it is remade: tokenization is deterministic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np
import torch

from fedpeft.data.blocks import UserData

# Clients kept tokenized: a round's sampled clients on one actor, a lockstep group and the evaluation that
# follows; beyond that a client is remade (milliseconds of tokenization, next to seconds of training).
KEEP = 64


class Clients(Sequence[UserData]):
    """A sequence of clients whose data `make(i)` forms on demand; `users` and `train_tokens` are known
    without tokenizing (registration and the FedAvg weights ask for them)."""

    def __init__(
        self,
        users: Sequence[str],
        make: Callable[[int], UserData],
        train_tokens: Sequence[int] | None = None,
        keep: int = KEEP,
    ) -> None:
        self.users = list(users)
        self._make = make
        self._tokens = list(train_tokens) if train_tokens is not None else None
        self._keep = keep
        self._made: OrderedDict[int, UserData] = OrderedDict()

    @classmethod
    def of(cls, datas: Sequence[UserData]) -> Clients:
        """Clients already tokenized (a device's own data, tests): nothing to remake, nothing evicted."""
        held = list(datas)
        return cls([d.user for d in held], held.__getitem__, [d.train_tokens for d in held], keep=len(held))

    def __len__(self) -> int:
        return len(self.users)

    @overload
    def __getitem__(self, i: int) -> UserData: ...
    @overload
    def __getitem__(self, i: slice) -> list[UserData]: ...
    def __getitem__(self, i: int | slice) -> UserData | list[UserData]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"client {i} of {len(self)}")
        i %= len(self)
        data = self._made.get(i)
        if data is None:
            data = self._made[i] = self._make(i)
            while len(self._made) > self._keep:
                self._made.popitem(last=False)
        else:
            self._made.move_to_end(i)
        return data

    def __iter__(self) -> Iterator[UserData]:
        return (self[i] for i in range(len(self)))

    @property
    def held(self) -> int:
        """How many clients are held tokenized now (at most `keep`)."""
        return len(self._made)

    def tokens(self, i: int) -> int:
        """Client i's training tokens, without tokenizing it where the plan knows them."""
        return self._tokens[i] if self._tokens is not None else self[i].train_tokens

    def map(self, change: Callable[[UserData], UserData]) -> Clients:
        """These clients with `change` applied to each as it is made (a personal validation split); the
        training tokens are counted again after the change."""
        return Clients(self.users, lambda i: change(self._make(i)), None, self._keep)


class PackedBlocks:
    """Token blocks of a whole corpus in one int32 array: a split that deals blocks among clients keeps the
    corpus once, whatever the number of clients, instead of one tensor object per block."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._lengths: list[int] = []
        self.starts = np.zeros(1, np.int64)
        self.tokens = np.zeros(0, np.int32)

    def add(self, blocks: Sequence[torch.Tensor]) -> None:
        """One user's blocks, packed at once (one array per user while the corpus is read)."""
        if blocks:
            self._parts.append(torch.cat(list(blocks)).to(torch.int32).numpy())
            self._lengths += [len(b) for b in blocks]

    def close(self) -> PackedBlocks:
        self.tokens = np.concatenate(self._parts) if self._parts else np.zeros(0, np.int32)
        self.starts = np.concatenate([[0], np.cumsum(np.array(self._lengths, np.int64))])
        self._parts, self._lengths = [], []
        return self

    def __len__(self) -> int:
        return len(self.starts) - 1

    def take(self, index: Sequence[int]) -> list[torch.Tensor]:
        """Blocks `index`, as the long tensors training takes."""
        return [torch.from_numpy(self.tokens[self.starts[j] : self.starts[j + 1]]).long() for j in index]
