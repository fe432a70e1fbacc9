"""Texts that the search's training documents share with the splits evaluations score.

Several tasks are drawn from the same source texts: SST-2 and SST-5 are sentences of the
Rotten Tomatoes snippets that make up MR's ``rt-polarity.all`` (nearly every SST-2 dev
sentence is one of those snippets, or a sentence inside one), and SUBJ's subjective half
comes from Rotten Tomatoes too. A training document of one task can therefore be a document
-- or hold a sentence of a document -- of another task's evaluated split. The search drops
such documents from its parts (:mod:`act_plugin.search.split`), so that no head is chosen or
accepted on a text that an evaluation later reports.

Matching works on a *key* of each text (:func:`text_key`): Unicode folded to ASCII, lower
case, SST's ``-lrb-``/``-rrb-`` bracket tokens removed, then only the letters and digits
kept. That makes SST's tokenised ``it 's a charming journey .`` and the raw
``it's a charming journey.`` the same key. Two texts match when their keys are equal, or
when the shorter key of at least :data:`MIN_CONTAINED` characters lies inside the longer
(an SST sentence inside a multi-sentence snippet). Shorter texts ("bad .") match only
exactly: inside a longer text they would match by chance.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MIN_CONTAINED", "text_key", "document_text", "EvaluatedTexts", "Match", "evaluated_texts"]

MIN_CONTAINED = 20  # shortest key (letters + digits) matched inside a longer text
_SST_BRACKETS = re.compile(r"-[lr][rcs]b-")  # SST's -lrb- -rrb- -lcb- -rcb- -lsb- -rsb-
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")
_FIELD = re.compile(r"\{(\w+)\}")


def text_key(text: str) -> str:
    """The normalised form texts are compared in (see the module docs)."""
    folded = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode("ascii")
    return _NOT_ALNUM.sub("", _SST_BRACKETS.sub(" ", folded))


def _template_regex(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # literal, field, literal, field, ..., literal
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.*)" for i, p in enumerate(parts))
    return re.compile(pattern + r"\Z", re.S)


def document_text(spec: Any, doc: dict[str, Any]) -> str:
    """A document's own text: the fields its classification template fills (the query without
    the task's fixed words such as ``Sentence:``), or the whole query for other tasks."""
    if spec.style != "label" or not spec.template:
        return str(doc["query"])
    m = _template_regex(spec.template).match(doc["query"])
    if m is None:  # the query is built from this template: a mismatch is a bug, not data
        raise ValueError(f"task {spec.name}: query {doc['query'][:60]!r} does not follow its template")
    return " ".join(m.groupdict().values())


@dataclass(frozen=True)
class Match:
    """One evaluated document a training text matches: its task, row in the data file, and how."""

    task: str
    row: int
    how: str  # "same text" | "inside evaluated text" | "evaluated text inside"


@dataclass
class EvaluatedTexts:
    """An index of the keys of every evaluated document, for matching training texts quickly."""

    exact: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # key -> (task, row)
    joined: dict[str, str] = field(default_factory=dict)  # task -> its long keys joined by "\n"
    offsets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # task -> (start in joined, row)
    by_prefix: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # key[:MIN] -> (key, task, row)
    sizes: dict[str, int] = field(default_factory=dict)  # task -> evaluated documents indexed
    files: dict[str, str] = field(default_factory=dict)  # task -> the evaluated split it read

    def add(self, task: str, rows: Iterable[tuple[int, str]], described: str) -> None:
        parts, offsets, pos, n = [], [], 0, 0
        for row, text in rows:
            n += 1
            key = text_key(text)
            if not key:
                continue
            self.exact.setdefault(key, []).append((task, row))
            if len(key) >= MIN_CONTAINED:
                parts.append(key)
                offsets.append((pos, row))
                pos += len(key) + 1
                self.by_prefix.setdefault(key[:MIN_CONTAINED], []).append((key, task, row))
        self.joined[task] = "\n".join(parts)
        self.offsets[task] = offsets
        self.sizes[task] = n
        self.files[task] = described

    def matches(self, text: str) -> list[Match]:
        """Every evaluated document the text matches (empty: the text is not evaluated anywhere)."""
        key = text_key(text)
        if not key:
            return []
        found = {(t, r): "same text" for t, r in self.exact.get(key, [])}
        if len(key) >= MIN_CONTAINED:
            for task, joined in self.joined.items():
                start = joined.find(key)
                while start >= 0:
                    row = self._row_at(task, start)
                    found.setdefault((task, row), "inside evaluated text")
                    start = joined.find(key, start + 1)
            for i in range(len(key) - MIN_CONTAINED + 1):
                for other, task, row in self.by_prefix.get(key[i:i + MIN_CONTAINED], ()):
                    if len(other) < len(key) and key.startswith(other, i):
                        found.setdefault((task, row), "evaluated text inside")
        return [Match(t, r, how) for (t, r), how in sorted(found.items())]

    def _row_at(self, task: str, pos: int) -> int:
        import bisect

        offsets = self.offsets[task]
        return offsets[bisect.bisect_right(offsets, (pos, float("inf"))) - 1][1]


def evaluated_texts(data_dir: Any = None) -> tuple[EvaluatedTexts, dict[str, str]]:
    """The index over the evaluated (``test``) split of every project task whose data is there,
    and the tasks left out with the reason (their data file is missing). Variants of one task
    that read the same file (``arc_easy`` / ``arc_easy_ll``) are indexed once."""
    from act_plugin.tasks import TASKS, TaskDataError, load_docs

    index = EvaluatedTexts()
    skipped: dict[str, str] = {}
    seen_files: set[str] = set()
    for name, spec in TASKS.items():
        source = spec.files.get("test") or spec.files["all"]
        if source in seen_files:
            continue
        try:
            docs = load_docs(name, "test", data_dir)
        except TaskDataError as e:
            skipped[name] = str(e).split(" -- ")[0]
            continue
        seen_files.add(source)
        index.add(name, ((d["row"], document_text(spec, d)) for d in docs), spec.describe_split("test"))
    return index, skipped
