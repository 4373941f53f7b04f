"""lm-evaluation-harness's own `local-completions` client runs loglikelihood (multiple choice)
and generate_until tasks against a real server, on a tiny local JSONL task (no downloads)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.server.conftest import CHECKPOINT, ServerProcess
from tests.server.test_openai_fit import prefix_scores, reference

pytestmark = pytest.mark.slow

DOCS = [
    {"context": "In the beginning God created the heaven and the", "choices": [" earth", " sea"],
     "label": 0, "answer": " earth"},
    {"context": "And God said, Let there be light: and there was", "choices": [" light", " night"],
     "label": 0, "answer": " light"},
    {"context": "The LORD is my shepherd; I shall not", "choices": [" want", " walk", " sing"],
     "label": 0, "answer": " want"},
]  # fmt: skip
SEED = 1234  # lm-eval's default request seed


def write_tasks(d: Path) -> Path:
    """A Hugging Face tokenizer folder for lm-eval (the checkpoint's tokenizer.json) and two
    task YAMLs over one JSONL file. Returns the tokenizer folder."""
    tok = d / "tokenizer"
    tok.mkdir()
    shutil.copy(CHECKPOINT / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"})
    )
    data = d / "kjv.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\ndoc_to_text: "{{context}}"\ntarget_delimiter: ""\n'
    )
    (d / "mc.yaml").write_text(
        "task: yan_kjv_mc\noutput_type: multiple_choice\n" + common
        + 'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
    )  # fmt: skip
    (d / "gen.yaml").write_text(
        "task: yan_kjv_gen\noutput_type: generate_until\n" + common
        + 'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 4\n'
        "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    return tok


def test_lm_eval_local_completions_runs_both_request_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")  # in the test extra: present in CI
    from lm_eval.tasks import TaskManager

    tok_dir = write_tasks(tmp_path)
    s = ServerProcess().wait_ready()
    try:
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": s.url + "/v1/completions",
                "model": "yan-tiny-kjv",
                "tokenizer": str(tok_dir),
                "tokenizer_backend": "huggingface",
                "max_length": 256,
                "max_retries": 1,
            },
            tasks=["yan_kjv_mc", "yan_kjv_gen"],
            task_manager=TaskManager(include_path=str(tmp_path)),
            log_samples=True,
        )
        import openai

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        direct = [
            client.completions.create(model="yan-tiny-kjv", prompt=d["context"], max_tokens=4,
                                      stop=["."], temperature=0, seed=SEED).choices[0].text
            for d in DOCS
        ]  # fmt: skip
    finally:
        assert s.stop() == 0

    tok, _ = reference()
    mc = res["samples"]["yan_kjv_mc"]
    assert len(mc) == len(DOCS)
    right = 0
    for sample in mc:
        doc = sample["doc"]
        ctx = tok.encode(doc["context"])
        pairs = sample["filtered_resps"]  # (loglikelihood, is_greedy) per choice
        lls = [p[0] for p in pairs]
        for choice, (ll, greedy) in zip(doc["choices"], pairs, strict=True):
            ids = ctx + tok.encode(choice)
            scores = prefix_scores(ids, SEED)[len(ctx) - 1 :]
            want = sum(lp for lp, _ in scores)
            assert math.isclose(ll, want, abs_tol=1e-3), (choice, ll, want)
            assert greedy == all(best == t for (_, best), t in zip(scores, ids[len(ctx) :],
                                                                   strict=True))  # fmt: skip
        right += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
    assert res["results"]["yan_kjv_mc"]["acc,none"] == pytest.approx(right / len(DOCS))

    gen = res["samples"]["yan_kjv_gen"]
    assert [g["filtered_resps"][0] for g in gen] == direct  # lm-eval read what the server wrote
    assert 0.0 <= res["results"]["yan_kjv_gen"]["exact_match,none"] <= 1.0
