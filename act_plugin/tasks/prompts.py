"""Documents and prompts: a split's documents as lm-eval sees them (:func:`load_docs`) and
the scored prompts without lm-eval (:func:`load_samples`, each a :class:`~act_plugin.tasks.sample.Sample`).

A span-marked task (``TaskSpec.emphasis``, e.g. ``boolq_spans``) gives each document the
character range of its emphasised field: ``query_spans`` into the query, ``spans`` into the
zero-shot prompt (instruction + query: what lm-eval's context is without few-shot examples,
and what a request's ``act_spans`` names); a :class:`Sample`'s ``spans`` are into its own
prompt, few-shot examples included."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

from act_plugin.tasks.data import raw_rows
from act_plugin.tasks.readers import LETTERS
from act_plugin.tasks.registry import TaskSpec, canonical_split, get_task
from act_plugin.tasks.sample import Sample
from act_plugin.tasks.tokens import resolve_tokenizer, with_token_ids

ORDER_SEED = 1234  # seeds the order in which the test split is served (limit = first N)


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


def _field_span(spec: TaskSpec, row: dict) -> list[list[int]]:
    """``[[start, end]]``: where the emphasised field's text lies in the query."""
    marker = "{" + spec.emphasis + "}"
    if spec.template.count(marker) != 1:
        raise ValueError(f"task {spec.name}: its template must hold {marker} exactly once to mark it")
    start = len(spec.template[: spec.template.index(marker)].format(**row))
    return [[start, start + len(str(row[spec.emphasis]))]]


def _gold(row: dict) -> int:
    return int(row["label"] if "label" in row else row["gold"])


def load_docs(task: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Documents of a split as lm-eval sees them: ``query``, ``choices`` (answers without
    the leading space), ``gold``, ``row``, ``instruction``. The test split is served in the
    fixed :data:`ORDER_SEED` order, the others in file order."""
    spec = get_task(task)
    split = canonical_split(split)
    rows = raw_rows(spec, split, data_dir)
    if split == "test":
        rows = list(rows)
        # seeded by the data file: a task and its *_ll variant serve the same documents in the same order
        random.Random(f"{ORDER_SEED}:{spec.files.get('test') or spec.files['all']}").shuffle(rows)
    docs = []
    for row_index, row in rows:
        query, choices = _query(spec, row)
        doc: dict[str, Any] = {"query": query, "choices": choices, "gold": _gold(row), "row": row_index,
                               "instruction": spec.instruction}
        if spec.emphasis:
            spans = _field_span(spec, row)
            doc["query_spans"] = spans
            doc["spans"] = [[a + len(spec.instruction), b + len(spec.instruction)] for a, b in spans]
        docs.append(doc)
    return docs


# ----------------------------------------------------------------------------- samples (no lm-eval)


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
    split = canonical_split(split)
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
        prompt = _render(spec, doc, shots)
        offset = len(prompt) - len(doc["query"])  # the query ends the prompt
        spans = tuple((a + offset, b + offset) for a, b in doc["query_spans"]) if spec.emphasis else None
        samples.append(Sample(task=spec.name, split=split, doc_id=doc_id, row=doc["row"], prompt=prompt,
                              choices=tuple(" " + c for c in doc["choices"]), gold=doc["gold"], spans=spans))
    if tokenizer is not None and spec.next_token and samples:
        tok = resolve_tokenizer(tokenizer)
        samples = [with_token_ids(s, tok) for s in samples]
    return samples

