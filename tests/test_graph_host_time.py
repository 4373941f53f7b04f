"""scripts/graph_host_time.py: the graph path's host work, timed with the replay stubbed out."""

from __future__ import annotations

import re

import pytest

from tests.conftest import load_script


def test_prints_each_piece_in_ms(capsys) -> None:
    mod = load_script("graph_host_time")
    assert mod.main(["--batch", "3", "--length", "16", "--iters", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "batch 3 x 16, one thread, 2 calls: median and min ms"
    names = [re.match(r"^(.*?)\s+\d+\.\d\d\s+\d+\.\d\d$", ln).group(1).strip() for ln in lines[1:]]
    assert names == ["generate (no replay)", "validate", "pack", "assemble"]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--batch", "0"], "--batch"),
        (["--iters", "0"], "--iters"),
        (["--length", "-1"], "--length"),
    ],
)
def test_bad_sizes_exit_2_before_any_work(argv: list[str], flag: str, capsys) -> None:
    mod = load_script("graph_host_time")
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and f"argument {flag}: expected a positive integer" in err
