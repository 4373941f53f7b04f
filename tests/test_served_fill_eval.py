"""scripts/served_fill_eval.py on a few passages: it prints both rows and never reports an empty
fill when empty spans are not allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_masked_items_hide_one_to_three_words() -> None:
    mod = load_script("served_fill_eval")
    rows = [{"text": "one two three four five six seven eight nine ten"}] * 20
    for text, gold in mod.masked_items(rows, 20, seed=1):
        assert text.count("[MASK]") == 1 and 1 <= len(gold.split()) <= 3
        assert text.replace("[MASK]", gold) == rows[0]["text"]


@pytest.mark.parametrize("model", ["yan-tiny-kjv", "ar-tiny-kjv"])
def test_runs_and_reports_both_settings(tmp_path: Path, capsys, model: str) -> None:
    """Through the server's worker for either backend (the AR baseline fills by FIM)."""
    mod = load_script("served_fill_eval")
    passages = [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light: and there was light.",
        "The LORD is my shepherd; I shall not want.",
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    rc = mod.main(["--model", str(ROOT / "weights" / model), "--data", str(tmp_path), "--n", "3"])
    out = capsys.readouterr().out
    assert rc == 0 and f"({model.split('-')[0]})" in out
    rows = re.findall(r"allow_empty=(True|False)\s+ROUGE-L ([0-9.]+)\s+empty fills (\d+)/3", out)
    assert [r[0] for r in rows] == ["True", "False"]
    assert rows[1][2] == "0"
    ckpt_steps = json.loads((ROOT / "weights" / model / "config.json").read_text()).get("ode_steps")
    assert (f"T = {ckpt_steps}" in out) == (model == "yan-tiny-kjv")  # the checkpoint's by default
    assert mod.main(["--data", str(tmp_path / "missing")]) == 2
    if model == "yan-tiny-kjv":  # --steps: the Euler time points the fills are sampled with
        argv = ["--model", str(ROOT / "weights" / model), "--data", str(tmp_path), "--n", "3"]
        assert mod.main([*argv, "--steps", "2"]) == 0
        assert "T = 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "--n: expected a positive integer, got '0'"),
        (["--n", "-3"], "--n: expected a positive integer, got '-3'"),
        (["--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
        (["--steps", "-1"], "--steps: expected an integer >= 0, got '-1'"),
        (["--span-tokens", "0"], "--span-tokens: expected a positive integer, got '0'"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, tmp_path: Path, capsys) -> None:
    mod = load_script("served_fill_eval")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--data", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_inputs_end_in_one_line(tmp_path: Path, capsys) -> None:
    """A missing or unloadable checkpoint, an empty or broken corpus, a span budget the server
    refuses: exit 2, one line on stderr, nothing printed on stdout."""
    mod = load_script("served_fill_eval")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "The LORD is my shepherd."}) + "\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    yan = str(ROOT / "weights" / "yan-tiny-kjv")
    data = ["--data", str(tmp_path)]
    for argv, message in [
        ([*data, "--model", "/nonexistent"], "no checkpoint directory /nonexistent"),
        ([*data, "--model", str(tmp_path / "ckpt")], f"cannot load {tmp_path / 'ckpt'}"),
        ([*data, "--model", yan, "--split", "empty"], "empty.jsonl holds no passages"),
        ([*data, "--model", yan, "--split", "broken"], "broken.jsonl:1 is not valid JSON"),
        ([*data, "--model", yan, "--span-tokens", "65"], "span budget 65: must be between"),
    ]:
        assert mod.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("served_fill_eval: error: ") and message in err, err


def test_the_default_model_is_the_repositorys_wherever_it_runs(tmp_path: Path, monkeypatch) -> None:
    mod = load_script("served_fill_eval")
    monkeypatch.chdir(tmp_path)  # outside the repository: weights/... is not here
    assert mod.DEFAULT_MODEL == ROOT / "weights" / "yan-tiny-kjv" and mod.DEFAULT_MODEL.is_dir()
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "The LORD is my shepherd."}) + "\n")
    assert mod.main(["--data", ".", "--n", "1"]) == 0


FILL_TEXTS = [
    "In the beginning God created the [MASK] and the earth.",
    "And God said, Let there be [MASK]: and there was light.",
    "The LORD is my [MASK]; I shall not want.",
]


def test_candidates_are_the_servers_n_candidates_in_its_order() -> None:
    """`--candidates K` scores what a request with `"n": K` returns first: the same K fills for
    seeds seed.. seed + K - 1, the same confidences, and the server's first is `first`'s."""
    import torch

    from tests.server.conftest import CHECKPOINT, ServerProcess
    from yan_serve.engine.requests import TaskOptions
    from yan_serve.server.loader import load_worker
    from yan_serve.tasks import serving as T

    mod = load_script("served_fill_eval")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server runs (--threads 1): the same sums
    try:
        worker = load_worker(str(CHECKPOINT), "cpu")
        plans = [T.plan_infill(worker.tokenizer, t, worker.max_length, 2,
                               infill_masks=worker.infill_masks) for t in FILL_TEXTS]  # fmt: skip
        ours = mod.candidate_fills(worker, plans, 5, 4, worker.default_steps, TaskOptions())
    finally:
        torch.set_num_threads(threads)
    server = ServerProcess().wait_ready()
    try:
        for text, cs in zip(FILL_TEXTS, ours, strict=True):
            body = {"text": text, "seed": 5, "n": 4}
            got = httpx.post(server.url + "/v1/infill", json=body, timeout=60).json()
            theirs = [(c["confidence"], c["fills"][0].strip()) for c in got["candidates"]]
            in_order = sorted(cs, key=lambda c: -c[0])  # stable: the earlier seed of equals
            assert [f for _, f in theirs] == [f for _, f in in_order], (text, theirs, cs)
            assert [c for c, _ in theirs] == pytest.approx([c for c, _ in in_order], abs=1e-5)
            assert got["candidates"][0]["fills"][0].strip() == mod.first(cs)[1]
    finally:
        server.stop()


def test_candidates_flag_scores_the_first_and_reports_the_oracle(tmp_path: Path, capsys) -> None:
    mod = load_script("served_fill_eval")
    passages = [t.replace("[MASK]", "word") for t in FILL_TEXTS]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    yan = ["--model", str(ROOT / "weights" / "yan-tiny-kjv"), "--data", str(tmp_path), "--n", "3"]
    assert mod.main([*yan, "--candidates", "3"]) == 0
    out = capsys.readouterr().out
    scored = re.findall(r"ROUGE-L ([0-9.]+) .*the most confident of 3 candidates", out)
    oracle = re.findall(r"best of the 3 candidates by ROUGE-L \(oracle\): ([0-9.]+)", out)
    assert len(scored) == len(oracle) == 2, out
    assert all(float(o) >= float(s) for s, o in zip(scored, oracle, strict=True)), out
    assert mod.main([*yan, "--candidates", "1"]) == 0  # one candidate: the plain run's output
    one = capsys.readouterr().out
    assert mod.main(yan) == 0
    assert capsys.readouterr().out == one and "(oracle)" not in one and "most confident" not in one
    ar = ["--model", str(ROOT / "weights" / "ar-tiny-kjv"), "--data", str(tmp_path)]
    assert mod.main([*ar, "--candidates", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "YAN checkpoints only" in err and len(err.strip().splitlines()) == 1
