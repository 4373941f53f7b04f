"""Choosing and checking a checkpoint: the worker for a checkpoint directory (the AR baseline
for a GPT-2 config, YAN otherwise), and the checks that run before anything loads."""

from __future__ import annotations

from pathlib import Path

from yan_serve.device import resolve_device
from yan_serve.engine.requests import Worker
from yan_serve.tokenizer import YANTokenizer
from yan_serve.weights import check_pretrained, is_ar_checkpoint, load_labels, load_tokenizer


def check_checkpoint(model_dir: str | Path, device: str = "auto") -> None:
    """What can be checked before loading, in seconds and without reading the weights: the
    device exists; config.json, model.safetensors' header, tokenizer.json and labels.json are
    readable and agree. Raises ValueError / FileNotFoundError naming the file and the field."""
    d = Path(model_dir)
    resolve_device(device)
    if is_ar_checkpoint(d):
        from safetensors import SafetensorError, safe_open

        f = d / "model.safetensors"
        if not f.exists():
            raise FileNotFoundError(f"no model.safetensors in {d}")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                sf.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from None
        from transformers import GPT2Config

        try:  # the config's field types, as loading would check them
            GPT2Config.from_pretrained(str(d))
        except Exception as e:  # transformers' own validation errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{d / 'config.json'}: {first}") from None
        YANTokenizer.load(d)
    else:
        cfg = check_pretrained(d)
        try:
            load_tokenizer(d, cfg)
        except ValueError as e:
            msg = str(e)
            where = "" if "tokenizer.json" in msg else f"{d / 'tokenizer.json'}: "
            raise ValueError(where + msg) from None
    load_labels(d)


def load_worker(
    model_dir: str | Path, device: str = "auto", linears: str = "cublas", ar_step: str = "torch"
) -> Worker:
    """The worker for a checkpoint directory: AR (GPT-2 config, decoding with `ar_step`) or YAN
    (its fused engine's linear layers in mode `linears`). Each backend's module is imported
    only when its checkpoint is served."""
    if is_ar_checkpoint(model_dir):
        from yan_serve.ar.worker import ARWorker

        return ARWorker(model_dir, device, ar_step)
    from yan_serve.engine.worker import YANWorker

    return YANWorker(model_dir, device, linears)
