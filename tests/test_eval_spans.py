"""Eval arms of the ``spans`` rule: each document's spans, shifted into the prompt lm-eval sends.

Unit tests of the shift (few-shot context, a template around the document, refusals); a whole
eval run on ``boolq_spans`` through the real lm-eval harness with the stand-in engine of
test_eval_runner (every request of a spans arm carries spans covering exactly its own
question, and a rerun reuses every piece); and, on a real engine, the eval's records equal the
engine run directly with the shifted ``act_spans``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from test_eval_runner import FakeEngine, _numbers, make_cfg  # noqa: F401 - FakeEngine is subclassed

from act_plugin.eval import engine_arms, runner
from act_plugin.eval.prompt_spans import PromptSpansError, context_spans, shift_spans, span_prompts
from act_plugin.eval.report import read_samples
from act_plugin.tasks import load_docs

SPANS = {"rule": "spans", "alpha": 0.01, "heads": "8-15:*"}
TASK = "boolq_spans"


@pytest.fixture(scope="module")
def docs(shared_data):
    return load_docs(TASK, "test", shared_data)[:4]


@pytest.fixture(scope="module")
def shots(shared_data):
    return load_docs(TASK, "train", shared_data)[:2]


def _question(doc) -> str:
    [(a, b)] = doc["query_spans"]
    return doc["query"][a:b]


def _request(context, doc, doc_id=0, continuation=" True"):
    return SimpleNamespace(args=(context, continuation), doc=doc, task_name="act_" + TASK, doc_id=doc_id)


# ----------------------------------------------------------------------------- the shift
def test_spans_move_past_the_few_shot_examples(docs, shots):
    doc = docs[0]
    # lm-eval's context: description, few-shot examples (answered), then the document's text
    context = doc["instruction"] + "".join(s["query"] + " " + s["choices"][s["gold"]] + "\n\n" for s in shots) \
        + doc["query"]
    [(s, e)] = shift_spans(context, doc["query"], doc["query_spans"], "here")
    assert context[s:e] == _question(doc) and s > len(context) - len(doc["query"])
    # the zero-shot prompt's spans (instruction + query) would point into the examples instead
    [(s0, e0)] = doc["spans"]
    assert context[s0:e0] != _question(doc)
    # each few-shot example carries its own question, which is not marked
    assert all(_question(x) in context[:s] for x in shots)


def test_spans_move_inside_a_template_around_the_document(docs):
    doc = docs[1]
    context = "<|im_start|>user\n" + doc["query"] + "<|im_end|>\n<|im_start|>assistant\n"
    [(s, e)] = shift_spans(context, doc["query"], doc["query_spans"], "here")
    assert (s, e) == (len("<|im_start|>user\n") + doc["query_spans"][0][0],
                      len("<|im_start|>user\n") + doc["query_spans"][0][1])
    assert context[s:e] == _question(doc)


def test_a_text_not_found_once_is_refused_naming_task_and_document(docs):
    doc = docs[0]
    with pytest.raises(PromptSpansError, match=r"task 'act_boolq_spans', document 7: .*does not occur in the prompt"):
        context_spans([_request("something else entirely", doc, 7)])
    twice = doc["query"] + "\n\n" + doc["query"]
    with pytest.raises(PromptSpansError, match=r"document 3: the document's text occurs 2 times .*unshifted spans"):
        context_spans([_request(twice, doc, 3)])
    with pytest.raises(PromptSpansError, match=r"spans \[\[0, 100000\]\] are not ranges of its text"):
        shift_spans(doc["query"], doc["query"], [[0, 100_000]], "here")


def test_a_document_without_spans_is_refused(shared_data):
    [plain] = load_docs("boolq", "test", shared_data)[:1]
    with pytest.raises(PromptSpansError, match=r"document 0: a 'spans' arm needs documents that mark spans"):
        context_spans([_request(plain["query"], plain)])


def test_the_token_prompts_carry_the_text_lm_eval_tokenized(docs):
    """Next-token scoring sends the context without its trailing whitespace (lm-eval moves it
    into the continuation); the full-text path sends context + continuation."""
    doc = docs[2]
    context = doc["query"] + " "
    spans = context_spans([_request(context, doc)])
    prompts = span_prompts([((context, "True"), [1, 2, 3], [4])], spans)
    assert prompts == {(1, 2, 3): (doc["query"], spans[context]), (1, 2, 3, 4): (context + "True", spans[context])}


# ----------------------------------------------------------------------------- an eval run (stand-in engine)
class SpansFakeEngine(FakeEngine):
    """The stand-in engine, reading a spans arm's spans as ``ActVLLM`` does
    (:func:`context_spans`) and scoring with them, so other spans give other predictions."""

    marked: list[tuple[str | None, str, dict, list[list[int]]]] = []  # (arm, context, document, spans)

    def loglikelihood(self, requests, disable_tqdm=False):
        profile = self.config.resolve_request(self.arm) if self.config is not None else None
        if profile is None or self.config.profiles[profile].rule != "spans":
            return super().loglikelihood(requests, disable_tqdm)
        spans = context_spans(requests)
        for r in requests:
            SpansFakeEngine.marked.append((self.arm, r.args[0], r.doc, spans[r.args[0]]))
        marked = [SimpleNamespace(args=(f"{spans[r.args[0]]}|{r.args[0]}", r.args[1])) for r in requests]
        return super().loglikelihood(marked, disable_tqdm)


@pytest.fixture
def spans_engine(monkeypatch):
    import act_plugin.eval.model as eval_model

    monkeypatch.setattr(eval_model, "ActVLLM", SpansFakeEngine)
    monkeypatch.setattr(engine_arms, "engine_status", lambda lm: lm.status())
    monkeypatch.delenv("ACT_CONFIG", raising=False)
    SpansFakeEngine.started, SpansFakeEngine.seen, SpansFakeEngine.marked = [], [], []
    SpansFakeEngine.calls, SpansFakeEngine.crash_after_calls, SpansFakeEngine.honours_act_off = 0, None, True
    return SpansFakeEngine


@pytest.mark.parametrize("share_engine", [True, False])
def test_a_spans_arm_runs_on_boolq_spans_and_resumes(share_engine, spans_engine, shared_data, tmp_path):
    arms = {"baseline": None, "emph": SPANS, "pt": {"profiles": {TASK: {**SPANS, "alpha": 0.1}}}}
    cfg = make_cfg(shared_data, tasks=[TASK], limit=4, num_fewshot=1, seeds=[0], arms=arms, share_engine=share_engine)
    run = runner.run_eval(cfg, output_dir=tmp_path / "out", progress=False)
    # every request of the spans arms carried spans covering exactly its own document's question,
    # past the few-shot example; the baseline's carried none
    assert {arm for arm, *_ in spans_engine.marked} == {"emph", "pt.boolq_spans"}
    assert len(spans_engine.marked) == 2 * 4 * 2  # arms x documents x choices
    for _, context, doc, [(s, e)] in spans_engine.marked:
        start = len(context) - len(doc["query"])  # the document's text ends the context
        assert context.endswith(doc["query"]) and start > len(doc["instruction"])  # after a few-shot example
        assert context[s:e] == _question(doc) and s >= start
    out = run.output_dir
    emph = read_samples(out / f"samples_emph_{TASK}.jsonl")
    base = read_samples(out / f"samples_baseline_{TASK}.jsonl")
    assert [r["prompt"] for r in emph] == [r["prompt"] for r in base] and len(emph) == 4
    assert [r["loglikelihoods"] for r in emph] != [r["loglikelihoods"] for r in base]
    assert run.results.arms["emph"].engine.calibration["rule"] == "spans"
    assert run.results.arms["pt"].tasks[TASK].engine.request == "pt.boolq_spans"
    report = (out / "report.md").read_text()
    assert "rule spans, alpha 0.01, all heads of 8 layers" in report  # the arms table
    assert "| boolq_spans | `pt.boolq_spans` | rule spans, alpha 0.1 |" in report
    # the same command again reuses every piece, and changes nothing
    before = _numbers(out)
    again = runner.run_eval(cfg, output_dir=out, progress=False)
    assert len(again.reused) == 3 and _numbers(out) == before
    assert json.loads((out / runner.STATE_FILE).read_text())["complete"] is True


# ----------------------------------------------------------------------------- the real engine
@pytest.fixture(scope="module")
def engine(smollm2_path):
    from act_plugin.eval.model import ActVLLM

    lm = ActVLLM(pretrained=smollm2_path, dtype="float32", max_model_len=2048, seed=0,
                 act={"profiles": {"emph": SPANS}, "default": None}, act_profile="off")
    yield lm
    core = getattr(lm.model.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


def _direct(lm, prompts, choice_ids, spans):
    """The engine run directly on text prompts: next-token log-probabilities of the choices."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=1, temperature=0, detokenize=False, logprob_token_ids=ids,
                             extra_args={"act": "emph", "act_spans": sp}) for ids, sp in zip(choice_ids, spans)]
    outs = lm.model.generate(prompts, params, use_tqdm=False)
    return [[float(o.outputs[0].logprobs[0][t].logprob) for t in ids] for o, ids in zip(outs, choice_ids)]


@pytest.mark.engine
@pytest.mark.slow
def test_eval_records_equal_the_engine_run_directly_with_the_shifted_spans(engine, smollm2_path, shared_data,
                                                                           tmp_path, monkeypatch):
    """One engine (the eval's is this module's, not shut down after the run); 3 documents with
    a few-shot example: the spans arm's log-likelihoods equal the engine given each prompt's
    text with its document's question marked; the unshifted zero-shot spans give others; lm-eval's
    full-text path sends the same spans (same numbers)."""
    import act_plugin.eval.model as eval_model
    from act_plugin.config import ACTEngineConfig
    from act_plugin.eval import harness
    from act_plugin.eval.config import load_eval_config

    def reuse(act=None, **_):
        assert ACTEngineConfig.from_any(act) == engine.act_config
        return engine

    monkeypatch.setattr(eval_model, "ActVLLM", reuse)
    monkeypatch.setattr(harness, "_shutdown", lambda lm: None)
    cfg = load_eval_config({"name": "spans", "model": smollm2_path, "engine": {"dtype": "float32", "seed": 0},
                            "arms": {"baseline": None, "emph": SPANS}, "tasks": [TASK], "limit": 3,
                            "num_fewshot": 1, "seeds": [0], "data_dir": str(shared_data), "bootstrap_resamples": 200})
    out = runner.run_eval(cfg, output_dir=tmp_path / "out", progress=False).output_dir
    recs = read_samples(out / f"samples_emph_{TASK}.jsonl")
    base = read_samples(out / f"samples_baseline_{TASK}.jsonl")
    by_row = {d["row"]: d for d in load_docs(TASK, "test", shared_data)}
    prompts, shifted, unshifted, choice_ids = [], [], [], []
    for r in recs:
        doc, prompt = by_row[r["row"]], r["prompt"]
        at = prompt.rindex(doc["query"])  # the target document ends the prompt
        [(a, b)] = doc["query_spans"]
        assert prompt[at + a:at + b] == _question(doc) and at > 0  # a few-shot example comes first
        prompts.append(prompt)
        shifted.append([[at + a, at + b]])
        unshifted.append(doc["spans"])
        ids = [engine.tok_encode(prompt + " " + c)[len(engine.tok_encode(prompt)):] for c in r["choices"]]
        assert all(len(i) == 1 for i in ids)
        choice_ids.append([i[0] for i in ids])
    direct = _direct(engine, prompts, choice_ids, shifted)
    for r, d in zip(recs, direct):
        assert r["loglikelihoods"] == pytest.approx(d, abs=1e-4)
    # the calibration ran, and the shift matters
    def far(xs, ys):
        return max(abs(x - y) for u, v in zip(xs, ys) for x, y in zip(u, v)) > 1e-3

    assert far([r["loglikelihoods"] for r in recs], [r["loglikelihoods"] for r in base])
    assert far([r["loglikelihoods"] for r in recs], _direct(engine, prompts, choice_ids, unshifted))
    # lm-eval's full-text path (context + answer in one prompt) sends the same spans
    reqs = [_request(p, by_row[r["row"]], r["doc_id"], " " + c) for p, r in zip(prompts, recs) for c in r["choices"]]
    engine.set_arm("emph")
    engine.next_token = False
    try:
        full = engine.loglikelihood(reqs, disable_tqdm=True)
    finally:
        engine.next_token = True
        engine.set_arm("off")
    assert [lp for lp, _ in full] == pytest.approx([x for r in recs for x in r["loglikelihoods"]], abs=1e-4)
