"""Tokenizers: a byte-level BPE trained with `tokenizers`, or any local Hugging Face tokenizer.

YAN needs four special tokens: padding, mask (a collapsed masked span), BOS and EOS. A trained
BPE puts them at ids 0..3; a foreign tokenizer (e.g. LLaMA-3) gets `<|padding|>` and `<|mask|>`
appended, as the paper does (128256, 128257).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")
_ALIASES = {
    "pad": ("<pad>", "<|padding|>", "[PAD]"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]"),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "mask": ("<mask>", "<|mask|>", "[MASK]"),
}
_ADDED = {"pad": "<|padding|>", "mask": "<|mask|>"}


@dataclass
class SpecialIds:
    pad: int
    bos: int
    eos: int
    mask: int

    def ids(self) -> tuple[int, int, int, int]:
        return (self.pad, self.bos, self.eos, self.mask)


class YANTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows YAN's special tokens."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        ids = {}
        for role, names in _ALIASES.items():
            found = [tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None]
            if not found:
                if role not in _ADDED:
                    raise ValueError(f"tokenizer has no {role} token (tried {', '.join(names)})")
                tok.add_special_tokens([_ADDED[role]])
                found = [tok.token_to_id(_ADDED[role])]
            ids[role] = found[0]
        self.special = SpecialIds(**ids)
        # Text is text: a literal "<eos>" or "<mask>" in a request or a corpus is encoded as
        # those characters, never as the control token (which would end, pad or re-mask a
        # sequence where the user wrote a word). Special ids enter only where code puts them.
        tok.encode_special_tokens = True

    # ------------------------------------------------------------------ io
    @classmethod
    def load(cls, path: str | Path) -> YANTokenizer:
        """From a directory holding `tokenizer.json` (ours or a Hugging Face one) or that file."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.exists():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{f} is not a valid tokenizers JSON file: {e}") from None
        return cls(tok)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))

    # ---------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added, special-token strings in `text` encoded as plain
        text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def check_compatible(self, vocab_size: int, pad: int, eos: int, mask: int) -> None:
        """Raise ValueError if this tokenizer cannot drive a model with these ids."""
        s = self.special
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer has {self.vocab_size} tokens but the model's vocabulary is {vocab_size}"
            )
        if (s.pad, s.eos, s.mask) != (pad, eos, mask):
            raise ValueError(
                f"tokenizer special ids pad/eos/mask = {s.pad}/{s.eos}/{s.mask} do not match the "
                f"model's {pad}/{eos}/{mask}: wrong tokenizer for this checkpoint"
            )


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> YANTokenizer:
    """Train a byte-level BPE with YAN's special tokens at ids 0..3 (pad, bos, eos, mask)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return YANTokenizer(tok)
