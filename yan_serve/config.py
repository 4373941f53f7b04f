"""Model configuration: one typed dataclass, named presets, and config.json round-trips.

Field names follow the paper author's checkpoint keys where one exists,
so a converted checkpoint's `model_config` maps onto this dataclass almost key for key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INFILL_MASKS = ("collapsed", "per_position")


@dataclass
class YANConfig:
    """Hyper-parameters of one YAN model (Transformer unless a `*_use_mamba` flag is set)."""

    # vocabulary and special tokens
    vocab_size: int = 8192
    pad_token_id: int = 0
    eos_token_id: int = 2
    bos_token_id: int = 1
    mask_token_id: int = 3
    max_length: int = 256

    # widths and depths
    d_model: int = 128
    attention_heads: int = 4
    encoder_n_trf_blocks: int = 2
    n_trf_blocks: int = 2  # flow trunk blocks
    cross_att_idx: tuple[int, ...] = (0, 1)
    decoder_n_resi_blocks: int = 1
    ffn_multiplier: int = 4
    dropout: float = 0.0
    qkv_bias: bool = False

    # mixture-of-experts flow matching
    moe_n_experts: int = 4
    moe_gate_temperature: float = 1.0
    moe_gate_dim_multiplier: int = 1
    moe_sigma: float = 0.1
    ode_steps: int = 3  # Euler time points T at inference (T - 1 trunk evaluations)
    train_ode_steps: int = 4  # time points of the unrolled solve in stage-2 training
    latent_noise: float = 0.1  # u ~ U(0, latent_noise) per sequence, training only
    init_noise: float = 1.0  # z_0 ~ N(0, init_noise^2 I)
    beta_a: float = 1.0  # t ~ Beta(a, b) in training
    beta_b: float = 1.0
    # How an infill source marks its spans: "collapsed" (the paper's format: each masked run is
    # one <mask>, the decoder must infer how many target positions it spans) or "per_position"
    # (one <mask> per target position of the span, so source and target align position by
    # position; the server sizes each span from the request either way)
    infill_masks: str = "collapsed"

    # Mamba variant: a bidirectional Mamba-1 mixer replaces self-attention in the encoder
    # and/or flow-trunk blocks (yan_serve/model/mamba.py, docs/mamba.md)
    encoder_use_mamba: bool = False
    flow_use_mamba: bool = False
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2

    name: str = "custom"

    def __post_init__(self) -> None:
        self.cross_att_idx = tuple(int(i) for i in self.cross_att_idx)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_heads

    @property
    def d_ffn(self) -> int:
        return self.ffn_multiplier * self.d_model

    @property
    def gate_dim(self) -> int:
        return self.moe_gate_dim_multiplier * self.d_model

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.d_model <= 0 or self.attention_heads <= 0:
            raise ValueError("d_model and attention_heads must be positive")
        if self.d_model % self.attention_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by attention_heads={self.attention_heads}"
            )
        bad = [i for i in self.cross_att_idx if not 0 <= i < self.n_trf_blocks]
        if bad:
            raise ValueError(
                f"cross_att_idx {bad} out of range for n_trf_blocks={self.n_trf_blocks}"
            )
        for name in ("pad_token_id", "eos_token_id", "bos_token_id", "mask_token_id"):
            tok = getattr(self, name)
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} outside the vocabulary of {self.vocab_size}")
        if self.moe_n_experts < 1:
            raise ValueError("moe_n_experts must be >= 1")
        if self.moe_sigma <= 0 or self.moe_gate_temperature <= 0:
            raise ValueError("moe_sigma and moe_gate_temperature must be > 0")
        if self.ode_steps < 1 or self.train_ode_steps < 1:
            raise ValueError("ode_steps and train_ode_steps count time points and must be >= 1")
        if self.max_length < 1:
            raise ValueError("max_length must be >= 1")
        if self.infill_masks not in INFILL_MASKS:
            raise ValueError(
                f"infill_masks must be one of {', '.join(INFILL_MASKS)}, got {self.infill_masks!r}"
            )
        for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "ffn_multiplier",
                     "moe_gate_dim_multiplier", "n_trf_blocks"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_n_trf_blocks", "decoder_n_resi_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.latent_noise < 0 or self.init_noise < 0:
            raise ValueError("latent_noise and init_noise must be >= 0")
        if self.beta_a <= 0 or self.beta_b <= 0:
            raise ValueError("beta_a and beta_b (the training time distribution) must be > 0")

    # ------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cross_att_idx"] = list(self.cross_att_idx)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> YANConfig:
        """A config from a config.json-style dict; raises ValueError naming the first unknown
        key or the first value of the wrong JSON type (`"d_model": "wide"`)."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        for name, value in d.items():
            want = _JSON_TYPES.get(str(fields[name].type))
            if want is not None and not want[1](value):
                raise ValueError(f"{name} must be {want[0]}, got {value!r}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write `config.json` (path may be the file or its directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> YANConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not readable: {e}") from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> YANConfig:
        """A named preset, e.g. `YANConfig.from_name("yan-tiny", vocab_size=4096)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# config.json value checks by field annotation: (what the message says, test)
_JSON_TYPES: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "float": ("a number", lambda v: _is_int(v) or isinstance(v, float)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "tuple[int, ...]": (
        "a list of integers",
        lambda v: isinstance(v, (list, tuple)) and all(_is_int(i) for i in v),
    ),
}


# What yan-small shares with the paper's model: heads, cross-attention, decoder, experts, sigma.
_PAPER_SHAPE = dict(attention_heads=8, cross_att_idx=(0, 1, 2, 4), decoder_n_resi_blocks=1,
                    moe_n_experts=6, moe_sigma=0.1, dropout=0.1)  # fmt: skip

# fmt: off
PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in well under an hour; the shipped default is of this class.
    # sigma = 1 (not the paper's 0.1): at d = 128 it keeps expert responsibilities sharp while
    # the NLL stays on a scale the CE term can balance.
    "yan-tiny": dict(
        vocab_size=8192, max_length=256,
        d_model=128, attention_heads=4, encoder_n_trf_blocks=2, n_trf_blocks=3,
        cross_att_idx=(0, 1, 2), decoder_n_resi_blocks=1, dropout=0.0,
        moe_n_experts=4, moe_sigma=1.0,
    ),
    "yan-small": dict(
        _PAPER_SHAPE, vocab_size=32000, max_length=1024,
        d_model=256, encoder_n_trf_blocks=4, n_trf_blocks=6,
    ),
    # The paper's ~200M Transformer variant with the LLaMA-3 vocabulary + <|padding|>, <|mask|>.
    "yan-paper": dict(
        _PAPER_SHAPE, vocab_size=128258, max_length=2048,
        pad_token_id=128256, mask_token_id=128257, bos_token_id=128000, eos_token_id=128001,
        d_model=512, encoder_n_trf_blocks=6, n_trf_blocks=8,
    ),
}
# fmt: on

_MAMBA = dict(encoder_use_mamba=True, flow_use_mamba=True, mamba_d_state=16, mamba_d_conv=4,
              mamba_expand=2)  # fmt: skip
# yan-tiny with the bidirectional Mamba mixer in the encoder and the flow trunk.
PRESETS["yan-mamba-tiny"] = {**PRESETS["yan-tiny"], **_MAMBA}
# The paper's ~210M Mamba variant: yan-paper with 4 encoder / 6 trunk Mamba blocks.
PRESETS["yan-mamba-paper"] = {**PRESETS["yan-paper"], **_MAMBA, "encoder_n_trf_blocks": 4,
                              "n_trf_blocks": 6}  # fmt: skip


def preset_names() -> list[str]:
    return sorted(PRESETS)


# The same-size GPT-2 baseline of each Transformer preset (yan_serve.ar.model.AR_PRESETS): what the
# benches and scripts/train_ar.sh pair it with.
AR_PAIRS = {"yan-tiny": "ar-tiny", "yan-small": "ar-small", "yan-paper": "ar-gpt2"}


def ar_preset_for(yan_preset: str) -> str:
    """The AR preset sized like `yan_preset`; ar-tiny for any other (the Mamba and custom
    configs)."""
    return AR_PAIRS.get(yan_preset, "ar-tiny")


__all__ = ["AR_PAIRS", "PRESETS", "YANConfig", "ar_preset_for", "preset_names"]
