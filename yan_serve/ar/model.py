"""GPT-2 baseline model: config sized to match a YAN checkpoint, Hugging Face-style directories.

Source is the prefix and the target follows it, separated by BOS (as the paper trains GPT-2);
the loss covers the target only. Infill has two target formats: the paper's (regenerate the whole
clean passage) and fill-in-the-middle (only the masked spans, each closed by <mask>, then EOS):
the strong baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from yan_serve.tasks.formats import Example
from yan_serve.tokenizer import YANTokenizer
from yan_serve.weights import readable_as_umask_says

# ~4.34M parameters with an 8192 vocabulary: within 1% of yan-tiny (4.35M).
AR_PRESETS = {
    "ar-tiny": {"n_embd": 192, "n_layer": 6, "n_head": 6},
    "ar-small": {"n_embd": 384, "n_layer": 8, "n_head": 6},
    # the GPT-2-124M shape (185M parameters with yan-paper's 128,258 vocabulary)
    "ar-gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12},
}


def ar_config(tok: YANTokenizer, max_length: int, preset: str = "ar-tiny") -> GPT2Config:
    if preset not in AR_PRESETS:
        raise ValueError(f"unknown AR preset {preset!r}; choose from {', '.join(AR_PRESETS)}")
    sp = tok.special
    return GPT2Config(
        vocab_size=tok.vocab_size, n_positions=2 * max_length + 2,
        bos_token_id=sp.bos, eos_token_id=sp.eos, pad_token_id=sp.pad,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        yan_max_length=max_length, yan_preset=preset, **AR_PRESETS[preset],
    )  # fmt: skip


def load_ar(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GPT2LMHeadModel:
    """An AR checkpoint with `dtype` parameters whatever the file stores (a bf16-stored
    checkpoint serves with fp32 numerics unless a 16-bit model is asked for)."""
    d = Path(directory)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"no model.safetensors in {d}")
    try:
        model = GPT2LMHeadModel.from_pretrained(str(d), use_safetensors=True, dtype=dtype)
    except (OSError, ValueError):
        raise
    except Exception as e:  # safetensors' and transformers' own errors: a corrupt checkpoint
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{d} is not a readable AR checkpoint: {first}") from None
    return model.to(device=device, dtype=dtype).eval()


def save_ar(model: GPT2LMHeadModel, tok: YANTokenizer, directory: str | Path) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(d), safe_serialization=True)
    for f in d.glob("*.safetensors"):
        readable_as_umask_says(f)
    tok.save(d)
    return d


def fim_target(ex: Example, mask_id: int, eos_id: int) -> list[int]:
    """Fill-in-the-middle target of an infill example: each span's tokens + <mask>, then EOS."""
    out: list[int] = []
    for f in ex.fills:
        out += [*f, mask_id]
    return [*out, eos_id]


def ar_sequence(src: list[int], tgt: list[int], sep: int) -> tuple[list[int], int]:
    """(source + SEP + target, index where the target starts)."""
    return [*src, sep, *tgt], len(src) + 1
