"""The ``spans`` rule in the eval: each document's spans, moved into the prompt the eval sends.

A span-marked task (``TaskSpec.emphasis``, e.g. ``boolq_spans``) gives each lm-eval document
its text (``query``, what the task's ``doc_to_text`` renders) and the character ranges of that
text to emphasise (``query_spans``, in the text's own coordinates). lm-eval sends a context of
its own making: the task's description, the few-shot examples, then the document's text. So a
request's ``act_spans`` are the document's spans shifted by where its text sits in the context
actually sent (:func:`shift_spans`); a text that is not found there exactly once is an error
naming the task and document, never unshifted spans. Only the target document is marked: the
few-shot examples' own spans are not sent.

Pure (no engine, no lm-eval import): :class:`act_plugin.eval.model.ActVLLM` and the tests'
stand-in engine both read the spans through :func:`context_spans`; :func:`span_prompts` keys
them by the token ids lm-eval then sends, with each prompt's text (the engine maps character
spans to tokens through the text).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from act_plugin.config import ACTConfigError

__all__ = ["DOC_TEXT_KEY", "DOC_SPANS_KEY", "PromptSpansError", "task_marks_spans", "shift_spans",
           "request_spans", "context_spans", "SpanPrompts", "span_prompts"]

# the lm-eval document's fields (act_plugin.tasks.prompts.load_docs): the text the task's
# doc_to_text renders, and its spans in that text's coordinates
DOC_TEXT_KEY: Final = "query"
DOC_SPANS_KEY: Final = "query_spans"


class PromptSpansError(ValueError):
    """A document's spans that cannot be placed in the prompt sent for it (names task and document)."""


def task_marks_spans(task: str) -> bool:
    """Whether the eval task's documents carry spans (a project task with ``emphasis``;
    lm-eval's own tasks, ``lm_eval:<task>``, never do)."""
    if task.startswith("lm_eval:"):
        return False
    from act_plugin.tasks import get_task

    try:
        return bool(get_task(task).emphasis)
    except ACTConfigError:
        return False


def _occurrences(prompt: str, text: str) -> list[int]:
    """Every start of ``text`` in ``prompt``, overlapping ones included."""
    found, at = [], prompt.find(text)
    while at >= 0:
        found.append(at)
        at = prompt.find(text, at + 1)
    return found


def shift_spans(prompt: str, text: str, spans: Sequence[Sequence[int]], where: str) -> list[list[int]]:
    """``spans`` (character ranges of ``text``) as ranges of ``prompt``, which must hold
    ``text`` exactly once (``where`` names the task and document in errors)."""
    if not text:
        raise PromptSpansError(f"{where}: the document has no text to mark")
    pairs = [list(s) for s in spans]
    if not pairs or any(len(p) != 2 or not 0 <= p[0] < p[1] <= len(text) for p in pairs):
        raise PromptSpansError(f"{where}: the document's spans {pairs} are not ranges of its text "
                               f"({len(text)} characters)")
    found = _occurrences(prompt, text)
    if len(found) != 1:
        why = "does not occur in" if not found else f"occurs {len(found)} times in"
        raise PromptSpansError(f"{where}: the document's text {why} the prompt sent for it, so its spans cannot be "
                               f"placed; refusing to send unshifted spans")
    return [[a + found[0], b + found[0]] for a, b in pairs]


def request_spans(instance: Any) -> list[list[int]]:
    """An lm-eval request's ``act_spans``: its document's spans in its context string
    (``instance``: lm-eval's ``Instance``, ``args = (context, continuation)``)."""
    doc, context = instance.doc, instance.args[0]
    where = f"task '{instance.task_name}', document {instance.doc_id}"
    if not isinstance(doc, dict) or DOC_SPANS_KEY not in doc or DOC_TEXT_KEY not in doc:
        raise PromptSpansError(f"{where}: a 'spans' arm needs documents that mark spans ({DOC_SPANS_KEY!r}), as "
                               f"span-marked tasks such as boolq_spans give them; this document has none")
    return shift_spans(context, str(doc[DOC_TEXT_KEY]), doc[DOC_SPANS_KEY], where)


def context_spans(instances: Iterable[Any]) -> dict[str, list[list[int]]]:
    """Context string -> its ``act_spans``, for lm-eval requests (one context has one set of
    spans: the same context from two documents must mark the same ranges)."""
    out: dict[str, list[list[int]]] = {}
    for inst in instances:
        context, spans = inst.args[0], request_spans(inst)
        if out.setdefault(context, spans) != spans:
            raise PromptSpansError(f"task '{inst.task_name}', document {inst.doc_id}: its prompt is another "
                                   f"document's with other spans ({out[context]} vs {spans})")
    return out


# prompt token ids -> (the prompt's text, its act_spans)
SpanPrompts = dict[tuple[int, ...], tuple[str, list[list[int]]]]


def span_prompts(requests: Iterable[tuple[tuple[str, str], Sequence[int], Sequence[int]]],
                 spans_by_context: dict[str, list[list[int]]]) -> SpanPrompts:
    """Every prompt the engine may be sent for lm-eval's tokenized requests ``((context,
    continuation), context ids, continuation ids)``, by its token ids: the context alone
    (next-token scoring; lm-eval moved the context's trailing whitespace into the continuation
    before tokenizing) and context + continuation (lm-eval's full-text path)."""
    out: SpanPrompts = {}
    for (context, continuation), context_ids, continuation_ids in requests:
        spans = spans_by_context[context]
        for ids, text in ((list(context_ids), context[: len(context.rstrip())]),
                          (list(context_ids) + list(continuation_ids), context + continuation)):
            key = tuple(int(t) for t in ids)
            if out.setdefault(key, (text, spans)) != (text, spans):
                raise PromptSpansError(f"two prompts with the same tokens carry different texts or spans "
                                       f"({out[key]!r} vs {(text, spans)!r})")
    return out
