"""`fedpeft` command line: parsing and dispatch only. The config flags come from the config tree
(fedpeft.config.flags); each command hands its config to the library."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

from fedpeft.config.flags import (
    add_base_location,
    add_config_flags,
    add_field_flag,
    add_run_flags,
    config_from_args,
    field_value,
    print_config,
)
from fedpeft.errors import FedpeftError

log = logging.getLogger("fedpeft")


def _build_parser() -> argparse.ArgumentParser:
    from fedpeft.deploy.commands import add_deploy_commands
    from fedpeft.serve.command import add_serve_command

    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated on-device adapter fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="fine-tune an adapter on one device's text (or all users' text: the centralized baseline)",
        description="Fine-tune a LoRA or IA3 adapter on the frozen, quantized base and save it as a PEFT folder "
        "(plus metrics.json and loss.png).",
    )
    g = add_config_flags(t, "train")["train"]
    g.add_argument(
        "--user",
        default="all",
        metavar="NAME|all",
        help="whose text to train on; all pools every user's text (default: %(default)s)",
    )
    g.add_argument(
        "--out", required=True, metavar="DIR", help="adapter folder to write (replaced only on success)"
    )

    s = sub.add_parser(
        "simulate",
        help="run a federation of virtual clients on Flower's simulation engine (Ray)",
        description="Simulate a federation: every client fine-tunes the adapter on its own text, the server "
        "aggregates the deltas. Writes metrics.jsonl, plot.png, global/ and checkpoints/ to --out.",
    )
    g = add_config_flags(s, "simulate")["federation"]
    add_run_flags(
        g,
        "run folder (default: a new runs/federation-YYYYmmdd-HHMMSS; an existing run needs --resume)",
    )
    add_deploy_commands(sub)

    e = sub.add_parser(
        "export",
        help="copy an adapter as a PEFT folder, or merge it into a plain Hugging Face model",
        description="Export an adapter folder written by fedpeft.",
    )
    e.add_argument(
        "adapter_dir",
        metavar="ADAPTER_DIR",
        help="a folder written by `fedpeft train` (or a federation); with --user: a run folder or a device's "
        "--store",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced only on success)")
    e.add_argument(
        "--user",
        default=None,
        metavar="NAME",
        help="export this user's adapter from the personal store under ADAPTER_DIR: the one the device kept "
        "(personal or global), or --which",
    )
    e.add_argument(
        "--which",
        default="kept",
        choices=("kept", "personal", "global"),
        help="with --user: which of the user's adapters (default: %(default)s)",
    )
    e.add_argument(
        "--merge",
        action="store_true",
        help="write a merged, dequantized Hugging Face model folder instead of the adapter",
    )
    e.add_argument(
        "--merge-onto",
        default="full",
        choices=("full", "quantized"),
        help="with --merge: the base the adapter is merged onto: full, the unquantized weights (QLoRA's "
        "practice), or quantized, the weights the devices ran it on, dequantized (default: %(default)s)",
    )
    e.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights dtype of a merged model (default: %(default)s; bf16 rounds away small adapter deltas)",
    )
    add_base_location(e)

    gen = sub.add_parser(
        "generate",
        help="one user's base, global and personal adapters continuing the same prompt, side by side",
        description="Greedy continuations of --prompt by the base model, the global adapter and the user's "
        "personal adapter, read from a run folder (RUN/personal/USER) or a device store (STORE/personal/USER).",
    )
    gen.add_argument("source", metavar="RUN_OR_STORE", help="a run folder or a device's --store")
    gen.add_argument("--user", required=True, metavar="NAME", help="whose personal adapter")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=40,
        metavar="N",
        help="tokens to generate (default: %(default)s)",
    )
    add_base_location(gen)
    add_field_flag(gen, "base.compute_dtype")
    _add_eval_command(sub)
    add_serve_command(sub)
    return parser


EVAL_DATA_FIELDS = ("data", "format", "user_column", "prompt_column", "completion_column", "label_column",
                    "labels", "task", "block_size", "eval_fraction", "eval_max_examples", "answer_tokens")  # fmt: skip


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="score the base, adapters or personal adapters on task data (accuracy/macro-F1 or ROUGE-L/EM)",
        description="Score SOURCEs on task data with the federation's metric code: `base` (zero-shot), a run "
        "folder (its global adapter), an adapter folder (fedpeft train, export), or personal=RUN_OR_STORE "
        "(each user's kept adapter on that user's examples).",
    )
    ev.add_argument(
        "sources", nargs="+", metavar="SOURCE", help="base | RUN | ADAPTER_DIR | personal=RUN_OR_STORE"
    )
    for name in EVAL_DATA_FIELDS:
        add_field_flag(ev, f"data.{name}")
    ev.add_argument(
        "--examples",
        default="held-out",
        choices=("held-out", "all"),
        help="each user's held-out tail, as a federation holds it out, or all of its examples (new users, "
        "new data) (default: %(default)s)",
    )
    ev.add_argument("--users", default="", metavar="A,B,...", help="only these users (default: all)")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write every figure, per user, to FILE")
    add_base_location(ev)
    add_field_flag(ev, "base.compute_dtype")


def cmd_eval(a: argparse.Namespace) -> None:
    from dataclasses import replace

    from fedpeft.config.tree import DataConfig
    from fedpeft.training.eval_command import evaluate_sources, report, write_json

    values = {n: v for n in EVAL_DATA_FIELDS if (v := field_value(a, f"data.{n}")) is not None}
    data = replace(DataConfig(), **values)
    only = [u.strip() for u in a.users.split(",") if u.strip()]
    compute = field_value(a, "base.compute_dtype") or "auto"
    results = evaluate_sources(a.sources, data, a.examples, only, a.model, a.cache_dir, compute)
    if a.json:
        write_json(results, Path(a.json))
    print(report(results))


def check_out(out: Path, *sources: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedpeftError(f"--out exists and is not a folder: {out}")
    for s in sources:
        if out.resolve() == s.resolve():
            raise FedpeftError(f"--out must differ from the input folder {s}")


def cmd_train(a: argparse.Namespace) -> None:
    from fedpeft.training.train_command import train_adapter

    cfg = config_from_args(a, "train")
    check_out(Path(a.out))
    print(train_adapter(cfg, a.user, Path(a.out)))


def cmd_simulate(a: argparse.Namespace) -> None:
    from fedpeft.personal.methods import method_label
    from fedpeft.simulation.run import simulate, summary

    if print_config(a, "simulate"):
        return
    cfg = config_from_args(a, "simulate")
    if a.out is None and (a.resume or a.resume_from is not None):
        raise FedpeftError("--resume needs the --out of the run to continue")
    out = Path(a.out or time.strftime("runs/federation-%Y%m%d-%H%M%S"))
    check_out(out)
    state = simulate(cfg, out, resume=a.resume, resume_from=a.resume_from)
    print(
        summary(state.round, state.history, method_label(cfg.personal))
        + f"\nrun folder {out} (metrics.jsonl, plot.png, global/)"
    )


def cmd_export(a: argparse.Namespace) -> None:
    from fedpeft.model.adapters import base_model, export_adapter, read_adapter

    src, out = Path(a.adapter_dir), Path(a.out)
    check_out(out, src)
    what = "adapter"
    if a.user is not None:
        from fedpeft.personal.methods import user_adapter

        src, what = user_adapter(src, a.user, a.which)
        check_out(out, src)
    files = read_adapter(src)
    if not a.merge:
        export_adapter(files, out)
        print(f"{what} copied to {out} (load with peft.PeftModel.from_pretrained)")
        return
    import torch

    from fedpeft.model.merge import export_merged, merge_base

    base = merge_base(files, a.merge_onto, a.model or base_model(files.meta), a.cache_dir)
    export_merged(base, files, out, dtype=getattr(torch, a.dtype))
    onto = (
        "the unquantized base" if a.merge_onto == "full" else f"the {files.meta['quant']} base, dequantized"
    )
    print(
        f"{what} merged onto {onto}, written to {out} "
        "(load with transformers.AutoModelForCausalLM.from_pretrained)"
    )


def cmd_serve(a: argparse.Namespace) -> None:
    from fedpeft.serve.command import cmd_serve as serve

    serve(a)


def cmd_generate(a: argparse.Namespace) -> None:
    from fedpeft.serve.generate import compare

    compute = field_value(a, "base.compute_dtype") or "auto"
    print(compare(Path(a.source), a.user, a.prompt, a.max_new_tokens, a.model, a.cache_dir, compute))


def quiet_libraries() -> None:
    from fedpeft.simulation.run import quiet_environment

    quiet_environment()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def resolve_base_main(argv: list[str]) -> int:
    """`fedpeft client`'s helper process: convert or build a base into a cache and print its folder."""
    from fedpeft.model.base import resolve_base_dir

    quiet_libraries()
    try:
        print(resolve_base_dir(argv[0], argv[1]))
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from fedpeft.deploy.commands import COMMANDS
    from fedpeft.log import setup_console

    args = _build_parser().parse_args(argv)
    setup_console()
    if args.command not in ("server", "client", "certs"):  # these never load a model in this process
        quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops what we started, as Ctrl-C does
    commands = {
        "train": cmd_train,
        "simulate": cmd_simulate,
        "export": cmd_export,
        "generate": cmd_generate,
        "eval": cmd_eval,
        "serve": cmd_serve,
    }
    try:
        {**commands, **COMMANDS}[args.command](args)
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
