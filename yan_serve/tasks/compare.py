"""`yan compare`: one quality table from the `eval.json` files of several checkpoints.

YAN checkpoints get one column per Euler step count asked for; AR checkpoints one column (their
rows carry steps = 0). Rows pair the protocols that answer the same question:

- infill, paper protocol: the model writes the whole passage at the reference length (YAN
  `infill` with oracle length; AR `infill`, regenerating the passage after the source);
- infill keeping the known text: YAN `infill-served` (the server's default budget per span, no
  oracle) and AR `infill-fim` (fill-in-the-middle: only the spans, put back into the source);
- last-word completion exact match, QA F1 / EM, and section classification accuracy, generated
  and by scoring every label (`classify-scored`, the server's `labels` mode);
- decoding throughput of the paper-protocol infill run (tokens/s, batch of the eval run).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# (row label, {"yan": task, "ar": task}, score key)
ROWS: tuple[tuple[str, dict[str, str], str], ...] = (
    ("infill ROUGE-1, paper protocol (whole passage)", {"yan": "infill", "ar": "infill"}, "rouge1"),
    ("infill ROUGE-L, paper protocol", {"yan": "infill", "ar": "infill"}, "rougeL"),
    (
        "infill ROUGE-1, known text kept (YAN served / AR FIM)",
        {"yan": "infill-served", "ar": "infill-fim"},
        "rouge1",
    ),
    (
        "infill ROUGE-1, copy-the-source baseline",
        {"yan": "infill-copy-source", "ar": "infill-copy-source"},
        "rouge1",
    ),
    ("completion last-word EM %", {"yan": "complete", "ar": "complete"}, "exact_match"),
    ("QA F1", {"yan": "qa", "ar": "qa"}, "f1"),
    ("QA EM %", {"yan": "qa", "ar": "qa"}, "exact_match"),
    ("classification accuracy %, generated", {"yan": "classify", "ar": "classify"}, "accuracy"),
    (
        "classification accuracy %, scored labels",
        {"yan": "classify-scored", "ar": "classify-scored"},
        "accuracy",
    ),
    ("infill decoding tokens/s (eval batch)", {"yan": "infill", "ar": "infill"}, "tokens_per_s"),
)


@dataclass
class Column:
    name: str
    kind: str  # "yan" | "ar"
    steps: int  # 0 for AR
    results: list[dict]

    def value(self, task: str, key: str) -> float | None:
        for r in self.results:
            steps_match = r["task"] == "infill-copy-source" or r["steps"] == self.steps
            if r["task"] == task and steps_match:
                return r["tokens_per_s"] if key == "tokens_per_s" else r["scores"].get(key)
        return None


def _load(path: str | Path) -> tuple[str, str, list[dict]]:
    """(name, kind, results) of a checkpoint directory or an eval JSON file."""
    p = Path(path)
    f = p / "eval.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no eval.json in {p} (run `yan eval {p} --json ...` first)")
    try:
        results = json.loads(f.read_text())["results"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f} is not a `yan eval --json` file") from e
    from yan_serve.weights import is_ar_checkpoint

    ar = is_ar_checkpoint(f.parent) or all(r["steps"] == 0 for r in results)
    kind = "ar" if ar else "yan"
    return (p.name if p.is_dir() else f.parent.name), kind, results


def columns(paths: Sequence[str | Path], steps: Sequence[int]) -> list[Column]:
    cols = []
    for path in paths:
        name, kind, results = _load(path)
        if kind == "ar":
            cols.append(Column(name, kind, 0, results))
            continue
        have = sorted({r["steps"] for r in results if r["steps"] > 0})
        missing = [s for s in steps if s not in have]
        if missing:
            raise ValueError(f"{name} has no results at T={missing[0]} (has {have})")
        cols += [Column(f"{name} T={s}", kind, s, results) for s in steps]
    return cols


def table(cols: Sequence[Column]) -> str:
    """A markdown table: one row per metric, one column per (checkpoint, T); "-" where absent."""

    def fmt(v: float | None, key: str) -> str:
        if v is None:
            return "-"
        return f"{v:,.0f}" if key == "tokens_per_s" else f"{v:.1f}"

    head = "| metric | " + " | ".join(c.name for c in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for label, tasks, key in ROWS:
        vals = [fmt(c.value(tasks[c.kind], key), key) for c in cols]
        if all(v == "-" for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    ns = {c.name: {r["task"]: r["n"] for r in c.results} for c in cols}
    sizes = sorted({n for d in ns.values() for n in d.values()})
    lines.append("")
    lines.append(f"Examples per task: {', '.join(map(str, sizes))} (test split).")
    return "\n".join(lines)
