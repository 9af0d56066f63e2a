"""`fedpeft` command line: parsing and dispatch only. The config flags come from the config tree
(fedpeft.config.flags); each command hands its config to the library."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from fedpeft.config.flags import (
    add_config_flags,
    add_run_flags,
    config_from_args,
    field_value,
    local_section,
    print_config,
)
from fedpeft.deploy.commands import COMMANDS as DEPLOY_COMMANDS
from fedpeft.deploy.commands import add_deploy_commands
from fedpeft.errors import FedpeftError
from fedpeft.log import quiet_libraries, setup_console
from fedpeft.serve.command import add_serve_command, cmd_serve

log = logging.getLogger("fedpeft")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated on-device adapter fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_simulate(sub)
    add_deploy_commands(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_eval(sub)
    add_serve_command(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
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


def _add_simulate(sub: argparse._SubParsersAction) -> None:
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


def _add_export(sub: argparse._SubParsersAction) -> None:
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
    add_config_flags(e, "export")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="one user's base, global and personal adapters continuing the same prompt, side by side",
        description="Greedy continuations of --prompt by the base model, the global adapter and the user's "
        "personal adapter, read from a run folder (RUN/personal/USER) or a device store (STORE/personal/USER).",
    )
    gen.add_argument("source", metavar="RUN_OR_STORE", help="a run folder or a device's --store")
    add_config_flags(gen, "generate")


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
    add_config_flags(ev, "eval")


def cmd_eval(a: argparse.Namespace) -> None:
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.training.eval_command import evaluate_sources, report, write_json

    data = config_from_args(a, "eval").data  # the data fields the flags set, checked as everywhere
    e = local_section(a, "eval", "eval")
    only = [u.strip() for u in e.users.split(",") if u.strip()]
    compute = field_value(a, "base.compute_dtype") or "auto"
    model, cache_dir = field_value(a, "base.model"), field_value(a, "base.cache_dir")
    results = evaluate_sources(a.sources, data, e.examples, only, model, cache_dir, compute)
    if e.json:
        write_json(results, Path(e.json))
    print(report(results))


def check_out(out: Path, *sources: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedpeftError(f"--out exists and is not a folder: {out}")
    for s in sources:
        if out.resolve() == s.resolve():
            raise FedpeftError(f"--out must differ from the input folder {s}")


def cmd_train(a: argparse.Namespace) -> None:
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.training.train_command import train_adapter

    cfg = config_from_args(a, "train")
    check_out(Path(a.out))
    print(train_adapter(cfg, a.user, Path(a.out)))


def cmd_simulate(a: argparse.Namespace) -> None:
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.personal.strategies import method_label
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
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.model.adapters import base_model, export_adapter, read_adapter

    o = local_section(a, "export", "export")
    src, out = Path(a.adapter_dir), Path(o.out)
    check_out(out, src)
    what = "adapter"
    if o.user is not None:
        # numpy/torch: imported by the command that needs them, not at start-up
        from fedpeft.personal.store import user_adapter

        src, what = user_adapter(src, o.user, o.which)
        check_out(out, src)
    files = read_adapter(src)
    if not o.merge:
        export_adapter(files, out)
        print(f"{what} copied to {out} (load with peft.PeftModel.from_pretrained)")
        return
    # torch, transformers: only --merge loads a base, off the CLI's start-up path
    import torch

    from fedpeft.model.merge import export_merged, merge_base

    model = field_value(a, "base.model") or base_model(files.meta)
    base = merge_base(files, o.merge_onto, model, field_value(a, "base.cache_dir"))
    export_merged(base, files, out, dtype=getattr(torch, o.dtype))
    onto = (
        "the unquantized base" if o.merge_onto == "full" else f"the {files.meta['quant']} base, dequantized"
    )
    print(
        f"{what} merged onto {onto}, written to {out} "
        "(load with transformers.AutoModelForCausalLM.from_pretrained)"
    )


def cmd_generate(a: argparse.Namespace) -> None:
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.serve.generate import compare

    g = local_section(a, "generate", "generate")
    compute = field_value(a, "base.compute_dtype") or "auto"
    model, cache_dir = field_value(a, "base.model"), field_value(a, "base.cache_dir")
    print(compare(Path(a.source), g.user, g.prompt, g.max_new_tokens, model, cache_dir, compute))


def resolve_base_main(argv: list[str]) -> int:
    """`fedpeft client`'s helper process: convert or build a base into a cache (MODEL CACHE), print what the
    device will compute in (COMPUTE_DTYPE THREADS: fedpeft.model.precision), then the base's folder last."""
    # numpy/torch: imported by the command that needs them, not at start-up
    from fedpeft.config.tree import BaseConfig
    from fedpeft.model.base import preview_precision, resolve_base_dir

    quiet_libraries()
    try:
        base = resolve_base_dir(argv[0], argv[1])
        cfg = BaseConfig(model=str(base), cache_dir=argv[1], compute_dtype=argv[2] or "auto")
        print(preview_precision(cfg, int(argv[3]) or None).line())
        print(base)
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
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
        **DEPLOY_COMMANDS,
    }
    try:
        commands[args.command](args)
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
