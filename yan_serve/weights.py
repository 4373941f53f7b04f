"""Checkpoints as Hugging Face-style directories, never pickle.

    <dir>/config.json          YANConfig
    <dir>/model.safetensors    the state dict
    <dir>/tokenizer.json       the tokenizer (optional for tests, required to serve text)

`from_pretrained` builds the model on the meta device and assigns the loaded tensors, so a
200M-parameter model is never initialised only to be overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from yan_serve.config import YANConfig
from yan_serve.model import YAN
from yan_serve.tokenizer import YANTokenizer


def is_ar_checkpoint(directory: str | Path) -> bool:
    """Whether a model directory holds the GPT-2 baseline (config.json's `model_type`), not YAN."""
    f = Path(directory) / "config.json"
    try:
        return json.loads(f.read_text()).get("model_type") == "gpt2"
    except (OSError, ValueError):
        return False


def save_pretrained(
    model: YAN,
    directory: str | Path,
    tokenizer: YANTokenizer | None = None,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write config.json, model.safetensors and the tokenizer. Returns the directory.

    The weights are stored in the model's dtype, or in `dtype` when given (`torch.bfloat16`
    halves a shipped checkpoint; `from_pretrained` upcasts it again)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model.config.save(d / "config.json")
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous().cpu()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    readable_as_umask_says(d / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(d)
    return d


def readable_as_umask_says(path: str | Path) -> None:
    """Give a file the mode a plain `open` would (0666 less the umask): safetensors writes
    its files 0600, which a server running as another user (the image's non-root one, a
    read-only mount of an exported checkpoint) cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_tokenizer(directory: str | Path, config: YANConfig) -> YANTokenizer:
    """The checkpoint's tokenizer, checked against the model's vocabulary and special ids."""
    tok = YANTokenizer.load(directory)
    tok.check_compatible(
        config.vocab_size, config.pad_token_id, config.eos_token_id, config.mask_token_id
    )
    return tok


def _weights_file(d: Path) -> Path:
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory {d} does not exist")
    f = d / "model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"no model.safetensors in {d}")
    return f


def _check_shapes(f: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple]) -> None:
    """Raise ValueError when the file's tensor names or shapes differ from the model's."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{f} does not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, shape in expected.items():
        if tuple(shape) != tuple(found[k]):
            raise ValueError(
                f"{f}: {k} has shape {tuple(found[k])}, config.json implies {tuple(shape)}"
                " (vocab or width mismatch)"
            )


def _expected_shapes(cfg: YANConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = YAN(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_pretrained(directory: str | Path) -> YANConfig:
    """Validate a checkpoint directory without reading its weights: config.json (types,
    unknown keys, consistency) and model.safetensors' header (readable, tensor names and shapes
    matching the config). Errors name the file and the problem. Returns the config."""
    d = Path(directory)
    f = _weights_file(d)
    cfg = YANConfig.load(d / "config.json")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            found = {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    _check_shapes(f, _expected_shapes(cfg), found)
    return cfg


def from_pretrained(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> YAN:
    """Load a checkpoint directory into an eval-mode YAN. Errors name the file and the problem.

    `dtype` None gives fp32 parameters whatever the file stores: 16-bit stored weights are
    upcast (the samplers' float tolerances and batch independence assume fp32 unless a
    caller asks for a 16-bit model with `dtype`)."""
    d = Path(directory)
    f = _weights_file(d)
    cfg = YANConfig.load(d / "config.json")
    try:
        sd = load_file(str(f), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        model = YAN(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_shapes(f, expected, {k: tuple(v.shape) for k, v in sd.items()})
    model.load_state_dict(sd, assign=True)
    model = model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


LABELS_FILE = "labels.json"
# what a server needs of a YAN checkpoint (labels.json when it classifies with names)
SERVING_FILES = ("config.json", "model.safetensors", "tokenizer.json", LABELS_FILE)


def save_labels(directory: str | Path, labels: dict[int, str]) -> None:
    """The classification label table {id: name} the checkpoint was fine-tuned on."""
    with open(Path(directory) / LABELS_FILE, "w") as f:
        json.dump({str(k): v for k, v in sorted(labels.items())}, f, indent=1)


def load_labels(directory: str | Path) -> dict[int, str] | None:
    f = Path(directory) / LABELS_FILE
    if not f.exists():
        return None
    try:
        return {int(k): str(v) for k, v in json.loads(f.read_text()).items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{f} is not a JSON object of label id -> name ({e})") from None
