"""What makes a training step fast on a GPU, checked without one where possible: the step never
waits for the host, the dense routed-expert form it takes there, the compiled stage-2 loss, and
`python -m yan_serve.bench train`, which measures steps per second and launches per step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import micro_config
from yan_serve.bench import main
from yan_serve.model import YAN
from yan_serve.train.data import Batch
from yan_serve.train.objectives import StageConfig, YANObjective, stage2_draws, stage2_loss


def _batch(B: int, Lx: int, Ly: int, seed: int, device: str = "cpu") -> Batch:
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 61, (B, Lx), generator=g)
    tgt = torch.randint(4, 61, (B, Ly), generator=g)
    sm = torch.ones(B, Lx, dtype=torch.bool)
    tm = torch.ones(B, Ly, dtype=torch.bool)
    tm[0, Ly // 2 :] = False  # a padded row
    focus = tm & (torch.rand(B, Ly, generator=g) < 0.3)
    return Batch(src, sm, tgt, tm, task="infill", focus=focus).to(device)


def test_stage2_draws_are_the_ones_the_loss_takes_itself() -> None:
    """Drawing first (eager, the compiled loss's inputs) consumes the generator exactly as the
    loss does when it draws: same loss, same generator state after."""
    torch.manual_seed(0)
    m = YAN(micro_config())
    b = _batch(3, 7, 9, 0)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    inline = stage2_loss(m, b.src, b.src_mask, b.tgt, b.tgt_mask, generator=g1)
    drawn = stage2_loss(m, b.src, b.src_mask, b.tgt, b.tgt_mask,
                        draws=stage2_draws(m, b.tgt, g2))  # fmt: skip
    assert all(torch.equal(inline[k], drawn[k]) for k in inline)
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on the CPU needs g++")
def test_the_compiled_stage2_loss_equals_the_eager_one() -> None:
    """`YANObjective.compile_loss`: the same loss terms and gradients as eager on batches of two
    different shapes (dynamic shapes: one compile), dense routed experts inside."""
    cfg = micro_config(n_trf_blocks=2, cross_att_idx=(1,), train_ode_steps=2)  # a shorter compile
    torch.manual_seed(0)
    eager = YANObjective(YAN(cfg), None, StageConfig("finetune"))  # type: ignore[arg-type]
    compiled = YANObjective(YAN(cfg), None, StageConfig("finetune"))  # type: ignore[arg-type]
    compiled.model.load_state_dict(eager.model.state_dict())
    assert compiled.compile_loss()
    assert not YANObjective(YAN(micro_config()), None, StageConfig("stage1")).compile_loss()  # type: ignore[arg-type]
    for seed, shape in enumerate([(4, 12, 10), (3, 9, 17)]):
        b = _batch(*shape, seed)
        want = eager(b, torch.Generator().manual_seed(seed))
        got = compiled(b, torch.Generator().manual_seed(seed))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
        gw = torch.autograd.grad(want["loss"], eager.trainable())
        gg = torch.autograd.grad(got["loss"], compiled.trainable())
        for a, c in zip(gg, gw, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_a_yan_training_step_never_waits_for_the_host() -> None:
    """On CUDA a fine-tuning step (forward, backward, clipping, the fused AdamW with its
    on-device skip) runs under the sync checker's `error` mode."""
    from yan_serve.train.trainer import TrainConfig, Trainer

    torch.manual_seed(0)
    obj = YANObjective(YAN(micro_config()), None, StageConfig("finetune"))  # type: ignore[arg-type]
    t = Trainer(obj, TrainConfig(out="unused", device="cuda", prefetch=0), iter(()), [],
                log=lambda *a: None)  # fmt: skip
    b = _batch(4, 12, 10, 0, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    t.train_step(b, g)  # first-call set-up (allocations, cuBLAS handles) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms, skipped = t.train_step(b, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms["loss"]) and float(skipped) == 0.0


def test_bench_train_cpu_table(capsys, tmp_path) -> None:
    """`bench train` on the CPU: a YAN row and its AR pair; the launch proxy shows how many
    more operators YAN's step dispatches (the unrolled solve and the flow-matching NLL)."""
    out = tmp_path / "train.json"
    argv = ["train", "--device", "cpu", "--batches", "2", "--length", "8", "--steps", "1",
            "--warmup", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "ms/step" in text and "tokens/s" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["yan-tiny", "ar-tiny"]
    yan, ar = rows
    assert all(r["ms"] > 0 and r["batch"] == 2 and r["length"] == 8 for r in rows)
    assert yan["tokens_per_step"] == 16 and ar["tokens_per_step"] == 16
    assert yan["launches"] > 3 * ar["launches"] > 0
    assert yan["syncs"] is None and yan["peak_mib"] is None  # CUDA-only columns


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--length", "0"], "expected a positive integer, got '0'"),
        (["train", "--pairs", "yan-huge"], "unknown YAN preset 'yan-huge'"),
        (["train", "--batches", "0"], "expected positive integers, got '0'"),
    ],
)
def test_bench_train_bad_flags_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_bench_train_cuda_without_cuda_exits_2(capsys) -> None:
    assert main(["train", "--device", "cuda"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "CUDA is not available" in err.err


def test_yan_train_compile_flag_reaches_the_trainer(monkeypatch, tmp_path) -> None:
    """`yan train ... --compile` (COMPILE=1 in the recipes) sets `TrainConfig.compile`, and the
    trainer then asks the objective for its compiled loss (here recorded, not compiled)."""
    from yan_serve import cli
    from yan_serve.train import trainer as trainer_mod

    seen: dict = {}

    class Recorder(trainer_mod.Trainer):
        def train(self) -> dict:
            seen["compile"] = self.cfg.compile
            return {"steps": 0}

    asked: list[str] = []
    monkeypatch.setattr(trainer_mod, "Trainer", Recorder)
    monkeypatch.setattr(YANObjective, "compile_loss", lambda self: asked.append(self.name) or True)
    data = tmp_path / "kjv"
    data.mkdir()
    rows = [{"text": f"verse {i} of the book of the law", "section": "law"} for i in range(40)]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shipped = Path(__file__).resolve().parents[2] / "weights" / "yan-tiny-kjv"
    argv = ["train", "finetune", "--init", str(shipped), "--data", str(data), "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--compile",
            "--tasks", "infill"]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen == {"compile": True} and asked == ["finetune"]


@pytest.mark.gpu
def test_prefetched_batches_are_pinned_and_copied_without_waiting() -> None:
    """On CUDA the prefetch worker's batches arrive in page-locked memory (YAN's dataclass
    through its `pin_memory`, the AR's named tuple field by field), so the trainer's
    `.to(device, non_blocking=True)` neither waits for the queued work nor changes a value."""
    from yan_serve.ar.train import ARBatch
    from yan_serve.train.trainer import prefetch

    yan = [_batch(3, 5, 7, seed) for seed in range(3)]
    ids = torch.arange(12).view(3, 4)
    ar = [ARBatch(ids + i, torch.ones_like(ids), ids - i) for i in range(3)]
    for batches in (yan, ar):
        got = list(prefetch(iter(batches), 2, pin=True))
        assert len(got) == 3
        for want, b in zip(batches, got, strict=True):
            fields = (b.src, b.src_mask, b.tgt, b.tgt_mask, b.focus) if isinstance(b, Batch) else b
            assert all(t.is_pinned() for t in fields)
            on = b.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            back = on.to("cpu")
            pairs = zip(
                (back.src, back.tgt, back.focus) if isinstance(b, Batch) else back,
                (want.src, want.tgt, want.focus) if isinstance(b, Batch) else want,
                strict=True,
            )
            assert all(torch.equal(x, y) for x, y in pairs)


def test_batches_move_with_non_blocking_on_the_cpu() -> None:
    """`Batch.to(..., non_blocking=...)`, the call the trainer makes, keeps every field."""
    b = _batch(3, 5, 7, 0)
    moved = b.to("cpu", non_blocking=True)
    assert moved.task == b.task
    for f in ("src", "src_mask", "tgt", "tgt_mask", "focus"):
        assert torch.equal(getattr(moved, f), getattr(b, f))
