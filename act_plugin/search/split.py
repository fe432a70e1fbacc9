"""The search's data: each task's TRAINING split divided into a search part and a validation part.

Heads are ranked and verified on the search part; every head set the search keeps is then
judged on the validation part, which played no part in choosing it (``select.py``). Both parts
come from the task's ``train`` split (``act_plugin.tasks``), which is disjoint from the
``test`` split that evaluations report (a different file, or the other side of a seeded
carve-out of one file), so nothing the search sees is ever reported.

Per task: the training documents are put in a seeded random order; the first
``search_per_task`` of that order form the search part and the next ``validation_per_task``
the validation part. The search part therefore does not depend on the validation budget
(raising it reuses the ranking already paid for). A task whose training split is smaller
than both budgets is divided in the same proportion. The file and row of every
document of both parts are recorded in the report (``SearchData.record``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from act_plugin.search.scoring import CalibrationSet

__all__ = ["SearchData", "PartProvenance", "build_search_data", "split_counts", "digest"]


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


@dataclass
class SearchData:
    search: CalibrationSet
    validation: dict[str, CalibrationSet]  # task -> its validation part
    provenance: list[PartProvenance] = field(default_factory=list)
    seed: int = 0

    def record(self) -> dict[str, Any]:
        """The split as written into the report: counts, seed and the rows of every part."""
        out: dict[str, Any] = {"seed": self.seed, "source_split": "train", "tasks": {}}
        for p in self.provenance:
            out["tasks"].setdefault(p.task, {})[p.part] = p.to_dict()
        return out

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
    import dataclasses

    from act_plugin.tasks import label_token_ids

    return dataclasses.replace(sample, choice_token_ids=tuple(label_token_ids(tokenizer, sample.prompt,
                                                                              sample.choices)))


def build_search_data(tasks: list[str], n_search: int, n_validation: int, seed: int, tokenizer: Any,
                      data_dir: Any = None) -> SearchData:
    """Search and validation parts of every task's training split (see the module docs)."""
    from act_plugin.search.config import SearchConfigError
    from act_plugin.tasks import get_task, load_samples

    search_samples, provenance = [], []
    validation: dict[str, CalibrationSet] = {}
    tok = tokenizer
    for task in tasks:
        samples = load_samples(task, "train", data_dir, seed=None)  # every training document, file order
        if not samples:
            raise SearchConfigError(f"task {task}: its training split is empty")
        s_n, v_n = split_counts(len(samples), n_search, n_validation)
        order = list(range(len(samples)))
        random.Random(f"{seed}:{task}:search/validation").shuffle(order)
        s_part = [_with_ids(samples[i], tok) for i in sorted(order[:s_n])]
        v_part = [_with_ids(samples[i], tok) for i in sorted(order[s_n:s_n + v_n])]
        spec = get_task(task)
        file = spec.files.get("train") or spec.files["all"]
        provenance.append(PartProvenance(task, "search", file, tuple(s.row for s in s_part)))
        provenance.append(PartProvenance(task, "validation", file, tuple(s.row for s in v_part)))
        search_samples += s_part
        if v_part:
            validation[task] = _calib(v_part, tokenizer)
    return SearchData(search=_calib(search_samples, tokenizer), validation=validation, provenance=provenance,
                      seed=seed)
