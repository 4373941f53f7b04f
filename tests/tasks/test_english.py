"""The broader English corpus: each reader on small files in its package's format, the passage
cutter, the document-level split, and (where the Debian packages are installed) the real build."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from yan_serve.tasks import english
from yan_serve.tasks.english import (
    MissingSource,
    build_english_corpus,
    fortune_docs,
    gcide_docs,
    jargon_docs,
    passages_of,
    split_of_id,
    wordnet_docs,
)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dict_number(v: int) -> str:
    out = ""
    while True:
        out = _B64[v % 64] + out
        v //= 64
        if not v:
            return out


def test_split_is_stable_and_near_90_5_5() -> None:
    ids = [f"doc/{i}" for i in range(20000)]
    first = [split_of_id(i) for i in ids]
    assert first == [split_of_id(i) for i in ids]
    share = Counter(first)
    assert abs(share["train"] / len(ids) - 0.90) < 0.01
    assert abs(share["val"] / len(ids) - 0.05) < 0.01
    assert abs(share["test"] / len(ids) - 0.05) < 0.01


def test_passages_cover_the_document_in_order_within_budget() -> None:
    words = [f"w{i}" + ("." if i % 7 == 6 else "") for i in range(101)]
    doc = {"id": "x/1", "source": "fortunes", "text": " ".join(words)}
    parts = list(passages_of(doc, max_words=20))
    assert " ".join(p["text"] for p in parts).split() == words
    assert all(len(p["text"].split()) <= 20 for p in parts)
    assert len({p["split"] for p in parts}) == 1 and parts[0]["split"] == split_of_id("x/1")
    assert [p["id"] for p in parts] == [f"x/1#{k}" for k in range(len(parts))]
    # cut at a sentence end when one falls in the second half of the budget
    assert parts[0]["text"].endswith(".")
    kjv_doc = {**doc, "split": "test", "section": "law"}
    assert {(p["split"], p["section"]) for p in passages_of(kjv_doc, 20)} == {("test", "law")}


def test_fortunes_keep_prose_and_drop_art(tmp_path: Path) -> None:
    (tmp_path / "wisdom").write_text(
        "Better late than never, said the tortoise to the hare.\n%\n"
        "  ____\n /    \\\n|  ()  |  <-- +--+--+\n \\____/   |##|##|\n%\nToo short.\n%\n"
        "A journey of a thousand miles begins with a single step.\n"
    )
    (tmp_path / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    docs = list(fortune_docs(tmp_path))
    assert [d["text"] for d in docs] == [
        "Better late than never, said the tortoise to the hare.",
        "A journey of a thousand miles begins with a single step.",
    ]
    assert [d["id"] for d in docs] == ["fortunes/wisdom/0", "fortunes/wisdom/3"]


def test_gcide_entries_are_read_through_the_index_and_cleaned(tmp_path: Path) -> None:
    entries = [
        'Retreat \\Re*treat"\\, v. i. To make a retreat; to retire from any position or place.\n'
        "   [1913 Webster]\n",
        "Wier \\Wier\\, n. Same as {Weir}, a dam in a river to stop and raise the water.\n"
        "   [1913 Webster]\n",
    ]
    blob, index, off, last = b"", [], 0, 0
    info = "This is the database information header, not an entry of the dictionary.\n"
    for word, text in [("00-database-info", info), ("Retreat", entries[0]),
                       ("Retreating", entries[0]), ("Wier", entries[1])]:  # fmt: skip
        raw = text.encode()
        if word == "Retreating":  # a second headword pointing at the same entry
            index.append(f"{word}\t{_dict_number(last)}\t{_dict_number(len(raw))}")
            continue
        index.append(f"{word}\t{_dict_number(off)}\t{_dict_number(len(raw))}")
        blob += raw
        last, off = off, off + len(raw)
    (tmp_path / "g.dict.dz").write_bytes(gzip.compress(blob))
    (tmp_path / "g.index").write_text("\n".join(index) + "\n")
    docs = list(gcide_docs(tmp_path / "g.dict.dz", tmp_path / "g.index"))
    assert [d["text"] for d in docs] == [
        "Retreat , v. i. To make a retreat; to retire from any position or place.",
        "Wier , n. Same as Weir, a dam in a river to stop and raise the water.",
    ]


def test_wordnet_synsets_give_lemmas_gloss_and_examples(tmp_path: Path) -> None:
    header = "  1 This software and database is being provided to you, the LICENSEE | x\n"
    line = (
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 000 | a member of the genus "
        'Canis; "the dog barked all night"\n'
    )
    adj = "00001740 00 a 01 able(a) 0 000 | having the necessary means or skill\n"
    for name, text in [("data.noun", header + line), ("data.verb", ""), ("data.adj", adj),
                       ("data.adv", "")]:  # fmt: skip
        (tmp_path / name).write_text(text)
    docs = list(wordnet_docs(tmp_path))
    assert [d["text"] for d in docs] == [
        'dog, domestic dog, Canis familiaris: a member of the genus Canis; "the dog barked all '
        'night"',
        "able: having the necessary means or skill",
    ]
    assert [d["id"] for d in docs] == ["wordnet/noun/02084071", "wordnet/adj/00001740"]


def test_jargon_entries(tmp_path: Path) -> None:
    text = (
        "Front matter that is not an entry.\n\n   :gobble: vt.\n\n   1. To consume, usu.: used "
        "with 'up'. The output spy gobbles characters.\n\n   :goat file:\n\n   A sacrificial "
        "file used to test a computer {virus}.\n"
    )
    path = tmp_path / "jargon.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    docs = list(jargon_docs(path))
    assert [d["id"] for d in docs] == ["jargon/gobble", "jargon/goat file"]
    assert docs[1]["text"] == "goat file: A sacrificial file used to test a computer virus."


def test_build_is_disjoint_by_document_and_records_sources(tmp_path: Path, monkeypatch) -> None:
    def letters(n: int) -> str:  # distinct all-letter words: every passage is prose, none equal
        return "".join(chr(97 + int(c)) for c in str(n))

    docs = [{"id": f"fake/{i}", "source": "jargon",
             "text": " ".join(f"w{letters(i)}x{letters(k)}" for k in range(5 + i % 90))}
            for i in range(400)]  # fmt: skip
    docs[7]["text"] = "+--+--+ |##|##| +--+--+ |##|##| +--+--+"  # a table: dropped
    monkeypatch.setitem(english.SOURCES, "jargon", lambda: iter(docs))
    summary = build_english_corpus(tmp_path, sources=["jargon"], max_words=20)
    rows = {s: [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}  # fmt: skip
    doc_split = {}
    for split, items in rows.items():
        for r in items:
            doc = r["id"].split("#")[0]
            assert doc_split.setdefault(doc, split) == split, f"{doc} is in two splits"
    assert set(doc_split.values()) == {"train", "val", "test"}
    written = json.loads((tmp_path / "sources.json").read_text())
    assert written == summary
    got = summary["sources"]["jargon"]
    assert got["documents"] == 400 and got["dropped"] == 1 and got["duplicates"] == 0
    assert (got["train"], got["val"], got["test"]) == tuple(len(rows[s]) for s in rows)
    assert got["licence"].startswith("public domain")


def test_a_text_filed_twice_is_written_once(tmp_path: Path, monkeypatch) -> None:
    """The same quotation under two ids (fortune files repeat some) lands in one split only:
    ids that hash to train and to a held-out split, and a copy differing in case and spacing."""
    ids = [f"fake/{i}" for i in range(200)]
    held = next(i for i in ids if split_of_id(i) != "train")
    train = next(i for i in ids if split_of_id(i) == "train")
    quote = "Ask not what your country can do for you, ask what you can do."
    again = "  " + quote.upper().replace(" ", "  ")
    other = "Another saying of six words."
    docs = [{"id": held, "source": "fortunes", "text": quote},
            {"id": train, "source": "fortunes", "text": again},
            {"id": "fake/other", "source": "fortunes", "text": other}]  # fmt: skip
    monkeypatch.setitem(english.SOURCES, "fortunes", lambda: iter(docs))
    summary = build_english_corpus(tmp_path, sources=["fortunes"], max_words=40)
    texts = [json.loads(x)["text"].lower() for s in ("train", "val", "test")
             for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()]  # fmt: skip
    assert sum(" ".join(t.split()) == quote.lower() for t in texts) == 1
    assert len(texts) == 2 and summary["sources"]["fortunes"]["duplicates"] == 1


def test_missing_package_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(MissingSource, match="apt-get install -y fortunes"):
        list(fortune_docs(tmp_path / "absent"))
    with pytest.raises(ValueError, match="unknown source"):
        build_english_corpus(tmp_path, sources=["klingon"])


def test_cli_fails_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from yan_serve.cli import main

    monkeypatch.setattr(english, "FORTUNES_DIR", tmp_path / "absent")
    monkeypatch.setitem(english.SOURCES, "fortunes", lambda: fortune_docs(tmp_path / "absent"))
    assert main(["data", "english", "--out", str(tmp_path / "c"), "--sources", "fortunes"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y fortunes" in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()  # nothing written


@pytest.mark.skipif(
    not all(p.exists() for p in (english.FORTUNES_DIR, english.GCIDE_INDEX, english.WORDNET_DIR,
                                 english.JARGON_TEXT)),
    reason="the Debian packages fortunes, dict-gcide, wordnet-base and jargon-text",
)  # fmt: skip
def test_real_packages_build(tmp_path: Path) -> None:
    summary = build_english_corpus(
        tmp_path, sources=["fortunes", "gcide", "wordnet", "jargon"], max_docs=300
    )
    for name, c in summary["sources"].items():
        assert c["documents"] == 300, name
        assert c["train"] > c["val"] + c["test"] > 0, (name, c)
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert all(len(r["text"].split()) <= 40 and english.is_prose(r["text"], 3) for r in rows)
    gcide = [r["text"] for r in rows if r["source"] == "gcide"]
    assert gcide and not any("[1913 Webster]" in t or "\\" in t for t in gcide)
