"""Convert a checkpoint written by the paper author's supplementary code into our format.

The author's training code saves `torch.save({"model": state_dict, "step": ..., "model_config":
{...}, "loss_config": ..., "trainer_config": ..., ...})`. This module
reads such a file with `torch.load(weights_only=True)` only, maps `model_config` onto
`YANConfig`, renames the state dict to our module layout and writes a model directory:

    out_dir/config.json         YANConfig.save
    out_dir/model.safetensors   every parameter once, contiguous, with provenance metadata
    out_dir/tokenizer.json ...  copied from --tokenizer DIR when given

The renaming is nearly the identity, because our modules use the author's names. The
differences: the shared embeddings (`shared_tok_emb`, `shared_pos_emb`, which the reference
also holds as copies under `encoder.*` / `flow.*`) become `tok_emb` / `pos_emb`, one tensor each,
after checking that every copy is equal; and the K expert heads
`flow.expert_out_proj.k.layers.{0,2}.{weight,bias}` are stacked into `flow.experts.{w1,b1,w2,b2}`
with the weights transposed to input-major (`w1[k] = layers.0.weight.T`). Every reference
tensor must be used or accounted for and every parameter of ours must be filled, with the
shapes of a meta-device `YAN(cfg)`; anything else is an error that names the tensors.

Caveat: the spec does not record the reference's exact position indexing nor the order of its
sinusoidal time features. We assume 0-based positions (row i of the position table for the i-th
token) and `[sin | cos]` features, as our model computes them. A converted checkpoint loads
exactly, but its quality must be verified by evaluation (e.g. infilling ROUGE against the paper)
before it is trusted; a wrong assumption there shows up as poor quality, not as an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from yan_serve.config import YANConfig

__all__ = [
    "ConversionWarning",
    "add_subparser",
    "cmd_convert",
    "config_from_reference",
    "convert_checkpoint",
    "convert_state_dict",
    "expected_shapes",
    "load_reference_checkpoint",
]


class ConversionWarning(UserWarning):
    """Something in a reference checkpoint was not used or had to be assumed."""


# ------------------------------------------------------------------------------- config keys

# Author's `model_config` keys, each copied onto the YANConfig field of the same name.
_REQUIRED_KEYS = (
    "d_model",
    "attention_heads",
    "encoder_n_trf_blocks",
    "n_trf_blocks",
    "cross_att_idx",
    "decoder_n_resi_blocks",
    "max_length",
    "vocab_size",
    "moe_n_experts",
    "pad_token_id",
    "eos_token_id",
)
# Optional keys with the reference code's defaults where the spec gives them; the rest fall back
# to YANConfig's defaults (all of them are training-time or sampling settings).
_REFERENCE_DEFAULTS: dict[str, Any] = {
    "moe_gate_temperature": 1.0,
    "moe_gate_dim_multiplier": 1,
    "moe_sigma": 1.0,
    "qkv_bias": False,
}
_OPTIONAL_KEYS = (
    "dropout",
    "qkv_bias",
    "moe_gate_temperature",
    "moe_gate_dim_multiplier",
    "moe_sigma",
    "ode_steps",
    "latent_noise",
    "init_noise",
    "beta_a",
    "beta_b",
    "mamba_d_state",
)
_MAMBA_FLAGS = ("encoder_use_mamba", "flow_use_mamba")
_KNOWN_KEYS = frozenset(_REQUIRED_KEYS + _OPTIONAL_KEYS + _MAMBA_FLAGS)

# The paper's LLaMA-3 layout: 128256 tokens + <|padding|> (128256) + <|mask|> (128257).
_LLAMA3_VOCAB, _LLAMA3_PAD, _LLAMA3_BOS = 128258, 128256, 128000

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _warn(msg: str) -> None:
    warnings.warn(msg, ConversionWarning, stacklevel=3)


def config_from_reference(model_config: Mapping[str, Any], **overrides: Any) -> YANConfig:
    """Map the author's `model_config` dict onto a `YANConfig`.

    `overrides` are YANConfig fields that win over the checkpoint (e.g. `mask_token_id`,
    `bos_token_id`, `name`, `ode_steps`). The author's config has no BOS or mask id: without an
    override, mask is inferred as `pad + 1` (the paper's LLaMA-3 layout, pad 128256 / mask
    128257) and BOS as 128000 for that layout; otherwise a ValueError asks for them.
    The reference's `ode_steps` (time points, T) sets both `ode_steps` and `train_ode_steps`.

    Keys this converter does not know, and optional keys that are absent, are reported as one
    `ConversionWarning` each (never silently dropped). A Mamba config raises NotImplementedError.
    """
    if not isinstance(model_config, Mapping):
        raise ValueError(f"model_config must be a dict, got {type(model_config).__name__}")
    mamba = [k for k in _MAMBA_FLAGS if model_config.get(k)]
    if mamba:
        raise NotImplementedError(
            f"checkpoint sets {', '.join(mamba)}: the Mamba variant not supported yet "
            "(only the Transformer variant converts)"
        )
    fields = {f.name for f in dataclasses.fields(YANConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown YANConfig override(s): {', '.join(bad)}")

    missing = [k for k in _REQUIRED_KEYS if k not in model_config and k not in overrides]
    if missing:
        raise ValueError(f"model_config lacks required key(s): {', '.join(missing)}")
    unknown = sorted(str(k) for k in model_config if k not in _KNOWN_KEYS)
    if unknown:
        _warn(f"model_config keys not used by the converter: {', '.join(unknown)}")

    kw: dict[str, Any] = {k: model_config[k] for k in _REQUIRED_KEYS if k in model_config}
    defaulted = []
    for k in _OPTIONAL_KEYS:
        if k in model_config:
            kw[k] = model_config[k]
        elif k in _REFERENCE_DEFAULTS:
            kw[k] = _REFERENCE_DEFAULTS[k]
            defaulted.append(f"{k}={kw[k]!r}")
        elif k not in overrides and k != "mamba_d_state":
            defaulted.append(f"{k}={getattr(YANConfig, k)!r}")
    if defaulted:
        _warn(f"model_config lacks {', '.join(defaulted)}: defaults assumed")
    if "ode_steps" in kw:
        kw["train_ode_steps"] = kw["ode_steps"]
    kw["cross_att_idx"] = tuple(int(i) for i in kw.get("cross_att_idx", ()))
    kw.update(overrides)

    vocab, pad = int(kw["vocab_size"]), int(kw["pad_token_id"])
    llama3 = vocab == _LLAMA3_VOCAB and pad == _LLAMA3_PAD
    if "mask_token_id" not in kw:
        if pad + 1 >= vocab or pad + 1 in (kw["eos_token_id"], kw.get("bos_token_id")):
            raise ValueError(
                f"cannot infer the mask token id (pad={pad}, vocab={vocab}): "
                "pass mask_token_id (--mask-token-id)"
            )
        kw["mask_token_id"] = pad + 1
    if "bos_token_id" not in kw:
        if not llama3:
            raise ValueError(
                "the reference config has no BOS id and the vocabulary is not the paper's "
                "LLaMA-3 layout: pass bos_token_id (--bos-token-id)"
            )
        kw["bos_token_id"] = _LLAMA3_BOS
    try:
        return YANConfig(**kw)
    except TypeError as e:  # a value of the wrong kind in the checkpoint
        raise ValueError(f"model_config does not make a valid YANConfig: {e}") from None


# ---------------------------------------------------------------------------- state dict

# Copies of the shared embeddings held by submodules (e.g. `encoder.tok_emb.weight`).
_EMB_ALIAS_RE = re.compile(
    r"^(?:encoder|flow|decoder)\.(?:[\w.]*\.)?(?:shared_)?(tok|pos)_emb\.weight$"
)
_EMBEDDINGS = {
    "tok": ("tok_emb.weight", "shared_tok_emb.weight"),
    "pos": ("pos_emb.weight", "shared_pos_emb.weight"),
}  # kind: (ours, primary ref)
# (layer, param) of `flow.expert_out_proj.k.layers.*` -> the stacked tensor of ours
_EXPERT_SLOTS = {
    ("0", "weight"): "w1",
    ("0", "bias"): "b1",
    ("2", "weight"): "w2",
    ("2", "bias"): "b2",
}
_EMBEDDINGS_OURS = frozenset(ours for ours, _ in _EMBEDDINGS.values())
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _expert_ref_name(k: int, layer: str, param: str) -> str:
    return f"flow.expert_out_proj.{k}.layers.{layer}.{param}"


def _strip_wrappers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a DDP / torch.compile prefix shared by every key (the spec's model is unwrapped)."""
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if all(k.startswith(pre) for k in out):
                out = {k[len(pre) :]: v for k, v in out.items()}
                changed = True
    return out


def _first(names: Iterable[str], n: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def expected_shapes(cfg: YANConfig) -> dict[str, torch.Size]:
    """Names and shapes of our model's state dict for `cfg` (built on the meta device)."""
    from yan_serve.model import YAN  # local: keep `yan convert --help` light

    with torch.device("meta"):
        model = YAN(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(
    ref_sd: Mapping[str, Tensor], cfg: YANConfig, *, ignore: Iterable[str] = ()
) -> dict[str, Tensor]:
    """Rename a reference (author) state dict to our `YAN` layout.

    A `module.` / `_orig_mod.` prefix on every key (DDP, torch.compile) is dropped first.
    `ignore` holds fnmatch patterns of (prefix-free) reference names to drop on purpose (e.g.
    a buffer our model does not have); everything else must map. Raises ValueError listing the
    first few missing / unexpected names, mismatched duplicate embeddings, or wrong shapes.
    """
    sd = _strip_wrappers(ref_sd)
    non_tensor = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if non_tensor:
        raise ValueError(f"state dict entries that are not tensors: {_first(non_tensor)}")
    ignore = tuple(ignore)
    shapes = expected_shapes(cfg)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    # shared embeddings: one primary tensor, every copy must equal it
    for kind, (ours, primary) in _EMBEDDINGS.items():
        aliases = sorted(
            k for k in sd if (m := _EMB_ALIAS_RE.match(k)) and m.group(1) == kind and k != primary
        )
        names = ([primary] if primary in sd else []) + aliases
        if not names:
            missing.append(primary)
            continue
        src = sd[names[0]]
        for other in names[1:]:
            t = sd[other]
            if t.shape != src.shape or not torch.equal(t, src):
                raise ValueError(
                    f"{other} should duplicate {names[0]} (a shared embedding) but differs"
                )
        out[ours] = src
        used.update(names)

    # experts: stack K heads, weights transposed to input-major
    n_exp = cfg.moe_n_experts
    for (layer, param), ours in _EXPERT_SLOTS.items():
        parts: list[Tensor] = []
        for k in range(n_exp):
            name = _expert_ref_name(k, layer, param)
            if name not in sd:
                missing.append(name)
                continue
            t = sd[name]
            parts.append(t.t() if param == "weight" else t)
            used.add(name)
        if len(parts) == n_exp:
            if len({p.shape for p in parts}) != 1:
                raise ValueError(
                    f"expert tensors flow.expert_out_proj.*.layers.{layer}.{param} "
                    f"differ in shape: {sorted({tuple(p.shape) for p in parts})}"
                )
            out[f"flow.experts.{ours}"] = torch.stack(parts)

    # everything else keeps its name
    for name in shapes:
        if name in out or name.startswith("flow.experts."):
            continue
        if name in _EMBEDDINGS_OURS:
            continue
        if name in sd:
            out[name] = sd[name]
            used.add(name)
        else:
            missing.append(name)

    unexpected = [
        k for k in sd if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignore)
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {_first(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_first(unexpected)}")
        raise ValueError("reference state dict does not match the config: " + "; ".join(problems))

    wrong = [
        f"{k} {tuple(out[k].shape)} != {tuple(s)}" for k, s in shapes.items() if out[k].shape != s
    ]
    if wrong:
        raise ValueError(f"shape mismatch for {len(wrong)} tensor(s): {_first(wrong, 4)}")
    extra = sorted(set(out) - set(shapes))
    if extra:  # cannot happen unless our layout changed; keep the invariant loud
        raise ValueError(f"converter produced names the model lacks: {_first(extra)}")
    return {k: out[k] for k in shapes}


# ------------------------------------------------------------------------------ loading


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an author checkpoint with `torch.load(path, map_location="cpu", weights_only=True)`.

    Never falls back to unsafe unpickling. Raises FileNotFoundError, or ValueError with a
    one-line reason (not a torch file, refused by weights_only, or missing `model` /
    `model_config`).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint file at {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise ValueError(
                f"{p}: torch.load(weights_only=True) refused it (it holds objects other than "
                "tensors and plain containers); it will not be loaded unsafely"
            ) from None
        raise ValueError(f"{p} is not a torch checkpoint: {_one_line(e)}") from None
    except Exception as e:  # zip / EOF / runtime errors from a file that is not a checkpoint
        raise ValueError(f"{p} is not a torch checkpoint: {_one_line(e)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        what = f"keys {_first(map(str, ckpt))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{p} is not a YAN reference checkpoint (want a dict with 'model' and "
            f"'model_config', got {what})"
        )
    if not isinstance(ckpt["model"], dict) or not isinstance(ckpt["model_config"], dict):
        raise ValueError(f"{p}: 'model' and 'model_config' must both be dicts")
    return ckpt


def _one_line(e: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters."""
    lines = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:200]


# ------------------------------------------------------------------------------- writing


def _tokenizer_files(tokenizer_dir: Path, cfg: YANConfig) -> list[Path]:
    """The tokenizer files to copy, after checking the tokenizer fits the converted config."""
    from yan_serve.tokenizer import YANTokenizer  # local: needs the `tokenizers` package

    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    tok = YANTokenizer.load(tokenizer_dir)  # FileNotFoundError without tokenizer.json
    tok.check_compatible(cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id, cfg.mask_token_id)
    return [tokenizer_dir / n for n in _TOKENIZER_FILES if (tokenizer_dir / n).is_file()]


@dataclasses.dataclass
class _Converted:
    out: Path
    cfg: YANConfig
    n_params: int
    step: str


def _convert(
    src: Path,
    out: Path,
    tokenizer_dir: str | Path | None,
    overrides: Mapping[str, Any] | None,
    ignore: Iterable[str],
) -> _Converted:
    from safetensors.torch import save_file

    from yan_serve.weights import readable_as_umask_says

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory: convert writes a "
                         "new model directory")  # fmt: skip
    ckpt = load_reference_checkpoint(src)
    ov = {"name": src.stem, **(overrides or {})}
    cfg = config_from_reference(ckpt["model_config"], **ov)
    sd = convert_state_dict(ckpt["model"], cfg, ignore=ignore)

    # safetensors refuses tensors that share memory: clone any that do
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        v = v.detach().contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v

    tok_files = [] if tokenizer_dir is None else _tokenizer_files(Path(tokenizer_dir), cfg)
    out.mkdir(parents=True, exist_ok=True)
    for f in tok_files:
        shutil.copyfile(f, out / f.name)
    cfg.save(out / "config.json")
    step = str(ckpt.get("step", "unknown"))
    meta = {"format": "pt", "converted_from": src.name, "step": step}
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)
    readable_as_umask_says(out / "model.safetensors")
    return _Converted(out, cfg, sum(t.numel() for t in tensors.values()), step)


def convert_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    ignore: Iterable[str] = (),
) -> Path:
    """Convert the author's checkpoint `src` into a model directory `out_dir`; return it.

    Writes `config.json` and `model.safetensors` (metadata: format, converted_from, step), and
    copies `tokenizer.json` (+ its companions) from `tokenizer_dir` when given, after checking it
    matches the config's vocabulary and special ids. `overrides` go to `config_from_reference`
    (the config `name` defaults to the source file's stem); `ignore` to `convert_state_dict`.
    Nothing is written unless the whole checkpoint converts, and never into an `out_dir` that
    holds files (another model's tokenizer would be left beside this one).
    """
    return _convert(Path(src), Path(out_dir), tokenizer_dir, overrides, ignore).out


# ----------------------------------------------------------------------------------- CLI


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `yan convert SRC OUT [--tokenizer DIR] [--mask-token-id N] [--bos-token-id N]`."""
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint of the paper author's code into a model directory",
        description="Convert the author's torch checkpoint (loaded with weights_only=True) into "
        "config.json + model.safetensors. Verify a converted model's quality by evaluation.",
    )
    p.add_argument("src", help="the author's .pt checkpoint")
    p.add_argument("out", help="output model directory")
    p.add_argument("--tokenizer", metavar="DIR", help="directory holding tokenizer.json to copy")
    p.add_argument("--mask-token-id", type=int, help="mask id (default: pad + 1)")
    p.add_argument("--bos-token-id", type=int, help="BOS id (default: 128000 for LLaMA-3 layout)")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="fnmatch pattern of reference tensors to drop on purpose (repeatable)",
    )
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    """Run the conversion; print warnings to stderr and a one-line summary to stdout."""
    overrides: dict[str, Any] = {}
    if args.mask_token_id is not None:
        overrides["mask_token_id"] = args.mask_token_id
    if args.bos_token_id is not None:
        overrides["bos_token_id"] = args.bos_token_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        res = _convert(
            Path(args.src), Path(args.out), args.tokenizer, overrides, getattr(args, "ignore", ())
        )
    for w in caught:
        if issubclass(w.category, ConversionWarning):
            print(f"yan convert: warning: {w.message}", file=sys.stderr)
    print(
        f"converted {Path(args.src).name} -> {res.out}: {res.n_params / 1e6:.3f}M parameters, "
        f"step {res.step}, ode_steps={res.cfg.ode_steps}"
    )
    return 0
