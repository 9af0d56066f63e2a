"""Every `fedpeft` command written in the docs holds against the real command line: each flag exists for its
command and each value passes the config tree's checks, so a renamed flag or a changed choice fails here, named by
its doc line, and not for a reader. Nothing runs: argparse, the tree's checks, `--print-config` and the commands'
own side-effect-free refusals only. Also: the README's two commands are the ones CI runs."""

from __future__ import annotations

import argparse
import re
import shlex
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpeft import cli
from fedpeft.config.flags import command_fields, config_from_args, field_value, local_section, require_out
from fedpeft.config.learning import FEDERATION
from fedpeft.config.local import local_fields

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = ("bash", "sh", "")
PROGRAMS = ("fedpeft", ".venv/bin/fedpeft")
SEPARATORS = ("&&", "||", ";", "|")
REDIRECT = re.compile(r"^[12]?>>?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# the lines worth splitting: a bare fence holds diagrams too
MENTION = re.compile(r"(^|[\s;&|])(\.venv/bin/)?fedpeft\s")
PLACEHOLDER = re.compile(r"<([A-Za-z_-]+)>")  # runs/federation-<time>: checked as runs/federation-time
# Commands whose `...` stands for flags written out elsewhere: each flag named must exist for the command and
# each value given pass its checks, but the command is not parsed whole (its required flags are elided). A new
# line with `...` fails until it is listed here, with its reason.
ELIDED = {
    "fedpeft client ... --store ~/.fedpeft-store": "the connection flags are docs/deployment.md's client line",
    "fedpeft client ... --dp-min-local-noise 0.3": "the connection flags are docs/deployment.md's client line",
}
# Commands whose code builds the run config from the flags (config_from_args): the same check here.
RUN_CONFIG = ("train", "eval", "serve", *FEDERATION)


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/x.md:12": the doc line the command starts on
    text: str  # as written, comment stripped
    argv: tuple[str, ...]  # after the program name
    writes: str | None  # the file a `> FILE` redirect writes


def _shell_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, logical line) of every line inside a bash/sh/bare fenced block, `\\` continuations
    joined."""
    lines = path.read_text().splitlines()
    fence: str | None = None
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
        elif fence in SHELL_FENCES:
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            yield start + 1, line
        i += 1


def _segments(tokens: list[str]) -> Iterator[list[str]]:
    """The simple commands of a shell line: `a && b | c` -> a, b, c."""
    current: list[str] = []
    for t in tokens:
        if t in SEPARATORS:
            yield current
            current = []
        else:
            current.append(t)
    yield current


def _command(where: str, tokens: list[str]) -> DocCommand | None:
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens or tokens[0] not in PROGRAMS:
        return None
    argv, writes, i = [], None, 1
    while i < len(tokens):
        if REDIRECT.match(tokens[i]) and i + 1 < len(tokens):
            writes, i = tokens[i + 1], i + 2
            continue
        argv.append(tokens[i])
        i += 1
    return DocCommand(where, " ".join(tokens), tuple(argv), writes)


def collect() -> list[DocCommand]:
    found = []
    for path in DOCS:
        for number, line in _shell_lines(path):
            if not MENTION.search(line):
                continue
            where = f"{path.relative_to(ROOT)}:{number}"
            try:
                tokens = shlex.split(PLACEHOLDER.sub(r"\1", line), comments=True)
            except ValueError as e:  # an unclosed quote: name the line, not just the collection error
                raise ValueError(f"{where}: {e}") from None
            for segment in _segments(tokens):
                if (c := _command(where, segment)) is not None:
                    found.append(c)
    seen: dict[str, int] = {}
    for i, c in enumerate(found):  # two commands on one line: README.md:10#2
        seen[c.where] = seen.get(c.where, 0) + 1
        if seen[c.where] > 1:
            found[i] = DocCommand(f"{c.where}#{seen[c.where]}", c.text, c.argv, c.writes)
    return found


COMMANDS = collect()
WHOLE = [c for c in COMMANDS if "..." not in c.argv]
ELIDED_FOUND = [c for c in COMMANDS if "..." in c.argv]


def _parse(argv: list[str], *, required: bool = True) -> argparse.Namespace:
    """The real parser's namespace; a failure names the flag argparse refused (it exits 2 on its own)."""
    parser = cli._build_parser()
    if not required:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for action in sub.choices[argv[0]]._actions:
            action.required = False
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"argparse refused it (exit {e.code})")


def _check_fields(args: argparse.Namespace) -> None:
    """Every flag typed, parsed and range-checked by the tree, as the commands read it."""
    for f in command_fields():
        flag = f.meta["flag"]
        if flag and args.command in f.commands and hasattr(args, flag.lstrip("-").replace("-", "_")):
            field_value(args, f.key)


def _check_command(args: argparse.Namespace) -> None:
    """What the command checks before it does anything: its local sections, its run config, its
    refusals that touch nothing."""
    command = args.command
    local = {f.section for f in local_fields() if f.meta["flag"] and command in f.commands}
    sections = {s: local_section(args, command, s) for s in sorted(local)}
    if command in RUN_CONFIG:
        config_from_args(args, command)
    if command in ("server", "deploy-local"):
        require_out(args)
    if command == "certs":
        from fedpeft.deploy.certs import client_names  # cryptography: only this check needs it

        client_names(sections["certs"].clients)
    if command == "serve":
        from fedpeft.serve.command import _check_network

        _check_network(sections["serve"])
    if command == "export":
        cli.check_out(Path(sections["export"].out), Path(args.adapter_dir))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working folder with the repo's ready federations; main() leaves no handler or quieting behind."""
    (tmp_path / "simulations").symlink_to(ROOT / "simulations")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "quiet_libraries", lambda: None)  # transformers: nothing here loads a model
    term = signal.getsignal(signal.SIGTERM)
    yield tmp_path
    signal.signal(signal.SIGTERM, term)


def _print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    code = cli.main(argv if "--print-config" in argv else [*argv, "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _line(where: str) -> tuple[str, int]:
    path, number = where.split("#")[0].split(":")
    return path, int(number)


def _writer(doc: DocCommand, name: str) -> DocCommand | None:
    """The command above `doc` in its own page that writes `name` (`--print-config > my.toml`)."""
    path, number = _line(doc.where)
    above = [
        c for c in COMMANDS if c.writes == name and _line(c.where)[0] == path and _line(c.where)[1] < number
    ]
    return above[-1] if above else None


def _missing_files(doc: DocCommand, tmp: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Write the config files the page made above (`--print-config > my.toml`); name those nobody made."""
    missing = []
    for flag, value in zip(doc.argv, doc.argv[1:], strict=False):
        if flag == "--config" and not (tmp / value).exists():
            if (writer := _writer(doc, value)) is not None:
                (tmp / value).write_text(_print_config(list(writer.argv), capsys))
            else:
                missing.append(value)
    return missing


def test_docs_show_every_command() -> None:
    sub = next(a for a in cli._build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.argv[0] for c in COMMANDS} == set(sub.choices)


@pytest.mark.parametrize("doc", WHOLE, ids=[c.where for c in WHOLE])
def test_doc_command(doc: DocCommand, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = list(doc.argv)
    if "--help" in argv or "-h" in argv:
        with pytest.raises(SystemExit) as e:
            cli._build_parser().parse_args(argv)
        assert e.value.code == 0
        return
    args = _parse(argv)
    _check_fields(args)
    if _missing_files(doc, in_tmp, capsys):
        return  # a file of the reader's own: the flags parse and check, the file cannot be read here
    _check_command(args)
    if args.command in FEDERATION:
        _print_config(argv, capsys)  # the whole config tree through main(), validated as the command would


def test_elided_commands_are_listed() -> None:
    assert sorted(c.text for c in ELIDED_FOUND) == sorted(ELIDED), "a new `...` line: list it in ELIDED"


@pytest.mark.parametrize("doc", ELIDED_FOUND, ids=[c.where for c in ELIDED_FOUND])
def test_elided_command_flags(doc: DocCommand) -> None:
    args = _parse([a for a in doc.argv if a != "..."], required=False)
    _check_fields(args)


def _fenced_blocks(path: Path) -> list[list[str]]:
    blocks: list[list[str]] = []
    inside = False
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            if inside:
                blocks.append([])
        elif inside:
            blocks[-1].append(line.strip())
    return blocks


def _ci_lines() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    return [" ".join(shlex.split(line, comments=True)) for line in text.splitlines()]


def test_readme_install_command_is_what_ci_runs() -> None:
    """The first command installs as CI does (CI adds only -q) and runs the main command."""
    first = _fenced_blocks(ROOT / "README.md")[0]
    assert len(first) == 1, first
    steps = [" ".join(s) for s in _segments(shlex.split(first[0]))]
    assert steps[0] == "python3 -m venv .venv"
    assert steps[-1] == ".venv/bin/fedpeft simulate"
    ci = {line.replace(" -q ", " ") for line in _ci_lines()}
    for step in steps:
        assert step in ci or step.startswith(".venv/bin/fedpeft"), f"CI does not run: {step}"
    for doc in DOCS:  # the same command wherever the docs repeat it (docs/index.md)
        for line in (line for block in _fenced_blocks(doc) for line in block):
            if line.startswith("python3 -m venv"):
                assert line == first[0], f"{doc.relative_to(ROOT)} differs from README.md's first command"


def test_readme_test_command_is_what_ci_runs() -> None:
    second = _fenced_blocks(ROOT / "README.md")[1]
    assert len(second) == 1, second
    assert " ".join(shlex.split(second[0])) in _ci_lines(), f"CI does not run the README's {second[0]!r}"
