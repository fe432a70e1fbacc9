"""Span-marked tasks (``boolq_spans``): every document carries the character range of its
question -- into the query, into the zero-shot prompt (what a request's ``act_spans`` names),
and into each sample's own prompt with few-shot examples -- and the range covers exactly the
question text; the documents are BoolQ's; a ``spans`` profile runs on them on the HF path."""

from __future__ import annotations

import numpy as np
import torch

from act_plugin.tasks import SUITES, TASKS, load_docs, load_samples
from act_plugin.tasks.data import raw_rows


def test_span_task_is_boolq_with_the_question_marked(shared_data):
    spec = TASKS["boolq_spans"]
    assert spec.emphasis == "question" and "boolq_spans" not in SUITES["classification"]
    for split in ("train", "test"):
        docs = load_docs("boolq_spans", split, shared_data)
        plain = load_docs("boolq", split, shared_data)
        assert [(d["query"], d["choices"], d["gold"], d["row"]) for d in docs] == \
            [(d["query"], d["choices"], d["gold"], d["row"]) for d in plain]
        rows = dict(raw_rows(spec, split, shared_data))
        for d in docs:
            question = rows[d["row"]]["question"]
            [(s, e)] = d["query_spans"]
            assert d["query"][s:e] == question
            # nothing of the passage or the template is inside, the template's words sit right around it
            assert d["query"][:s].endswith(" Question: ") and d["query"][e:].startswith("? \nAnswer:")
            [(s0, e0)] = d["spans"]
            assert (d["instruction"] + d["query"])[s0:e0] == question
    assert all("spans" not in d for d in load_docs("boolq", "test", shared_data)[:5])


def test_sample_spans_point_into_the_prompt_with_few_shot_examples(shared_data):
    rows = dict(raw_rows(TASKS["boolq_spans"], "test", shared_data))
    for shots in (0, 2):
        samples = load_samples("boolq_spans", "test", shared_data, limit=6, seed=0, num_fewshot=shots)
        for s in samples:
            [(a, b)] = s.spans
            assert s.prompt[a:b] == rows[s.row]["question"]
            assert s.prompt.count(rows[s.row]["question"]) >= 1
    assert load_samples("boolq", "test", shared_data, limit=2)[0].spans is None


def test_spans_profile_runs_on_span_marked_documents(shared_data, smollm2_path):
    """A handful of boolq_spans documents through the HF path with a ``spans`` profile: the
    emphasised tokens are the question's, and emphasis changes the answer scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from act_plugin import ACTConfig
    from act_plugin.hf import act_enabled
    from act_plugin.span_marks import emphasis_from_spans

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")
    samples = load_samples("boolq_spans", "test", shared_data, limit=4, seed=0, tokenizer=tok)
    cfg = ACTConfig(rule="spans", alpha=0.01, heads="8-15:*")
    changed = 0.0
    for s in samples:
        ids = tok(s.prompt, return_tensors="pt")["input_ids"]
        emph = emphasis_from_spans(tok, [s.prompt], [[list(x) for x in s.spans]])
        marked = tok.decode(ids[0][emph[0, : ids.shape[1]]])
        question = s.prompt[s.spans[0][0]: s.spans[0][1]]
        assert marked.strip() == question.strip(), (marked, question)
        with torch.no_grad():
            base = torch.log_softmax(model(ids).logits[0, -1], -1)[list(s.choice_token_ids)]
            with act_enabled(model, cfg) as handle:
                handle.set_emphasis(emph)
                got = torch.log_softmax(model(ids).logits[0, -1], -1)[list(s.choice_token_ids)]
        assert torch.isfinite(got).all()
        changed = max(changed, float((got - base).abs().max()))
    assert changed > 1e-3, "emphasising the question changed nothing: the check would be vacuous"
    assert np.isfinite(changed)
