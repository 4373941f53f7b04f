"""`yan eval`'s infill position accuracies (the evaluation loop itself runs in
tests/train/test_pipeline.py on the real recipe).

Run: python -m pytest tests/tasks/test_evaluate.py -q
"""

from __future__ import annotations

import pytest

from yan_serve.tasks.evaluate import position_accuracy
from yan_serve.tasks.formats import Example


def test_span_and_copy_accuracy_count_each_position_once() -> None:
    exs = [
        Example("infill", [5, 3, 3, 8, 2], [5, 6, 7, 8, 2], "", focus=[1, 2]),
        Example("infill", [3, 9, 2], [4, 9, 2], "", focus=[0]),
    ]
    # right: span 6 (of 6, 7) and 4; copies 5, 8 and 9 (the second stops before its EOS)
    acc = position_accuracy([[5, 6, 0, 8, 0], [4, 9]], exs)
    assert acc["span_acc"] == pytest.approx(100 * 2 / 3)
    assert acc["copy_acc"] == pytest.approx(100 * 3 / 5)
    assert position_accuracy([list(e.tgt) for e in exs], exs) == {
        "span_acc": 100.0,
        "copy_acc": 100.0,
    }
    # an example without spans has only copied positions
    only_copy = position_accuracy([[1, 2]], [Example("infill", [1, 2], [1, 2], "")])
    assert only_copy == {"copy_acc": 100.0}
    with pytest.raises(ValueError):
        position_accuracy([[1]], exs)
