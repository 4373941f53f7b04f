"""KJV parsing, passages and the by-book split. Run: python -m pytest tests/tasks/test_kjv.py -q"""

from __future__ import annotations

import json

import pytest

from yan_serve.tasks.kjv import (
    BOOK_TO_SECTION,
    SECTIONS,
    TEST_BOOKS,
    VAL_BOOKS,
    build_corpus,
    class_records,
    load_split,
    parse_verses,
    passages,
    split_of,
)

SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of the deep.
  3 And God said, Let there be light: and there was light.

Genesis 2

  1 Thus the heavens and the earth were finished, and all the host of them.

Ruth 1

  1 Now it came to pass in the days when the judges ruled, that there was a famine in the land.
  2 And the name of the man was Elimelech, and the name of his wife Naomi.

Titus 1

  1 Paul, a servant of God, and an apostle of Jesus Christ, according to the faith of God's elect.
"""


def test_all_66_books_have_one_section() -> None:
    books = [b for bs in SECTIONS.values() for b in bs]
    assert len(books) == 66 == len(set(books)) == len(BOOK_TO_SECTION)
    assert BOOK_TO_SECTION["Acts"] == "gospels" and BOOK_TO_SECTION["Jude"] == "epistles"
    assert {split_of(b) for b in TEST_BOOKS} == {"test"}
    assert {split_of(b) for b in VAL_BOOKS} == {"val"}
    assert split_of("Genesis") == "train"


def test_parse_and_passages_stay_inside_chapters() -> None:
    verses = parse_verses(SAMPLE)
    assert len(verses) == 7
    assert (verses[3].book, verses[3].chapter, verses[3].verse) == ("Genesis", 2, 1)
    ps = list(passages(verses, max_words=30, min_words=5))  # Genesis 1:1-3 has 39 words
    assert [p["id"] for p in ps] == [
        "Genesis 1:1-2", "Genesis 1:3-3", "Genesis 2:1-1", "Ruth 1:1-1", "Ruth 1:2-2",
        "Titus 1:1-1"]  # fmt: skip
    assert [p["split"] for p in ps] == ["train", "train", "train", "test", "test", "val"]
    assert ps[3]["section"] == "history"
    assert [p["id"] for p in passages(verses, max_words=40)][:2] == [
        "Genesis 1:1-3",
        "Genesis 2:1-1",
    ]


def test_bad_text_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown book"):
        parse_verses("Hezekiah 1\n\n  1 text\n")
    with pytest.raises(ValueError, match="before any chapter"):
        parse_verses("  1 orphan verse\n")


def test_build_corpus_from_a_file(tmp_path) -> None:
    src = tmp_path / "kjv.txt"
    src.write_text(SAMPLE)
    counts = build_corpus(tmp_path / "c", source=src, max_words=40)
    assert counts == {"train": 2, "val": 1, "test": 1}
    rows = load_split(tmp_path / "c", "test")
    assert rows[0]["book"] == "Ruth"
    cls = class_records(rows)
    assert (cls[0].label, cls[0].label_name) == (2, "history")
    assert all(
        "text" in json.loads(ln) for ln in (tmp_path / "c/train.jsonl").read_text().splitlines()
    )
    with pytest.raises(FileNotFoundError, match="yan data kjv"):
        load_split(tmp_path / "missing", "train")
