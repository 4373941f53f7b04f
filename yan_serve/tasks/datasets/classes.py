"""The classification datasets: AG News, DBpedia-14, SST-2."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from yan_serve.tasks.datasets.files import (
    PathLike,
    bad_line,
    clean,
    numbered_lines,
    reading,
    resolve_files,
    take,
)
from yan_serve.tasks.records import ClassRecord

AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
DBPEDIA_LABELS: tuple[str, ...] = (
    "Company",
    "EducationalInstitution",
    "Artist",
    "Athlete",
    "OfficeHolder",
    "MeanOfTransportation",
    "Building",
    "NaturalPlace",
    "Village",
    "Animal",
    "Plant",
    "Album",
    "Film",
    "WrittenWork",
)
SST2_LABELS: tuple[str, ...] = ("negative", "positive")


def _headerless_class_csv(
    path: Path, names: tuple[str, ...], dataset: str
) -> Iterator[ClassRecord]:
    """Rows `class index (1-based), title, body` of the AG News / DBpedia CSVs.

    A header row (first field not a number, on line 1) is skipped, for re-exports that add one.
    """
    with reading(path), path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            lineno = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != 3:
                fields = f"expected 3 fields (class index, title, text), got {len(row)}"
                raise bad_line(path, lineno, fields)
            label_s = row[0].strip()
            if not label_s.lstrip("-").isdigit():
                if lineno == 1:
                    continue  # a header
                raise bad_line(path, lineno, f"class index {label_s!r} is not a number")
            label = int(label_s)
            if not 1 <= label <= len(names):
                outside = f"class index {label} outside 1..{len(names)} for {dataset}"
                raise bad_line(path, lineno, outside)
            # The AG News CSVs mark line breaks with a literal backslash.
            title, body = (clean(c.replace("\\", " ")) for c in row[1:])
            yield ClassRecord(
                text=f"{title} {body}".strip(),
                label=label,
                label_name=names[label - 1],
                id=str(lineno),
            )


def load_ag_news(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """AG News topic classification.

    `path`: `train.csv` / `test.csv` of the public `ag_news_csv` release (or its directory):
    no header, rows `"class index","title","description"` with class 1-4 = World, Sports,
    Business, Sci/Tech. Record: text = title + " " + description (whitespace collapsed,
    backslash line marks removed), label = the file's 1-based index, label_name, id = line
    number.
    """
    p = resolve_files(path, split, ("csv",))[0]
    return take(_headerless_class_csv(p, AG_NEWS_LABELS, "AG News"), limit)


def load_dbpedia(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """DBpedia-14 ontology classification.

    `path`: `train.csv` / `test.csv` of the public `dbpedia_csv` release (or its directory):
    no header, rows `class index,title,content` with class 1-14 = Company, ...,
    WrittenWork (`DBPEDIA_LABELS`). Record: text = title + " " + content, label = the file's
    1-based index, label_name, id = line number.
    """
    p = resolve_files(path, split, ("csv",))[0]
    return take(_headerless_class_csv(p, DBPEDIA_LABELS, "DBpedia"), limit)


def load_sst2(
    path: PathLike, split: str | None = None, limit: int | None = None
) -> list[ClassRecord]:
    """SST-2 sentiment (GLUE format).

    `path`: GLUE's `SST-2/train.tsv` or `dev.tsv` (or the directory): a header `sentence<TAB>
    label`, then one sentence per line with label 0 (negative) or 1 (positive); columns are
    found by name. GLUE's test.tsv has no labels and is refused. Record: text = sentence,
    label, label_name, id = line number.
    """
    p = resolve_files(path, split, ("tsv",))[0]

    def records() -> Iterator[ClassRecord]:
        with reading(p), p.open(encoding="utf-8-sig") as f:
            header = f.readline().rstrip("\r\n").split("\t")
            if "sentence" not in header or "label" not in header:
                why = " (GLUE's test split is unlabeled)" if "sentence" in header else ""
                raise ValueError(
                    f"{p}: header must name 'sentence' and 'label' columns{why}, got {header!r}"
                )
            si, li = header.index("sentence"), header.index("label")
            for lineno, line in numbered_lines(f, first=2):
                parts = line.split("\t")
                if len(parts) != len(header):
                    fields = f"expected {len(header)} tab-separated fields, got {len(parts)}"
                    raise bad_line(p, lineno, fields)
                label_s = parts[li].strip()
                if label_s not in ("0", "1"):
                    raise bad_line(p, lineno, f"label must be 0 or 1, got {label_s!r}")
                label = int(label_s)
                yield ClassRecord(parts[si].strip(), label, SST2_LABELS[label], str(lineno))

    return take(records(), limit)
