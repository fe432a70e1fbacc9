"""Readers of the benchmark files: each returns raw rows, one dict per line of the file.

Classification rows: ``{"text"...: str, "label": int}`` (index into ``TaskSpec.labels``);
multiple choice rows: ``{"question": str, "options": [str], "gold": int, ...}``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

from act_plugin.config import ACTConfigError

LETTERS = "ABCDEFGH"  # option letters of multiple-choice prompts


class TaskDataError(ACTConfigError):
    """A task's data file is missing or unreadable (the message names file and data folder)."""


def read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    # Split on "\n" only: the MR/SUBJ files are cp1252 and contain 0x85, which str.splitlines()
    # would treat as a line break (NEL) in latin-1.
    data = path.read_bytes().decode(encoding, errors="replace")
    return [line for line in data.split("\n") if line.strip()]


def label_text_reader(label_map: dict[int, int] | None = None, encoding: str = "utf-8") -> Callable[[Path], list[dict]]:
    def read(path: Path) -> list[dict]:
        rows = []
        for line in read_lines(path, encoding):
            label, _, text = line.strip().partition(" ")
            y = int(label)
            rows.append({"text": text.strip(), "label": label_map[y] if label_map else y})
        return rows

    return read


_TREC_COARSE = {"ABBR": 2, "ENTY": 1, "DESC": 0, "HUM": 3, "NUM": 4, "LOC": 5}


def read_trec(path: Path) -> list[dict]:
    rows = []
    for line in read_lines(path):
        label, _, text = line.strip().partition(" ")
        coarse = label.split(":", 1)[0]
        rows.append({"text": text.strip(), "label": _TREC_COARSE[coarse], "fine": label})
    return rows


def read_agnews(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if [h.strip().lower() for h in header] != ["class index", "title", "description"]:
            raise TaskDataError(f"{path}: unexpected header {header} (expected Class Index,Title,Description)")
        # HF ag_news' `text` is title + " " + description; classes 1..4 -> 0..3.
        return [{"text": f"{t.strip()} {d.strip()}".strip(), "label": int(c) - 1} for c, t, d in reader]


# DBPedia-14 file ids (dbpedia_meta.txt) -> the release's label words (HF dbpedia_14 order).
_DBPEDIA_WORDS = {
    "Company": "company", "EducationalInstitution": "school", "Artist": "artist", "Athlete": "sport",
    "OfficeHolder": "politics", "MeanOfTransportation": "transportation", "Building": "building",
    "NaturalPlace": "nature", "Village": "village", "Animal": "animal", "Plant": "plant", "Album": "album",
    "Film": "film", "WrittenWork": "book",
}
DBPEDIA_LABELS = ("company", "school", "artist", "sport", "politics", "transportation", "building", "nature",
                   "village", "animal", "plant", "album", "film", "book")


def _read_dbpedia_meta(path: Path) -> dict[int, str]:
    names = {}
    for line in read_lines(path):
        m = re.match(r"^\s*(\d+)\s*:\s*(\w+)\s*$", line)
        if m:
            names[int(m.group(1))] = m.group(2)
    if sorted(names.values()) != sorted(_DBPEDIA_WORDS):
        raise TaskDataError(f"{path}: expected the 14 DBPedia classes {sorted(_DBPEDIA_WORDS)}, got {names}")
    return names


def read_dbpedia(path: Path) -> list[dict]:
    names = _read_dbpedia_meta(path.parent / "dbpedia_meta.txt")
    to_index = {i: DBPEDIA_LABELS.index(_DBPEDIA_WORDS[n]) for i, n in names.items()}
    with path.open(encoding="utf-8", newline="") as fh:
        return [{"text": text.strip(), "label": to_index[int(label)]} for label, text in csv.reader(fh)]


_CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in read_lines(path)]


def read_cb(path: Path) -> list[dict]:
    return [{"premise": r["premise"].strip(), "hypothesis": r["hypothesis"].strip(), "label": _CB_LABELS[r["label"]]}
            for r in read_jsonl(path)]


def read_boolq(path: Path) -> list[dict]:
    rows = []
    for r in read_jsonl(path):
        q = r["query"]
        if not q.startswith("Passage: ") or "\nQuestion: " not in q:
            raise TaskDataError(f"{path}: unexpected BoolQ query format: {q[:80]!r}")
        passage, _, question = q[len("Passage: "):].rpartition("\nQuestion: ")
        if [c.strip().lower() for c in r["choices"]] != ["no", "yes"]:
            raise TaskDataError(f"{path}: expected choices ['no', 'yes'], got {r['choices']}")
        rows.append({"passage": passage.strip(), "question": question.strip().rstrip("?").strip(),
                     "label": int(r["gold"])})  # 0 = no -> False, 1 = yes -> True
    return rows


def _strip_prefix(text: str, prefix: str) -> str:
    text = text.strip()
    return text[len(prefix):].strip() if text.startswith(prefix) else text


def read_mc_plain(path: Path) -> list[dict]:
    """llm-foundry ARC / PIQA rows: ``{"query": "Question: ...", "choices": [...], "gold": i}``."""
    return [{"question": _strip_prefix(r["query"], "Question:"), "options": [c.strip() for c in r["choices"]],
             "gold": int(r["gold"])} for r in read_jsonl(path)]


def read_csqa(path: Path) -> list[dict]:
    """llm-foundry CommonsenseQA rows: the options are inside the query (``A. ...``)."""
    rows = []
    for r in read_jsonl(path):
        q = r["query"]
        head, _, rest = q.partition("\nChoices:\n")
        options_text = rest.rsplit("\nAnswer:", 1)[0]
        options = []
        for i, line in enumerate(options_text.split("\n")):
            prefix = f"{LETTERS[i]}. "
            if not line.startswith(prefix):
                raise TaskDataError(f"{path}: cannot read the options of {q[:80]!r}")
            options.append(line[len(prefix):].strip())
        if len(options) != len(r["choices"]):
            raise TaskDataError(f"{path}: {len(options)} options but {len(r['choices'])} choices in {q[:80]!r}")
        rows.append({"question": _strip_prefix(head, "Question:"), "options": options, "gold": int(r["gold"])})
    return rows


def _hellaswag_pre(text: str) -> str:
    # lm-evaluation-harness' hellaswag preprocessing
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag(path: Path) -> list[dict]:
    rows = []
    for r in read_jsonl(path):
        ctx_ll = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append({
            "question": r["ctx"].strip(), "options": [e.strip() for e in r["endings"]], "gold": int(r["label"]),
            "ll_query": _hellaswag_pre(r["activity_label"] + ": " + ctx_ll),
            "ll_options": [_hellaswag_pre(e) for e in r["endings"]],
        })
    return rows

