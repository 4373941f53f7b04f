"""Raw examples as loaded from a corpus, before any task formatting.

Loaders (KJV, the paper's datasets, the bAbI-style generator) produce these; `tasks.formats`
turns them into (source, target) text pairs for each task.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextRecord:
    """A passage of plain text (infilling, last-word completion, pre-training)."""

    text: str
    id: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass
class QARecord:
    """A context, a question and its accepted answers (first is the reference)."""

    context: str
    question: str
    answers: list[str]
    id: str = ""


@dataclass
class ClassRecord:
    """A document with its class: `label` is the integer id, `label_name` its text."""

    text: str
    label: int
    label_name: str
    id: str = ""
