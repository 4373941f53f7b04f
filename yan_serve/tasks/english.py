"""A broader offline English corpus: the KJV plus the plain-English prose Debian packages ship.

Sources (each a Debian package; `apt-get install -y bible-kjv fortunes dict-gcide wordnet-base
jargon-text`), every one read from its installed files, so the corpus rebuilds byte for byte on
any machine with the same package versions:

- kjv (bible-kjv): passages of consecutive verses; public domain.
- fortunes (fortunes): one quotation each (`%`-separated), ASCII art dropped; BSD-style and
  public domain.
- gcide (dict-gcide): one dictionary entry each, markup removed; GPL-2.0-or-later.
- wordnet (wordnet-base): one synset each (lemmas, gloss, examples); WordNet 3.0 licence.
- jargon (jargon-text): one Jargon File entry each; public domain.

Splits are by document, never by passage: the KJV keeps its held-out books (`tasks.kjv`); any
other document goes to train / val / test by a hash of its id (90 / 5 / 5), so held-out
documents are disjoint from training ones and the assignment does not move when a source grows.
A document longer than `max_words` is cut into consecutive passages that all share its split;
passages that are not prose (`is_prose`: ASCII art and tables inside entries) are dropped.
Each passage is a JSON line `{"id", "source", "split", "text"}` (KJV passages keep their
`section`, the classification label) in `{train,val,test}.jsonl`, the format `yan train --data`
reads; `sources.json` records the counts, the package versions and the licences.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from yan_serve.tasks import kjv
from yan_serve.tasks.splitfiles import split_writers

FORTUNES_DIR = Path("/usr/share/games/fortunes")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
WORDNET_DIR = Path("/usr/share/wordnet")
JARGON_TEXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")

PACKAGES = {
    "kjv": "bible-kjv",
    "fortunes": "fortunes",
    "gcide": "dict-gcide",
    "wordnet": "wordnet-base",
    "jargon": "jargon-text",
}
LICENCES = {
    "kjv": "public domain",
    "fortunes": "BSD-style and public domain (Debian fortunes-mod copyright file)",
    "gcide": "GPL-2.0-or-later (GNU Collaborative International Dictionary of English)",
    "wordnet": "WordNet 3.0 licence (Princeton University; permissive, BSD-like)",
    "jargon": "public domain (the Jargon File, Eric S. Raymond)",
}
SPLIT_SHARES = (("train", 90), ("val", 5), ("test", 5))  # percent, by document id


class MissingSource(RuntimeError):
    """A source's package is not installed (the message names the apt-get command)."""


def split_of_id(doc_id: str) -> str:
    """train / val / test for a document id, from a stable hash (90 / 5 / 5)."""
    bucket = int(hashlib.sha1(doc_id.encode("utf-8")).hexdigest()[:8], 16) % 100
    edge = 0
    for name, share in SPLIT_SHARES:
        edge += share
        if bucket < edge:
            return name
    return SPLIT_SHARES[-1][0]


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def is_prose(text: str, min_words: int = 6, min_letters: float = 0.7) -> bool:
    """At least `min_words` words and a `min_letters` share of letters among the non-space
    characters: drops ASCII art, box-drawn tables and symbol soup."""
    chars = re.sub(r"\s", "", text)
    if len(text.split()) < min_words or not chars:
        return False
    return sum(c.isalpha() for c in chars) / len(chars) >= min_letters


def _need(path: Path, source: str) -> Path:
    if not path.exists():
        raise MissingSource(
            f"{source}: {path} is missing; install it with apt-get install -y {PACKAGES[source]}"
        )
    return path


# ------------------------------------------------------------------------------------ sources
def fortune_docs(root: Path = FORTUNES_DIR) -> Iterator[dict]:
    """One document per quotation of every English fortune file (`%`-separated; the offensive
    `off/` collection and files with a suffix are skipped), keeping only prose: at least 6
    words, and at least 70% of the non-space characters letters (drops ASCII art, tables)."""
    _need(root, "fortunes")
    for f in sorted(p for p in root.iterdir() if p.is_file() and "." not in p.name):
        text = f.read_text(encoding="utf-8", errors="replace")
        for i, chunk in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            body = _clean(chunk)
            if is_prose(body):
                yield {"id": f"fortunes/{f.name}/{i}", "source": "fortunes", "text": body}


_B64 = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def _dict_number(s: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def clean_gcide_entry(raw: str) -> str:
    """A GCIDE entry as prose: pronunciations `\\...\\`, `[1913 Webster]`-style source tags,
    `{braces}` (cross-reference markup) and `--Author.` attributions are removed."""
    text = re.sub(r"\\[^\\\n]*\\", "", raw)
    text = re.sub(
        r"\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]", "", text
    )
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"--\s?[A-Z][\w. ]{0,40}\.", "", text)
    return _clean(text)


def gcide_docs(dict_path: Path = GCIDE_DICT, index_path: Path = GCIDE_INDEX) -> Iterator[dict]:
    """One document per distinct GCIDE entry (several headwords can point at one entry), in
    index order; the database's `00-` information entries are skipped."""
    with gzip.open(_need(dict_path, "gcide"), "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    seen: set[int] = set()
    for line in (
        _need(index_path, "gcide").read_text(encoding="utf-8", errors="replace").splitlines()
    ):
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):
            continue
        off, size = _dict_number(parts[1]), _dict_number(parts[2])
        if off in seen:
            continue
        seen.add(off)
        text = clean_gcide_entry(data[off : off + size].decode("utf-8", errors="replace"))
        if len(text.split()) >= 6:
            yield {"id": f"gcide/{off}", "source": "gcide", "text": text}


_WN_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


def wordnet_docs(root: Path = WORDNET_DIR) -> Iterator[dict]:
    """One document per synset: "lemma, lemma: gloss; examples" from the data files (the
    licence header lines, which start with spaces, are skipped)."""
    _need(root, "wordnet")
    for name in _WN_FILES:
        for line in (root / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if not line or line.startswith(" ") or " | " not in line:
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            n_words = int(fields[3], 16)
            lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lemmas = [re.sub(r"\(\w+\)$", "", w) for w in lemmas]
            text = _clean(f"{', '.join(lemmas)}: {gloss}")
            yield {"id": f"wordnet/{name[5:]}/{fields[0]}", "source": "wordnet", "text": text}


def jargon_docs(path: Path = JARGON_TEXT) -> Iterator[dict]:
    """One document per Jargon File glossary entry (`:headword: ...` paragraphs)."""
    with gzip.open(_need(path, "jargon"), "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    entries = re.split(r"^\s*:([^:\n]+):", text, flags=re.M)
    for head, body in zip(entries[1::2], entries[2::2], strict=False):
        body = re.sub(r"^[^\n]*\n", "", body, count=1) if body.startswith((" ", "/")) else body
        words = _clean(body.replace("{", "").replace("}", ""))
        if len(words.split()) >= 6:
            yield {
                "id": f"jargon/{_clean(head)}",
                "source": "jargon",
                "text": f"{_clean(head)}: {words}",
            }


def kjv_docs(source: str | Path | None = None, max_words: int = 40) -> Iterator[dict]:
    """KJV passages with their book split (`tasks.kjv`): held-out books stay held out."""
    for p in kjv.passages(kjv.parse_verses(kjv.read_bible_text(source)), max_words=max_words):
        yield {"id": f"kjv/{p['id']}", "source": "kjv", "text": p["text"], "split": p["split"],
               "section": p["section"]}  # fmt: skip


SOURCES: dict[str, Callable[[], Iterable[dict]]] = {
    "kjv": kjv_docs,
    "fortunes": fortune_docs,
    "gcide": gcide_docs,
    "wordnet": wordnet_docs,
    "jargon": jargon_docs,
}


# ------------------------------------------------------------------------------------ corpus
def passages_of(doc: dict, max_words: int) -> Iterator[dict]:
    """A document cut into consecutive passages of at most `max_words` words, of near-equal
    length (no one-word tail) and ending at a sentence end where one falls in the second half
    of a passage; each has the document's split and an id `<doc id>#<k>`."""
    words = doc["text"].split()
    split = doc.get("split") or split_of_id(doc["id"])
    n = len(words)
    target = -(-n // max(1, -(-n // max_words)))  # ceil(n / number of passages)
    k = i = 0
    while i < n:
        j = min(n, i + target)
        if j < n:
            for t in range(j, i + target // 2, -1):
                if words[t - 1].endswith((".", "!", "?", ";")):
                    j = t
                    break
        extra = {"section": doc["section"]} if "section" in doc else {}  # KJV: classification
        yield {"id": f"{doc['id']}#{k}", "source": doc["source"], "split": split,
               "text": " ".join(words[i:j]), **extra}  # fmt: skip
        k += 1
        i = j


def _package_version(pkg: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_english_corpus(
    out_dir: str | Path,
    sources: Iterable[str] = tuple(SOURCES),
    max_words: int = 40,
    max_docs: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write `{train,val,test}.jsonl` and `sources.json` to out_dir; returns the summary
    (passages per source and split, package versions, licences). `max_docs` caps each source
    at its first documents (tests, quick recipes). The splits replace those in out_dir only
    once every source is read: a missing package leaves out_dir as it was.

    A passage whose text (case and spacing aside) was already written is dropped, counted as
    `duplicates`: splits go by document id, and the same quotation filed twice (fortune files
    repeat some) would otherwise sit in train and in a held-out split at once."""
    names = list(sources)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}: choose from {', '.join(SOURCES)}")
    out = Path(out_dir)
    counts: dict[str, dict[str, int]] = {}
    seen: set[bytes] = set()  # digests of the passages written, across sources and splits
    with split_writers(out) as files:
        for name in names:
            c = counts.setdefault(
                name,
                {"documents": 0, "train": 0, "val": 0, "test": 0, "dropped": 0, "duplicates": 0},
            )
            for doc in SOURCES[name]():
                if max_docs is not None and c["documents"] >= max_docs:
                    break
                c["documents"] += 1
                for p in passages_of(doc, max_words):
                    if not is_prose(p["text"], min_words=3):  # art and tables inside entries
                        c["dropped"] += 1
                        continue
                    key = hashlib.sha1(" ".join(p["text"].lower().split()).encode()).digest()
                    if key in seen:
                        c["duplicates"] += 1
                        continue
                    seen.add(key)
                    files[p["split"]].write(json.dumps(p, ensure_ascii=False) + "\n")
                    c[p["split"]] += 1
            if progress:
                progress(f"{name}: {c['documents']} documents, {c['train']} / {c['val']} / "
                         f"{c['test']} train / val / test passages")  # fmt: skip
    summary = {
        "max_words": max_words,
        "max_docs": max_docs,
        "sources": {
            n: {
                **counts[n],
                "package": PACKAGES[n],
                "version": _package_version(PACKAGES[n]),
                "licence": LICENCES[n],
            }
            for n in names
        },
    }
    (out / "sources.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
