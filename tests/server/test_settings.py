"""Server settings from flags and YAN_SERVE_* environment variables."""

from __future__ import annotations

import pytest

from yan_serve.server.settings import Settings, build_parser, default_model_dir, parse_settings


def test_flags_env_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings([])
    assert s.model == default_model_dir() and s.port == 8000 and s.api_key is None
    monkeypatch.setenv("YAN_SERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("YAN_SERVE_API_KEY", "k")
    s = parse_settings(["--port", "9001"])
    assert (s.max_batch_size, s.api_key, s.port) == (7, "k", 9001)
    assert parse_settings(["--max-batch-size", "3"]).max_batch_size == 3  # flag beats env


def test_every_setting_has_a_flag() -> None:
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert flags == set(Settings.__dataclass_fields__)


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "tpu"],
        ["--max-queue", "0"],
        ["--log-level", "loud"],
        ["--linears", "cutlass"],
        ["--ar-step", "jit"],
    ],
)
def test_bad_settings_raise_readable_errors(argv: list[str]) -> None:
    with pytest.raises(ValueError, match=argv[0].lstrip("-").split("-")[0]):
        parse_settings(argv)


def test_kernel_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_settings([])
    assert (s.linears, s.ar_step) == ("cublas", "torch")
    monkeypatch.setenv("YAN_SERVE_AR_STEP", "triton")
    s = parse_settings(["--linears", "fused"])
    assert (s.linears, s.ar_step) == ("fused", "triton")


def test_kernel_choices_reach_the_workers() -> None:
    """`--linears` reaches YAN's fused engine, `--ar-step` the AR worker's decode runner."""
    from pathlib import Path

    from yan_serve.server.loader import load_worker

    yan = load_worker(default_model_dir(), "cpu", linears="fused", ar_step="triton")
    assert yan.sampler.linears == "fused"
    ar_dir = Path(default_model_dir()).parent / "ar-tiny-kjv"
    ar = load_worker(ar_dir, "cpu", linears="fused", ar_step="triton")
    assert ar.step == "triton"


def test_bad_number_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("YAN_SERVE_MAX_QUEUE", "lots")
    with pytest.raises(ValueError, match="YAN_SERVE_MAX_QUEUE"):
        parse_settings([])
