"""`python -m yan_serve.bench kernels|sampler|scan`: the CPU tables, the CUDA-only exits, the flags.

The CPU runs use tiny shapes and one timed call; `--no-compile` keeps them fast, and the `slow`
test runs the torch.compile path itself (compilation takes ~10-30 s on one core).

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/kernels/test_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from yan_serve.bench import common, kernels, main, sampler, scan

TINY_KERNELS = [
    "kernels", "--device", "cpu", "--iters", "1", "--d-model", "32", "--experts", "3",
    "--vocab", "1000", "--routed-n", "8,16", "--decoder-n", "4,8", "--sample-n", "8",
    "--gelu-n", "5",
]  # fmt: skip
KERNEL_ROW = re.compile(
    r"^(?P<op>\S+)\s+(?P<shape>N=\d+ d=\d+ [KVF]=\d+)\s+(?P<eager>\d+\.\d+)\s+(?P<rest>.+?)"
    r"\s+n/a \(interpreter\)\s+(?P<gbps>\d+\.\d)\s+(?P<tflops>\d+\.\d{3})"
    r"\s+(?P<floor>\d+\.\d{3})\s+(?P<pct>\d+)%$"
)
SAMPLER_ROW = re.compile(
    r"^\s*(?P<batch>\d+)\s+(?P<length>\d+)\s+(?P<eager>\d+\.\d\d)\s+(?P<rest>.+?)"
    r"\s+n/a \(interpreter\)\s+n/a on CPU\s+(?P<ops_m>\d+)\s+(?P<ops_f>\d+)\s+(?P<ops_g>\d+)$"
)


def _header(line: str) -> dict[str, str]:
    """`k=v  k=v` (fields separated by two spaces; values may hold single spaces)."""
    return dict(field.split("=", 1) for field in line.split("  "))


def _table(out: str, row: re.Pattern) -> tuple[list[dict[str, str]], list[re.Match]]:
    """Headers and table rows of every table in the output, in order."""
    lines = out.splitlines()
    headers = [_header(ln) for ln in lines if ln.startswith("device=")]
    rows = [m for ln in lines if (m := row.match(ln))]
    return headers, rows


def _broken_compile(fn, *args, **kwargs):
    """torch.compile as on a host without a C compiler: the error comes on the first call."""

    def call(*a, **k):
        raise RuntimeError("no C compiler found\nsecond line of the traceback")

    return call


def test_bench_lists_its_commands() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


# ---------------------------------------------------------------------------- CPU kernels
def test_cpu_kernels_table(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    out_json = tmp_path / "k.json"
    assert main([*TINY_KERNELS, "--no-compile", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    headers, rows = _table(out, KERNEL_ROW)
    (h,) = headers
    assert h["threads"] == str(torch.get_num_threads())
    assert h["dtype"] == "fp32" and h["cuda"] == "None" and h["torch"] == torch.__version__
    assert float(h["copy_GBps"]) > 0 and float(h["matmul_TFLOPs"]) >= 0
    assert kernels.CPU_KERNEL_COLUMNS in out.splitlines()
    for col in ("eager ms", "compiled ms", "speedup", "1st call s", "triton", "% floor"):
        assert col in kernels.CPU_KERNEL_COLUMNS
    # greedy rows at --decoder-n, the sampled row only at --sample-n, in that order
    assert [(m["op"], m["shape"]) for m in rows] == [
        ("routed_expert_euler", "N=8 d=32 K=3"),
        ("routed_expert_euler", "N=16 d=32 K=3"),
        ("decoder_argmax", "N=4 d=32 V=1000"),
        ("decoder_argmax", "N=8 d=32 V=1000"),
        ("decoder_argmax+sample", "N=8 d=32 V=1000"),
        ("linear_gelu", "N=5 d=32 F=128"),
        ("norm_linear", "N=5 d=32 F=96"),
        ("linear_residual", "N=5 d=32 F=128"),
    ]
    for m in rows:
        assert float(m["eager"]) > 0
        assert m["rest"].split() == ["skipped", "-", "-"]
    data = json.loads(out_json.read_text())
    assert data["header"]["dtype"] == "fp32"
    for r, m in zip(data["rows"], rows, strict=True):
        assert r["compiled_ms"] is None and r["compiled"] == common.NO_COMPILE
        assert r["eager_ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0
        # with no compiled run, GB/s and % floor are the eager path's
        assert float(m["gbps"]) == pytest.approx(r["bytes"] / r["eager_ms"] / 1e6, abs=0.051)
        assert int(m["pct"]) == round(100 * r["floor_ms"] / r["eager_ms"])


def test_cpu_kernels_report_a_failed_compile(monkeypatch, capsys) -> None:
    """A compile error (it surfaces on the first call) fills the column with one line; the
    eager timings still come out and the command succeeds."""

    monkeypatch.setattr(torch, "compile", _broken_compile)
    assert main([*TINY_KERNELS, "--routed-n", "8"]) == 0
    out = capsys.readouterr().out
    _, rows = _table(out, KERNEL_ROW)
    assert len(rows) == 7
    for m in rows:
        assert float(m["eager"]) > 0
        assert m["rest"].split() == ["failed", "-", "-"]
    reason = "compile failed: RuntimeError: no C compiler found"
    notes = [ln for ln in out.splitlines() if reason in ln]
    ops = ("routed_expert_euler, decoder_argmax, decoder_argmax+sample, linear_gelu,"
           " norm_linear, linear_residual")  # fmt: skip
    assert notes == [f"{ops}: {reason}"]
    assert "second line" not in out


def test_a_failed_row_fails_the_run(monkeypatch, capsys, tmp_path) -> None:
    """A measurement that raises is reported where it happened, the other ops' rows still
    come out (and into --json), and the command exits 1 with one line saying so."""

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")
        yield  # a generator, like the cases it replaces

    monkeypatch.setattr(kernels, "_linear_gelu_cases", broken)
    out_json = tmp_path / "k.json"
    argv = [*TINY_KERNELS, "--no-compile", "--routed-n", "8", "--json", str(out_json)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "failed: RuntimeError: kernel exploded" in out
    _, rows = _table(out, KERNEL_ROW)
    assert "linear_gelu" not in {m["op"] for m in rows} and "norm_linear" in {m["op"] for m in rows}
    assert err.strip().splitlines()[-1] == "yan-serve bench kernels: 1 measurement(s) failed"
    assert len(json.loads(out_json.read_text())["rows"]) == len(rows)
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]  # no temporary file left


def test_a_failed_sampler_shape_fails_the_run(monkeypatch, capsys) -> None:
    """The CUDA table's row() returns None for a shape that raised: the run exits 1."""
    real = sampler._CpuTable.row

    def row(self, batch, length):
        return None if batch == 2 else real(self, batch, length)

    monkeypatch.setattr(sampler._CpuTable, "row", row)
    argv = ["sampler", "--device", "cpu", "--batches", "1,2", "--lengths", "8", "--iters", "1",
            "--no-compile"]  # fmt: skip
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert len(_table(out, SAMPLER_ROW)[1]) == 1
    assert err.strip() == "yan-serve bench sampler: 1 measurement(s) failed"


def test_cpu_sampler_reports_a_failed_compile(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch, "compile", _broken_compile)
    argv = ["sampler", "--device", "cpu", "--batches", "1,2", "--lengths", "8", "--iters", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    _, rows = _table(out, SAMPLER_ROW)
    assert len(rows) == 2
    for m in rows:
        assert float(m["eager"]) > 0
        assert m["rest"].split() == ["failed", "-", "-", "-"]
    assert out.splitlines().count("compile failed: RuntimeError: no C compiler found") == 1
    assert "second line" not in out


def test_compile_errors_name_the_user_code() -> None:
    """torch.compile's errors end with the user code they stopped at; that goes first."""
    exc = RuntimeError(
        "Could not guard on data-dependent expression Eq(u0, 0)\n\nmore help\n\n"
        'from user code:\n   File "/x/kernels/routed_expert.py", line 254, in routed_ref\n'
        "    if idx.numel() == 0:\n\nSet TORCHDYNAMO_VERBOSE=1"
    )
    assert common.one_line(exc, limit=1000) == (
        "routed_expert.py:254 `if idx.numel() == 0:`: "
        "RuntimeError: Could not guard on data-dependent expression Eq(u0, 0)"
    )
    assert common.one_line(ValueError("a\nb")) == "ValueError: a"
    assert len(common.one_line(ValueError("x" * 500), limit=50)) == 50


# ---------------------------------------------------------------------------- CPU sampler
def test_cpu_sampler_one_table_per_preset(capsys, tmp_path) -> None:
    out_json = tmp_path / "s.json"
    argv = [
        "sampler", "--device", "cpu", "--preset", "yan-tiny,yan-mamba-tiny", "--batches", "1,2",
        "--lengths", "8,300", "--iters", "1", "--no-compile", "--json", str(out_json),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    headers, rows = _table(out, SAMPLER_ROW)
    # 300 > yan-tiny's max_length 256: the random-weight model's position table is extended
    assert [h["model"] for h in headers] == [
        "yan-tiny (random weights, max_length 300)",
        "yan-mamba-tiny (random weights, max_length 300)",
    ]
    assert all(h["dtype"] == "fp32" and h["steps"] == "3" for h in headers)
    assert out.splitlines().count(sampler.CPU_SAMPLER_COLUMNS) == 2
    for col in ("eager ms", "compiled ms", "same tok", "fused", "graph"):
        assert col in sampler.CPU_SAMPLER_COLUMNS
    shapes = [(1, 8), (2, 8), (1, 300), (2, 300)]
    assert [(int(m["batch"]), int(m["length"])) for m in rows] == shapes * 2
    for m in rows:
        assert float(m["eager"]) > 0
        assert m["rest"].split() == ["skipped", "-", "-", "-"]
        assert 0 < int(m["ops_f"]) < int(m["ops_m"])  # the fused engine's launch proxy is lower
        assert 0 < int(m["ops_g"]) < int(m["ops_f"])  # no host-side preparation in a graph
    runs = json.loads(out_json.read_text())
    assert [r["header"]["model"].split()[0] for r in runs] == ["yan-tiny", "yan-mamba-tiny"]
    assert all(r["eager_ms"] > 0 and r["compiled_ms"] is None for run in runs for r in run["rows"])


def test_cpu_sampler_counts_the_chosen_linears(capsys) -> None:
    """`--linears fused` moves the norms and residual adds into the GEMMs: the launch proxy of
    the fused engine drops, the modules' does not."""
    ops = {}
    for mode in ("cublas", "fused"):
        argv = ["sampler", "--device", "cpu", "--batches", "1", "--lengths", "8", "--iters", "1",
                "--no-compile", "--linears", mode]  # fmt: skip
        assert main(argv) == 0
        out = capsys.readouterr().out
        headers, (m,) = _table(out, SAMPLER_ROW)
        assert headers[0]["linears"] == mode and f"(linears: {mode})" in out
        ops[mode] = int(m["ops_m"]), int(m["ops_f"]), int(m["ops_g"])
    assert ops["fused"][0] == ops["cublas"][0]
    assert ops["fused"][1] < ops["cublas"][1] and ops["fused"][2] < ops["cublas"][2]


def test_compare_modes_name_linears_and_attention() -> None:
    assert sampler._modes("gelu, fused/triton,gelu") == ["gelu", "fused/triton"]
    assert sampler.split_mode("fused/triton", "auto") == ("fused", "triton")
    assert sampler.split_mode("gelu", "sdpa") == ("gelu", "sdpa")
    assert sampler._modes("fused+pdl,fused/triton+pdl") == ["fused+pdl", "fused/triton+pdl"]
    assert sampler.split_mode("fused/triton+pdl", "auto") == ("fused", "triton")
    assert sampler.split_mode("gelu+pdl", "sdpa") == ("gelu", "sdpa")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\+pdl"):
        sampler._modes("fused+pd")


def test_gpu_sampler_row_prints_a_column_per_compared_mode() -> None:
    row = sampler.SamplerRow(1, 128, 30.0, 12.0, 1.5, 0.08, 237, 0.5, 40.0, 1.0,
                             {"gelu": 1.25, "fused": None})  # fmt: skip
    cols = sampler.GPU_SAMPLER_COLUMNS + sampler._compare_columns(["gelu", "fused"])
    assert cols.endswith("   gelu ms  fused ms")
    line = row.line()
    assert len(line) == len(cols)
    assert line.split()[-2:] == ["1.25", "oom"]  # no graph in that mode: out of memory


@pytest.mark.slow
def test_cpu_compiled_paths(capsys) -> None:
    """The torch.compile columns themselves: timings, first-call time and token agreement; the
    routed reference (data-dependent token grouping) does not compile as one graph and says so
    rather than timing its eager fallback as "compiled"."""
    assert main([*TINY_KERNELS, "--routed-n", "8", "--decoder-n", "4"]) == 0
    out = capsys.readouterr().out
    _, rows = _table(out, KERNEL_ROW)
    ops = [m["op"] for m in rows]
    assert ops == ["routed_expert_euler", "decoder_argmax", "decoder_argmax+sample", "linear_gelu",
                   "norm_linear", "linear_residual"]  # fmt: skip
    assert rows[0]["rest"].split() == ["failed", "-", "-"]
    assert "routed_expert_euler: compile failed: routed_expert.py:" in out
    for m in rows[1:]:
        compiled, speedup, first = m["rest"].split()
        assert float(compiled) > 0 and speedup.endswith("x") and float(first) >= 0
    argv = ["sampler", "--device", "cpu", "--batches", "2", "--lengths", "8", "--iters", "1"]
    assert main(argv) == 0
    _, rows = _table(capsys.readouterr().out, SAMPLER_ROW)
    (m,) = rows
    compiled, speedup, first, same = m["rest"].split()
    assert float(compiled) > 0 and speedup.endswith("x") and float(first) > 0
    assert float(same.rstrip("%")) >= 90  # same model, same draws: the tokens agree


# ---------------------------------------------------------------------- CUDA-only exits
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
@pytest.mark.parametrize("command", ["kernels", "sampler", "scan"])
def test_device_cuda_without_cuda_exits_2(command: str, capsys) -> None:
    assert main([command, "--device", "cuda", "--iters", "1"]) == 2
    err = capsys.readouterr()
    assert err.out == ""
    assert err.err.strip().splitlines() == [
        f"yan-serve bench {command}: --device cuda: CUDA is not available on this machine"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_cli_exit_status_without_cuda() -> None:
    """The same through `python -m`, so the status reaches the shell."""
    r = subprocess.run(
        [sys.executable, "-m", "yan_serve.bench", "kernels", "--device", "cuda"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "yan-serve bench kernels: --device cuda: CUDA is not available on this machine"
    ]


# ---------------------------------------------------------------------------------- flags
def test_list_flags_parse() -> None:
    assert common.int_list("1, 8,64") == [1, 8, 64]
    assert common.int_list("128,") == [128]
    for bad in ("", "0", "8,-1", "a,b", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.int_list(bad)
    assert common.preset_list("yan-tiny, yan-mamba-tiny") == ["yan-tiny", "yan-mamba-tiny"]
    for bad in ("", "yan-huge", "yan-tiny,nope"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.preset_list(bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sampler", "--batches", "0"], "expected positive integers, got '0'"),
        (["sampler", "--preset", "nope"], "unknown preset 'nope'"),
        (["sampler", "--compare", "gelu,cutlass"], "unknown mode(s) cutlass"),
        (["sampler", "--compare", "fused/xformers"], "unknown mode(s) fused/xformers"),
        (["sampler", "--linears", "cutlass"], "invalid choice: 'cutlass'"),
        (["kernels", "--routed-n", "x"], "expected comma-separated integers, got 'x'"),
        (["kernels", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["scan", "--shapes", "16x128x256"], "expected comma-separated BtxLxDixN shapes"),
        (["scan", "--dtype", "fp8"], "invalid choice: 'fp8'"),
        # sizes and counts are refused before anything runs, not turned into failed rows
        (["kernels", "--d-model", "-5"], "--d-model: expected a positive integer, got '-5'"),
        (["kernels", "--experts", "0"], "--experts: expected a positive integer, got '0'"),
        (["kernels", "--vocab", "0"], "--vocab: expected a positive integer, got '0'"),
        (["kernels", "--iters", "0"], "--iters: expected a positive integer, got '0'"),
        (["sampler", "--iters", "-2"], "--iters: expected a positive integer, got '-2'"),
        (["sampler", "--steps", "-1"], "--steps: expected an integer >= 0, got '-1'"),
        (["sampler", "--profile", "-1"], "--profile: expected an integer >= 0, got '-1'"),
        (["scan", "--iters", "0"], "--iters: expected a positive integer, got '0'"),
        (["versus", "--iters", "0"], "--iters: expected a positive integer, got '0'"),
        (["train", "--warmup", "-1"], "--warmup: expected an integer >= 0, got '-1'"),
        (["train", "--steps", "0"], "--steps: expected a positive integer, got '0'"),
        # --json's folder is checked before the run, not after minutes of measuring
        (["kernels", "--json", "nodir/x.json"], "no directory 'nodir' to write 'nodir/x.json'"),
        (["sampler", "--json", "nodir/x.json"], "no directory 'nodir'"),
        (["scan", "--json", "nodir/x.json"], "no directory 'nodir'"),
        (["versus", "--json", "nodir/x.json"], "no directory 'nodir'"),
        (["train", "--json", "nodir/x.json"], "no directory 'nodir'"),
        (["kernels", "--json", "."], "'.' is a directory, not a file"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------- scan
TINY_SCAN = ["scan", "--device", "cpu", "--shapes", "2x9x8x4,1x70x8x4", "--iters", "1"]
SCAN_ROW = re.compile(
    r"^(?P<path>\S+)\s+(?P<mode>fwd|fwd\+bwd)\s+(?P<shape>\d+x\d+x\d+x\d+)\s+(?P<rest>.+)$"
)
TORCH_SCANS = ["ref", "chunked-loop", "chunked-doubling"]


def _scan_cells(m: re.Match) -> tuple[float, float, float, float, float]:
    """ms, speedup, GB/s, % copy, max err of a timed row."""
    ms, speedup, gbps, pct, err = m["rest"].split()
    assert speedup.endswith("x") and pct.endswith("%")
    return float(ms), float(speedup[:-1]), float(gbps), float(pct[:-1]), float(err)


def test_cpu_scan_table(monkeypatch, capsys, tmp_path) -> None:
    """Every torch path in both modes at every shape, timed, checked against the oracle; the
    fused rows say why they are not timed. The timed fwd+bwd call returns y and the five input
    grads (a spy on the timer runs it once more), so a mode that skipped backward fails here."""
    timed: list[tuple] = []
    real = common.cpu_time_ms

    def spy(fn, iters, *args, **kwargs):
        timed.append(fn())
        return real(fn, iters, *args, **kwargs)

    monkeypatch.setattr(common, "cpu_time_ms", spy)
    out_json = tmp_path / "scan.json"
    assert main([*TINY_SCAN, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    headers, rows = _table(out, SCAN_ROW)
    (h,) = headers
    assert h["dtype"] == "fp32" and h["chunk"] == "64" and float(h["copy_GBps"]) > 0
    assert scan.SCAN_COLUMNS in out.splitlines()
    for col in ("path", "mode", "shape", "ms", "speedup", "GB/s", "% copy", "max err"):
        assert col in scan.SCAN_COLUMNS
    expected = [
        *[(p, mode) for p in TORCH_SCANS for mode in ("fwd", "fwd+bwd")],
        ("triton", "fwd"),
        ("mamba_ssm", "fwd"),
    ]
    assert [(m["path"], m["mode"], m["shape"]) for m in rows] == [
        (p, mode, shape) for shape in ("2x9x8x4", "1x70x8x4") for p, mode in expected
    ]
    for m in rows:
        if m["path"] == "triton":
            assert m["rest"] == common.TRITON_ON_CPU == "n/a (interpreter)"
        elif m["path"] == "mamba_ssm":
            assert m["rest"].startswith("n/a (")  # not installed, or needs CUDA
        else:
            ms, speedup, gbps, pct, err = _scan_cells(m)
            assert ms > 0 and speedup > 0 and gbps >= 0 and pct >= 0
            assert err < 1e-4  # same y (and grads) as the fp32 oracle
            if m["path"] == "ref":
                assert speedup == 1.0 and err == 0.0
    assert out.splitlines()[-1].startswith("triton and mamba_ssm need CUDA")
    # the timer got the copy (first), then the 6 torch cells per shape and nothing fused
    cells = timed[1:]
    assert len(cells) == 2 * 6
    for (bt, length, di, state), i in [((2, 9, 8, 4), 0), ((1, 70, 8, 4), 6)]:
        for j in range(3):
            (y,) = cells[i + 2 * j]  # fwd: y only
            y2, gu, gdelta, gA, gB, gC = cells[i + 2 * j + 1]  # fwd+bwd: y and the grads
            assert y.shape == y2.shape == gu.shape == gdelta.shape == (bt, length, di)
            assert gA.shape == (di, state) and gB.shape == gC.shape == (bt, length, state)
            assert not y.requires_grad and gA.abs().sum() > 0 and gB.abs().sum() > 0
    data = json.loads(out_json.read_text())
    assert data["header"] == h | {
        "threads": int(h["threads"]), "chunk": 64, "copy_GBps": float(h["copy_GBps"]),
        "cuda": None,
    }  # fmt: skip
    assert len(data["rows"]) == len(rows)
    for r, m in zip(data["rows"], rows, strict=True):
        assert (r["path"], r["mode"], r["shape"]) == (m["path"], m["mode"], m["shape"])
        if r["path"] in TORCH_SCANS:
            assert r["status"] == "ok" and r["ms"] > 0 and r["max_err"] < 1e-4
            assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
        else:
            assert r["ms"] is None and r["status"] == m["rest"]
    fwd, fwd_bwd = data["rows"][:2]  # ref at 2x9x8x4: backward reads and writes more
    assert fwd_bwd["bytes"] > 2 * fwd["bytes"]


def test_scan_max_err_catches_a_wrong_path(monkeypatch, capsys, tmp_path) -> None:
    """The error column compares with the oracle, not with the path itself."""
    real = scan._scan_fn

    def off(path):
        fn = real(path)
        return (lambda *a: fn(*a) * 1.01) if path == "chunked-loop" else fn

    monkeypatch.setattr(scan, "_scan_fn", off)
    out_json = tmp_path / "scan.json"
    argv = ["scan", "--device", "cpu", "--shapes", "2x9x8x4", "--iters", "1"]
    assert main([*argv, "--json", str(out_json)]) == 0
    errs = {(r["path"], r["mode"]): r["max_err"] for r in json.loads(out_json.read_text())["rows"]}
    assert errs[("chunked-loop", "fwd")] > 1e-3 and errs[("chunked-loop", "fwd+bwd")] > 1e-3
    assert errs[("chunked-doubling", "fwd")] < 1e-5 and errs[("ref", "fwd+bwd")] == 0.0


def test_scan_fused_triton_row(device, monkeypatch, capsys, tmp_path) -> None:
    """The Triton row itself: on CUDA as the command runs it, on a CPU in the interpreter (which
    the command never times): the fused scan with its gate matches the gated oracle."""
    if device.type == "cpu":
        real = scan._fused_unavailable
        monkeypatch.setattr(
            scan, "_fused_unavailable", lambda p, d: None if p == "triton" else real(p, d)
        )
    out_json = tmp_path / "scan.json"
    argv = ["scan", "--device", device.type, "--dtype", "fp32", "--shapes", "2x9x8x4"]
    assert main([*argv, "--iters", "1", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    (tri,) = [r for r in rows if r["path"] == "triton"]
    assert tri["mode"] == "fwd" and tri["status"] == "ok" and tri["ms"] > 0
    assert tri["max_err"] < 1e-4
    assert tri["bytes"] == next(r["bytes"] for r in rows if r["mode"] == "fwd") + 4 * 2 * 9 * 8


def test_scan_shapes_parse() -> None:
    assert scan._shape_list("16x128x256x16, 1x512x256x16") == [
        (16, 128, 256, 16),
        (1, 512, 256, 16),
    ]
    assert scan._shape_list("2X9x8x4,") == [(2, 9, 8, 4)]
    for bad in ("", ",", "2x9x8", "2x9x8x4x1", "2x9x0x4", "2x-9x8x4", "axbxcxd", "2x9x8x4.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            scan._shape_list(bad)


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_sample_cost_reads_each_weight_as_the_fused_engine_does(steps: int) -> None:
    """The bytes floor's parameter count, from yan-paper's own modules: the encoder and the
    decoder once, each of the T - 1 trunk passes its blocks (the adaptive norms are precomputed
    per time point) and every expert, the cross-attention keys/values once per sample."""
    from yan_serve.config import PRESETS, YANConfig
    from yan_serve.model import YAN

    cfg = YANConfig(**PRESETS["yan-paper"])
    with torch.device("meta"):
        m = YAN(cfg)

    def mats(module: torch.nn.Module, *, keep=lambda name: True) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if p.dim() == 2 and keep(n))

    def is_kv(name: str) -> bool:  # "0.cross_att.W_k.weight"
        return any(f".cross_att.{w}." in f".{name}" for w in ("W_k", "W_v"))

    trunk = mats(m.flow.trf_blocks, keep=lambda n: "adaLN" not in n and not is_kv(n))
    kv_once = mats(m.flow.trf_blocks, keep=is_kv)
    experts = sum(p.numel() for p in m.flow.experts.parameters() if p.dim() == 3)
    want = mats(m.encoder) + (steps - 1) * (trunk + experts) + mats(m.decoder) + kv_once
    assert kv_once > 0 and experts > 0
    assert sampler.sample_cost(cfg, 1, 128, steps)[1] == want
