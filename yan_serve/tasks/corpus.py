"""A corpus in memory: its records by kind and split, as `yan_serve.train.recipes.load_corpus`
reads them from a corpus directory; training draws from it and evaluation reads its test split.
"""

from __future__ import annotations

from dataclasses import dataclass

from yan_serve.tasks.formats import TASKS
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord


@dataclass
class Corpus:
    text: dict[str, list[TextRecord]]
    classes: dict[str, list[ClassRecord]]
    qa: dict[str, list[QARecord]]

    def records(self, task: str, split: str) -> list:
        """The records a task draws from: text for infill/complete, QA, or classes."""
        by_task = {"infill": self.text, "complete": self.text, "qa": self.qa,
                   "classify": self.classes}  # fmt: skip
        if task not in by_task:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        return by_task[task][split]


def label_table(corpus: Corpus, split: str = "train") -> dict[int, str]:
    """{label id: name} of the corpus's classification records."""
    return {int(r.label): r.label_name for r in corpus.records("classify", split)}
