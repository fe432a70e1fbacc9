"""One scored prompt (:class:`Sample`): what :mod:`~act_plugin.tasks.prompts` builds and
:mod:`~act_plugin.tasks.tokens` fills with answer token ids."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One scored prompt: ``prompt + choices[i]`` is answer i; ``gold`` indexes ``choices``.

    ``prompt`` is exactly the context lm-eval builds for the document (instruction, few-shot
    examples, query), ending right before the answer; ``choices`` are the continuations as
    appended (with their leading space: ``" negative"``, ``" A"``); ``choice_token_ids`` are
    their single token ids under the tokenizer given to
    :func:`~act_plugin.tasks.prompts.load_samples` (``None``
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
    # span-marked tasks: half-open character ranges of ``prompt`` the 'spans' rule emphasises
    spans: tuple[tuple[int, int], ...] | None = None

    @property
    def label(self) -> str:
        return self.choices[self.gold]
