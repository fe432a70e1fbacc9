"""The search's data: each task's TRAINING split divided into a search part and a validation part.

Heads are ranked and verified on the search part; every head set the search keeps is then
judged on the validation part, which played no part in choosing it (``select.py``). Both parts
come from the task's ``train`` split (``act_plugin.tasks``), which is disjoint from the
``test`` split that evaluations report (a different file, or the other side of a seeded
carve-out of one file), so nothing the search sees is ever reported.

Per task: the training documents are put in a seeded random order, and walked in that order;
a document whose text is (or holds, or lies inside) a document of ANY task's evaluated split
is dropped and the walk draws the next one (:mod:`act_plugin.search.overlap`: SST-2, SST-5,
MR and SUBJ share Rotten Tomatoes texts, so a training sentence of one task can be an
evaluated document of another). The first ``search_per_task`` kept documents form the search
part and the next ``validation_per_task`` the validation part, so both keep their sizes
where the training split has enough documents, and the search part does not depend on the
validation budget (raising it reuses the ranking already paid for). A task whose training
split has fewer kept documents than both budgets is divided in the same proportion. The
file and row of every document of both parts, and every dropped document with what it
matched, are recorded in the report (``SearchData.record``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from act_plugin.search.overlap import MIN_CONTAINED, EvaluatedTexts, Match, document_text, evaluated_texts
from act_plugin.search.scoring import CalibrationSet

__all__ = ["SearchData", "PartProvenance", "Dropped", "build_search_data", "split_counts", "digest", "draw_parts"]

DEDUP_RULE = (f"a training document is dropped (and the next one in the seeded order drawn) when its text, "
              f"normalised (ASCII-folded, lower case, SST bracket tokens removed, letters and digits only), equals "
              f"an evaluated document's, or when the shorter of the two (at least {MIN_CONTAINED} characters) lies "
              f"inside the longer")


def split_counts(available: int, n_search: int, n_validation: int) -> tuple[int, int]:
    """How many documents go to each part when a task has ``available`` training documents."""
    want = n_search + n_validation
    if available >= want:
        return n_search, n_validation
    s = round(available * n_search / want)
    s = min(max(s, 1 if n_search else 0), available - (1 if n_validation and available > 1 else 0))
    return s, available - s


@dataclass(frozen=True)
class PartProvenance:
    """Where one task's part came from: the data file (relative to the data dir) and its rows."""

    task: str
    part: str  # "search" | "validation"
    file: str
    rows: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "rows": list(self.rows)}


@dataclass(frozen=True)
class Dropped:
    """A training document the draw met and dropped: it matches evaluated documents."""

    task: str
    row: int
    matches: tuple[Match, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "matches": [f"{m.task}:{m.row} ({m.how})" for m in self.matches]}


@dataclass
class SearchData:
    search: CalibrationSet
    validation: dict[str, CalibrationSet]  # task -> its validation part
    provenance: list[PartProvenance] = field(default_factory=list)
    seed: int = 0
    dropped: list[Dropped] = field(default_factory=list)
    evaluated: dict[str, str] = field(default_factory=dict)  # task -> the evaluated split deduplicated against
    not_checked: dict[str, str] = field(default_factory=dict)  # task -> why its evaluated split was not read

    def record(self) -> dict[str, Any]:
        """The split as written into the report: counts, seed, the rows of every part and the
        documents dropped because an evaluated split holds their text."""
        out: dict[str, Any] = {"seed": self.seed, "source_split": "train", "tasks": {}}
        for p in self.provenance:
            out["tasks"].setdefault(p.task, {})[p.part] = p.to_dict()
        out["deduplication"] = self.dedup_record()
        return out

    def dedup_record(self) -> dict[str, Any]:
        """Per task: how many drawn documents were dropped, which evaluated splits held them, and each one."""
        per_task: dict[str, Any] = {}
        for task in dict.fromkeys(p.task for p in self.provenance):
            drops = [d for d in self.dropped if d.task == task]
            by_task: dict[str, int] = {}
            for d in drops:
                for t in sorted({m.task for m in d.matches}):
                    by_task[t] = by_task.get(t, 0) + 1
            per_task[task] = {"dropped": len(drops), "by_evaluated_task": by_task,
                              "documents": [d.to_dict() for d in drops]}
        return {"rule": DEDUP_RULE, "evaluated_splits": dict(self.evaluated), "not_checked": dict(self.not_checked),
                "tasks": per_task}

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for p in self.provenance:
            out.setdefault(p.task, {})[p.part] = len(p.rows)
        return out


def digest(calib: CalibrationSet) -> str:
    """Hash of everything of a part that changes a score (prompt ids, answers, gold, tasks)."""
    blob = json.dumps([calib.prompts, [list(c) for c in calib.choice_ids], calib.gold, calib.tasks])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _calib(samples, tokenizer) -> CalibrationSet:
    prompts, choices, gold, tasks = [], [], [], []
    for s in samples:
        prompts.append(list(tokenizer(s.prompt, add_special_tokens=True)["input_ids"]))
        choices.append(tuple(int(x) for x in s.choice_token_ids))
        gold.append(int(s.gold))
        tasks.append(s.task)
    return CalibrationSet(prompts, choices, gold, tasks)


def _with_ids(sample, tokenizer):
    """The sample with its answers' token ids (each checked to be one token in context)."""
    from act_plugin.tasks import label_token_ids

    return dataclasses.replace(sample, choice_token_ids=tuple(label_token_ids(tokenizer, sample.prompt,
                                                                              sample.choices)))


def draw_parts(task: str, n_search: int, n_validation: int, seed: int, evaluated: EvaluatedTexts,
               data_dir: Any = None) -> tuple[list[Any], list[Any], list[Dropped]]:
    """One task's search and validation samples (no token ids yet) and the documents dropped
    on the way: the seeded walk of the module docs."""
    from act_plugin.search.config import SearchConfigError
    from act_plugin.tasks import get_task, load_docs, load_samples

    samples = load_samples(task, "train", data_dir, seed=None)  # every training document, file order
    if not samples:
        raise SearchConfigError(f"task {task}: its training split is empty")
    spec = get_task(task)
    docs = load_docs(task, "train", data_dir)
    assert [d["row"] for d in docs] == [s.row for s in samples]  # load_samples renders load_docs in order
    order = list(range(len(samples)))
    random.Random(f"{seed}:{task}:search/validation").shuffle(order)
    want = n_search + n_validation
    kept: list[int] = []
    dropped: list[Dropped] = []
    for i in order:
        if len(kept) >= want:
            break
        found = evaluated.matches(document_text(spec, docs[i]))
        if found:
            dropped.append(Dropped(task, samples[i].row, tuple(found)))
        else:
            kept.append(i)
    s_n, v_n = split_counts(len(kept), n_search, n_validation)
    return ([samples[i] for i in sorted(kept[:s_n])], [samples[i] for i in sorted(kept[s_n:s_n + v_n])],
            dropped)


def build_search_data(tasks: list[str], n_search: int, n_validation: int, seed: int, tokenizer: Any,
                      data_dir: Any = None, evaluated: EvaluatedTexts | None = None) -> SearchData:
    """Search and validation parts of every task's training split (see the module docs).
    ``evaluated``: the index of the evaluated splits (built from ``data_dir`` when not given)."""
    from act_plugin.tasks import get_task

    not_checked: dict[str, str] = {}
    if evaluated is None:
        evaluated, not_checked = evaluated_texts(data_dir)
    search_samples, provenance, dropped = [], [], []
    validation: dict[str, CalibrationSet] = {}
    for task in tasks:
        s_drawn, v_drawn, task_dropped = draw_parts(task, n_search, n_validation, seed, evaluated, data_dir)
        s_part = [_with_ids(s, tokenizer) for s in s_drawn]
        v_part = [_with_ids(s, tokenizer) for s in v_drawn]
        spec = get_task(task)
        file = spec.files.get("train") or spec.files["all"]
        provenance.append(PartProvenance(task, "search", file, tuple(s.row for s in s_part)))
        provenance.append(PartProvenance(task, "validation", file, tuple(s.row for s in v_part)))
        dropped += task_dropped
        search_samples += s_part
        if v_part:
            validation[task] = _calib(v_part, tokenizer)
    return SearchData(search=_calib(search_samples, tokenizer), validation=validation, provenance=provenance,
                      seed=seed, dropped=dropped, evaluated=dict(evaluated.files), not_checked=not_checked)
