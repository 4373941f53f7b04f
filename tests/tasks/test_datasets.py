"""Dataset loaders on tiny fixture files written in each dataset's public format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yan_serve.tasks.datasets import (
    AG_NEWS_LABELS,
    DBPEDIA_LABELS,
    LOADERS,
    load_ag_news,
    load_babi,
    load_dataset,
    load_dbpedia,
    load_jsonl,
    load_narrativeqa,
    load_narrativeqa_summaries,
    load_rocstories,
    load_simplestories,
    load_squad,
    load_sst2,
    load_text,
    normalize_split,
)
from yan_serve.tasks.records import ClassRecord, QARecord, TextRecord


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- NarrativeQA

QAPS = (
    "document_id,set,question,answer1,answer2,question_tokenized,answer1_tokenized,"
    "answer2_tokenized\n"
    'doc1,train,"Who, in the end, wins?",The fox,"A fox, clearly",who wins ?,the fox,a fox\n'
    "doc1,train,Where is it set?,Paris,Paris,where ?,paris,paris\n"
    "doc2,test,Why?, because , ,why ?,because,\n"
    "doc1,train,What colour?,red,,what ?,red,\n"
)
SUMMARIES = (
    "document_id,set,summary,summary_tokenized\n"
    'doc1,train,"A fox, a ""clever"" one,\nlives in Paris. ",a fox\n'
    "doc2,test,Nothing happens.,nothing happens .\n"
)


@pytest.fixture
def nqa_dir(tmp_path: Path) -> Path:
    write(tmp_path / "nqa" / "qaps.csv", QAPS)
    write(tmp_path / "nqa" / "third_party" / "wikipedia" / "summaries.csv", SUMMARIES)
    return tmp_path / "nqa"


def test_narrativeqa_joins_and_filters(nqa_dir: Path) -> None:
    summary1 = 'A fox, a "clever" one,\nlives in Paris.'
    train = load_narrativeqa(nqa_dir, split="train")
    assert train == [
        QARecord(summary1, "Who, in the end, wins?", ["The fox", "A fox, clearly"], "doc1-0"),
        QARecord(summary1, "Where is it set?", ["Paris"], "doc1-1"),
        QARecord(summary1, "What colour?", ["red"], "doc1-2"),
    ]
    assert load_narrativeqa(nqa_dir, split="test") == [
        QARecord("Nothing happens.", "Why?", ["because"], "doc2-0")
    ]
    assert [r.id for r in load_narrativeqa(nqa_dir)] == ["doc1-0", "doc1-1", "doc2-0", "doc1-2"]
    assert load_narrativeqa(nqa_dir, split="validation") == []
    assert len(load_narrativeqa(nqa_dir, split="train", limit=2)) == 2
    # A file inside the directory also locates the pair.
    assert len(load_narrativeqa(nqa_dir / "qaps.csv", split="test")) == 1


def test_narrativeqa_summaries(nqa_dir: Path) -> None:
    recs = load_narrativeqa_summaries(nqa_dir)
    assert recs == [
        TextRecord('A fox, a "clever" one,\nlives in Paris.', "doc1", {"set": "train"}),
        TextRecord("Nothing happens.", "doc2", {"set": "test"}),
    ]
    direct = nqa_dir / "third_party" / "wikipedia" / "summaries.csv"
    assert load_narrativeqa_summaries(direct, split="test") == recs[1:]


def test_narrativeqa_errors(tmp_path: Path, nqa_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'dev2'"):
        load_narrativeqa(nqa_dir, split="dev2")
    # summaries missing a document
    write(nqa_dir / "summaries.csv", "document_id,set,summary\ndoc1,train,S\n")
    with pytest.raises(ValueError, match=r"qaps\.csv: line \d+: document_id doc2 has no summary"):
        load_narrativeqa(nqa_dir)
    # missing column named in the message
    bad = tmp_path / "bad"
    write(bad / "qaps.csv", "document_id,set,question,answer1\ndoc1,train,q,a\n")
    write(bad / "summaries.csv", SUMMARIES)
    with pytest.raises(ValueError, match=r"qaps\.csv: missing column\(s\) answer2"):
        load_narrativeqa(bad)
    only = tmp_path / "only"
    write(only / "qaps.csv", QAPS)
    with pytest.raises(FileNotFoundError, match=r"summaries\.csv not found"):
        load_narrativeqa(only)
    with pytest.raises(FileNotFoundError, match=r"qaps\.csv not found"):
        load_narrativeqa(tmp_path / "bad" / "..")


# --------------------------------------------------------------------------- stories


def test_rocstories(tmp_path: Path) -> None:
    p = write(
        tmp_path / "roc.csv",
        "storyid,storytitle,sentence1,sentence2,sentence3,sentence4,sentence5\n"
        'id-1,The Trip,"Anna, tired, sat down.",She slept.,"He said ""hi"".",'
        "It rained.,The end.\n"
        "id-2,Two,A.,B.,C.,D.,E.\n",
    )
    assert load_rocstories(p) == [
        TextRecord(
            'Anna, tired, sat down. She slept. He said "hi". It rained. The end.',
            "id-1",
            {"title": "The Trip"},
        ),
        TextRecord("A. B. C. D. E.", "id-2", {"title": "Two"}),
    ]
    assert load_dataset("rocstories", p, limit=1)[0].id == "id-1"


def test_rocstories_cloze_format(tmp_path: Path) -> None:
    p = write(
        tmp_path / "cloze.csv",
        "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
        "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
        "c1,A.,B.,C.,D.,Wrong.,Right.,2\n",
    )
    assert load_rocstories(p) == [TextRecord("A. B. C. D. Right.", "c1")]


def test_simplestories(tmp_path: Path) -> None:
    p = write(
        tmp_path / "ss.jsonl",
        json.dumps({"story": " Once upon a time.\nThe end. ", "topic": "x"})
        + "\n\n"
        + json.dumps({"text": "Second.", "id": 7})
        + "\n",
    )
    assert load_simplestories(p) == [
        TextRecord("Once upon a time.\nThe end.", "1"),
        TextRecord("Second.", "7"),
    ]


def test_bad_json_line_is_named_without_the_decoder_traceback(tmp_path: Path) -> None:
    p = write(tmp_path / "ss.jsonl", '{"story": "ok"}\n\n{"story": "broken"\n')
    with pytest.raises(ValueError, match=r"ss\.jsonl: line 3: bad JSON") as info:
        load_simplestories(p)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --------------------------------------------------------------------------- SQuAD

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Cats",
            "paragraphs": [
                {
                    "context": "The cat sat on the mat in 1999.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where did the cat sit? ",
                            "answers": [
                                {"text": "on the mat", "answer_start": 12},
                                {"text": "the mat", "answer_start": 16},
                                {"text": "on the mat", "answer_start": 12},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "When?",
                            "answers": [{"text": "1999", "answer_start": 26}],
                        },
                    ],
                }
            ],
        },
        {
            "title": "Dogs",
            "paragraphs": [
                {
                    "context": "Dogs bark.",
                    "qas": [
                        {"id": "q3", "question": "What do dogs do?", "answers": []},
                        {
                            "id": "q4",
                            "question": "Who barks?",
                            "answers": [{"text": "Dogs", "answer_start": 0}],
                        },
                    ],
                }
            ],
        },
    ],
}


def test_squad(tmp_path: Path) -> None:
    p = write(tmp_path / "dev-v1.1.json", json.dumps(SQUAD))
    expected = [
        QARecord(
            "The cat sat on the mat in 1999.", "Where did the cat sit?", ["on the mat", "the mat"]
        ),
        QARecord("The cat sat on the mat in 1999.", "When?", ["1999"]),
        QARecord("Dogs bark.", "Who barks?", ["Dogs"]),
    ]
    for rec, i in zip(expected, ("q1", "q2", "q4"), strict=True):
        rec.id = i
    assert load_squad(p) == expected
    # A directory: split picks the official file name.
    assert load_dataset("squad", tmp_path, split="validation", limit=1) == expected[:1]
    with pytest.raises(FileNotFoundError, match="no train file in"):
        load_squad(tmp_path, split="train")
    with pytest.raises(ValueError, match="is a directory: pass split"):
        load_squad(tmp_path)


def test_squad_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_squad(tmp_path / "nope.json")


# --------------------------------------------------------------------------- bAbI

BABI = (
    "1 Mary moved to the bathroom.\n"
    "2 Sandra journeyed to the bedroom.\n"
    "3 Mary got the football there.\n"
    "4 John went to the kitchen.\n"
    "5 Where is the football? \tbathroom\t3 1\n"
    "6 Mary went back to the kitchen.\n"
    "7 Where is the football? \tkitchen\t3 6\n"
    "1 Daniel took the apple there.\n"
    "2 Daniel went to the garden.\n"
    "3 Where is the apple? \tgarden\t1 2\n"
)


def test_babi_two_stories(tmp_path: Path) -> None:
    p = write(tmp_path / "qa2_two-supporting-facts_train.txt", BABI)
    first = (
        "Mary moved to the bathroom. Sandra journeyed to the bedroom. Mary got the football there."
    )
    stem = "qa2_two-supporting-facts_train"
    assert load_babi(p) == [
        QARecord(
            first + " John went to the kitchen.",
            "Where is the football?",
            ["bathroom"],
            f"{stem}:0:5",
        ),
        QARecord(
            first + " John went to the kitchen. Mary went back to the kitchen.",
            "Where is the football?",
            ["kitchen"],
            f"{stem}:0:7",
        ),
        QARecord(
            "Daniel took the apple there. Daniel went to the garden.",
            "Where is the apple?",
            ["garden"],
            f"{stem}:1:3",
        ),
    ]


def test_babi_directory_split(tmp_path: Path) -> None:
    write(tmp_path / "qa2_b_train.txt", BABI)
    write(tmp_path / "qa1_a_train.txt", "1 Bob is here.\n2 Where is Bob?\there\t1\n")
    write(tmp_path / "qa1_a_test.txt", "1 Al is out.\n2 Where is Al?\tout\t1\n")
    recs = load_dataset("babi", tmp_path, split="train")
    assert [r.id for r in recs] == [
        "qa1_a_train:0:2",
        "qa2_b_train:0:5",
        "qa2_b_train:0:7",
        "qa2_b_train:1:3",
    ]
    assert [r.answers for r in load_babi(tmp_path, split="test")] == [["out"]]


# --------------------------------------------------------------------------- classification


def test_ag_news(tmp_path: Path) -> None:
    p = write(
        tmp_path / "train.csv",
        '"3","Wall St. Bears Claw Back (Reuters)","Reuters - Short-sellers, Wall Street\'s '
        'dwindling\\band of ultra-cynics, are seeing green."\n'
        '"1","Title, with comma","Body ""quoted"" text."\n'
        '"4","Sci","  spaced   out  "\n',
    )
    assert load_ag_news(p) == [
        ClassRecord(
            "Wall St. Bears Claw Back (Reuters) Reuters - Short-sellers, Wall Street's "
            "dwindling band of ultra-cynics, are seeing green.",
            3,
            "Business",
            "1",
        ),
        ClassRecord('Title, with comma Body "quoted" text.', 1, "World", "2"),
        ClassRecord("Sci spaced out", 4, "Sci/Tech", "3"),
    ]
    assert AG_NEWS_LABELS == ("World", "Sports", "Business", "Sci/Tech")


def test_ag_news_header_row_is_skipped(tmp_path: Path) -> None:
    p = write(tmp_path / "h.csv", "Class Index,Title,Description\n2,Goal,A goal.\n")
    assert load_ag_news(p) == [ClassRecord("Goal A goal.", 2, "Sports", "2")]


def test_dbpedia(tmp_path: Path) -> None:
    write(
        tmp_path / "test.csv",
        '1,E. D. Abbott Ltd," Abbott of Farnham E D Abbott Limited was a British coachbuilding '
        'business."\n'
        '14,"Moby-Dick, or The Whale"," An 1851 novel."\n'
        "9,Zabłocie, Zabłocie is a village.\n",
    )
    texts = [
        "E. D. Abbott Ltd Abbott of Farnham E D Abbott Limited was a British coachbuilding "
        "business.",
        "Moby-Dick, or The Whale An 1851 novel.",
        "Zabłocie Zabłocie is a village.",
    ]
    labels = [(1, "Company"), (14, "WrittenWork"), (9, "Village")]
    rows = enumerate(zip(texts, labels, strict=True), start=1)
    expected = [ClassRecord(text, k, name, str(line)) for line, (text, (k, name)) in rows]
    assert load_dbpedia(tmp_path, split="test") == expected
    assert len(DBPEDIA_LABELS) == 14 and DBPEDIA_LABELS[5] == "MeanOfTransportation"


def test_sst2(tmp_path: Path) -> None:
    p = write(
        tmp_path / "dev.tsv",
        'sentence\tlabel\nit \'s a "charming" , often affecting journey . \t1\n'
        "unflinchingly bleak and desperate \t0\n",
    )
    assert load_sst2(p) == [
        ClassRecord('it \'s a "charming" , often affecting journey .', 1, "positive", "2"),
        ClassRecord("unflinchingly bleak and desperate", 0, "negative", "3"),
    ]
    assert load_dataset("SST-2", tmp_path, split="dev") == load_sst2(p)


# --------------------------------------------------------------------------- generic


def test_text_paragraphs_and_lines(tmp_path: Path) -> None:
    p = write(tmp_path / "t.txt", "First para\n  wrapped line.\n\n\n  \nSecond.\nThird line\n")
    assert load_text(p) == [
        TextRecord("First para wrapped line.", "1"),
        TextRecord("Second. Third line", "6"),
    ]
    assert load_text(p, per_line=True) == [
        TextRecord("First para", "1"),
        TextRecord("wrapped line.", "2"),
        TextRecord("Second.", "6"),
        TextRecord("Third line", "7"),
    ]
    assert load_dataset("text", p, per_line=True, limit=3)[-1].text == "Second."


def test_jsonl_text_field(tmp_path: Path) -> None:
    p = write(tmp_path / "train.jsonl", '{"body": "a", "key": "k1"}\n{"body": " b "}\n')
    assert load_jsonl(p, text_field="body", id_field="key") == [
        TextRecord("a", "k1"),
        TextRecord("b", "2"),
    ]
    assert load_dataset("jsonl", tmp_path, split="train", text_field="body")[1].text == "b"
    with pytest.raises(ValueError, match=r"line 1: no 'text' field \(keys: body, key\)"):
        load_jsonl(p)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt: not UTF-8 text"):
        load_text(p)


# --------------------------------------------------------------------------- malformed files


def _squad_without_a_question() -> str:
    broken = json.loads(json.dumps(SQUAD))
    del broken["data"][0]["paragraphs"][0]["qas"][1]["question"]
    return json.dumps(broken)


# {loader: [(file name, content, message)]}: a malformed file is a ValueError whose message
# names the file, the line or entry and the problem.
MALFORMED = {
    load_rocstories: [
        ("roc.csv", "storyid,sentence1,sentence2\nx,a,b\n",
         r"roc\.csv: missing column\(s\) sentence3, sentence4"),
    ],
    load_simplestories: [
        ("nofield.jsonl", '{"story": "ok"}\n{"title": "no story"}\n',
         r"line 2: no 'story' or 'text' field \(keys: title\)"),
        ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object, got list"),
        ("num.jsonl", '{"story": 3}\n', "field 'story' is int, expected a string"),
    ],
    load_squad: [
        ("a.json", _squad_without_a_question(),
         r"a\.json: data\[0\]\.paragraphs\[0\]\.qas\[1\]: missing"),
        ("b.json", '{"data": [\n  {"paragraphs": ]}', r"b\.json: bad JSON: .* \(line 2, column"),
        ("c.json", '{"version": "1.1"}', "expected a JSON object with a 'data' list"),
    ],
    load_babi: [
        ("x.txt", "1 Mary moved.\nMary went home.\n", r"x\.txt: line 2: expected 'N text'"),
        ("y.txt", "1 Mary moved.\n2 Where is Mary?\t\t1\n", r"y\.txt: line 2: question line needs"),
        ("z.txt", "1 Mary moved.\n2 Where?\thome\tone\n", "line 2: supporting ids must be numbers"),
        ("w.txt", "3 Mary moved.\n", "line 1: first story starts at 3"),
    ],
    load_ag_news: [
        ("bad.csv", '"1","a","b"\n"5","c","d"\n',
         r"bad\.csv: line 2: class index 5 outside 1\.\.4"),
        ("short.csv", '"1","a","b"\n"2","only title"\n',
         r"short\.csv: line 2: expected 3 fields .* got 2"),
        ("nan.csv", '"1","a","b"\n"x","c","d"\n', "line 2: class index 'x' is not a number"),
    ],
    load_dbpedia: [("x.csv", "15,a,b\n", r"class index 15 outside 1\.\.14 for DBpedia")],
    load_sst2: [
        ("test.tsv", "index\tsentence\n0\tuh-oh\n",
         r"test\.tsv: header .* \(GLUE's test split is unlabeled"),
        ("a.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n",
         r"a\.tsv: line 3: label must be 0 or 1, got '2'"),
        ("b.tsv", "sentence\tlabel\ngood\n", "line 2: expected 2 tab-separated fields, got 1"),
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    "loader, name, text, message",
    [
        pytest.param(f, *case, id=f"{f.__name__}:{case[0]}")
        for f, cs in MALFORMED.items()
        for case in cs
    ],
)
def test_malformed_files_are_named(tmp_path: Path, loader, name: str, text: str, message: str):
    with pytest.raises(ValueError, match=message):
        loader(write(tmp_path / name, text))


# --------------------------------------------------------------------------- registry


def test_registry_and_load_dataset(tmp_path: Path) -> None:
    assert set(LOADERS) == {
        "narrativeqa",
        "narrativeqa_summaries",
        "rocstories",
        "simplestories",
        "squad",
        "babi",
        "ag_news",
        "dbpedia",
        "sst2",
        "text",
        "jsonl",
    }
    p = write(tmp_path / "t.txt", "a\n\nb\n\nc\n")
    assert [r.text for r in load_dataset("text", p, limit=2)] == ["a", "b"]
    assert load_dataset("text", p, limit=0) == []
    with pytest.raises(ValueError, match="unknown dataset 'imdb': expected one of ag_news"):
        load_dataset("imdb", p)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_dataset("text", p, limit=-1)
    with pytest.raises(ValueError, match=r"'squad' has no option\(s\) per_line \(takes: none\)"):
        load_dataset("squad", p, per_line=True)
    with pytest.raises(FileNotFoundError, match=r"dataset path not found: .*missing\.csv"):
        load_dataset("ag-news", tmp_path / "missing.csv")


def test_normalize_split() -> None:
    assert [normalize_split(s) for s in ("train", "Validation", "dev", "val", "test")] == [
        "train",
        "valid",
        "valid",
        "valid",
        "test",
    ]
    with pytest.raises(ValueError, match="unknown split"):
        normalize_split("holdout")
