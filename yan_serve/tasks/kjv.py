"""King James Bible corpus (public domain, Debian package `bible-kjv`), split by book.

`bible -l100000 gen1:1-rev22:21` prints `Book N` chapter headers and `  V text` verse lines.
Passages are runs of consecutive verses inside one chapter, cut to a word budget, so every split
is deterministic given the source text. Test and validation books never appear in training.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from yan_serve.tasks.records import ClassRecord
from yan_serve.tasks.splitfiles import SPLITS, split_writers

TEST_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Philippians", "James")
VAL_BOOKS = ("Esther", "Lamentations", "Haggai", "Titus")

# Seven sections, in canon order; each book belongs to exactly one.
SECTIONS: dict[str, tuple[str, ...]] = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings",
        "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther",
    ),
    "wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": (
        "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
        "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
        "Malachi",
    ),
    "gospels": ("Matthew", "Mark", "Luke", "John", "Acts"),
    "epistles": (
        "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians",
        "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus",
        "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    ),
    "revelation": ("Revelation",),
}  # fmt: skip
SECTION_NAMES = list(SECTIONS)  # label id = index + 1
BOOK_TO_SECTION = {b: s for s, books in SECTIONS.items() for b in books}

_HEADER = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.+)$")


@dataclass
class Verse:
    book: str
    chapter: int
    verse: int
    text: str


def split_of(book: str) -> str:
    if book in TEST_BOOKS:
        return "test"
    if book in VAL_BOOKS:
        return "val"
    return "train"


def read_bible_text(path: str | Path | None = None) -> str:
    """The raw KJV text: from `path` if given, else from the `bible` program."""
    if path is not None:
        return Path(path).read_text()
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError(
            "the `bible` program is missing: apt-get install -y bible-kjv (or pass a text file)"
        )
    return subprocess.run(
        [exe, "-l100000", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout


def parse_verses(text: str) -> list[Verse]:
    """Parse `Book N` headers and `  V text` lines; unknown books are an error."""
    out: list[Verse] = []
    book, chapter = None, 0
    for ln in text.splitlines():
        if not ln.strip():
            continue
        if m := _VERSE.match(ln):
            if book is None:
                raise ValueError(f"verse before any chapter header: {ln[:60]!r}")
            out.append(Verse(book, chapter, int(m["verse"]), m["text"].strip()))
        elif m := _HEADER.match(ln):
            book, chapter = m["book"], int(m["chapter"])
            if book not in BOOK_TO_SECTION:
                raise ValueError(f"unknown book {book!r} in the KJV text")
        else:
            raise ValueError(f"unrecognised line in the KJV text: {ln[:60]!r}")
    return out


def passages(verses: Iterable[Verse], max_words: int = 40, min_words: int = 8) -> Iterator[dict]:
    """Greedy runs of consecutive verses within a chapter, at most `max_words` words (a longer
    single verse is kept whole only if it fits twice the budget, else cut at the budget)."""
    cur: list[Verse] = []

    def flush() -> Iterator[dict]:
        if not cur:
            return
        words = " ".join(v.text for v in cur).split()
        if len(words) >= min_words:
            first, last = cur[0], cur[-1]
            yield {
                "id": f"{first.book} {first.chapter}:{first.verse}-{last.verse}",
                "book": first.book,
                "section": BOOK_TO_SECTION[first.book],
                "split": split_of(first.book),
                "text": " ".join(words[: 2 * max_words]),
            }

    for v in verses:
        n = len(v.text.split())
        if cur and (
            (v.book, v.chapter) != (cur[0].book, cur[0].chapter)
            or sum(len(c.text.split()) for c in cur) + n > max_words
        ):
            yield from flush()
            cur = []
        cur.append(v)
    yield from flush()


def build_corpus(
    out_dir: str | Path, source: str | Path | None = None, max_words: int = 40
) -> dict:
    """Write `{train,val,test}.jsonl` passages to out_dir; returns counts per split. A source
    without verses is refused before anything is written, and the splits replace those already
    in out_dir only once all three are written whole."""
    out = Path(out_dir)
    verses = parse_verses(read_bible_text(source))
    if not verses:
        raise ValueError(f"no KJV verses found in {source or 'the bible-kjv package text'}")
    counts = dict.fromkeys(SPLITS, 0)
    with split_writers(out) as files:
        for p in passages(verses, max_words=max_words):
            files[p["split"]].write(json.dumps(p) + "\n")
            counts[p["split"]] += 1
    return counts


def load_split(corpus_dir: str | Path, split: str) -> list[dict]:
    f = Path(corpus_dir) / f"{split}.jsonl"
    if not f.exists():
        raise FileNotFoundError(f"no {f}: build the corpus first (yan data kjv --out {corpus_dir})")
    return [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]


def section_record(row: dict) -> ClassRecord:
    """Section classification: label id is the 1-based section index, name the section."""
    sec = row["section"]
    return ClassRecord(row["text"], SECTION_NAMES.index(sec) + 1, sec, row.get("id", ""))


def class_records(rows: Iterable[dict]) -> list[ClassRecord]:
    return [section_record(r) for r in rows]
