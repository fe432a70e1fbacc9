"""The ACT paper suite over local data (act_plugin.tasks, evals/tasks)."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from act_plugin.tasks import (
    REPO_ROOT,
    SUITES,
    TASKS,
    TaskDataError,
    check_data,
    get_task,
    load_docs,
    load_samples,
    render_lm_eval_tasks,
)

NEXT_TOKEN_TASKS = [n for n, t in TASKS.items() if t.next_token]


def _frac(texts, pattern):
    return sum(bool(re.search(pattern, t, re.I)) for t in texts) / len(texts)


def _texts(task, label, data_dir, split="train"):
    spec = get_task(task)
    docs = load_docs(task, split, data_dir)
    word = spec.labels[label]
    return [d["query"] for d in docs if d["gold"] == spec.labels.index(word)]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("task", NEXT_TOKEN_TASKS)
def test_answers_are_single_tokens(task, tokenizer, shared_data):
    """Every label word / letter is one distinct token after the prompt (SmolLM2 tokenizer)."""
    samples = load_samples(task, "test", shared_data, limit=3, seed=0, tokenizer=tokenizer)
    for s in samples:
        ids = s.choice_token_ids
        assert ids is not None and len(ids) == len(s.choices) == len(set(ids))
        for c, i in zip(s.choices, ids):
            whole = tokenizer(s.prompt + c, add_special_tokens=False)["input_ids"]
            assert whole[-1] == i and whole[:-1] == tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode([i]) == c


def test_label_conventions_read_from_the_data(shared_data):
    # SUBJ: file label 0 = review snippets (subjective), 1 = plot summaries (objective)
    subj = [l.split(" ", 1) for l in (shared_data / "subj/subj.all").read_bytes().decode("cp1252", "replace").split("\n") if l.strip()]
    zero = [t for y, t in subj if y == "0"]
    one = [t for y, t in subj if y == "1"]
    assert _frac(zero, r"\b(film|movie)\b") > 3 * _frac(one, r"\b(film|movie)\b")
    assert _frac(one, r"\b(his|her|he|she)\b") > 2 * _frac(zero, r"\b(his|her|he|she)\b")
    subjective = _texts("subj", 1, shared_data)  # our label 1 = "subjective"
    assert get_task("subj").labels == ("objective", "subjective")
    assert _frac(subjective, r"\b(film|movie)\b") > 0.2

    # SST-2 / MR: 1 = positive
    for task in ("sst2", "mr"):
        pos, neg = _texts(task, 1, shared_data), _texts(task, 0, shared_data)
        good, bad = r"\b(best|great|beautiful|wonderful)\b", r"\b(worst|dull|boring|bad)\b"
        assert _frac(pos, good) > 2 * _frac(neg, good) and _frac(neg, bad) > 2 * _frac(pos, bad), task
    # SST-5: 0 = terrible ... 4 = great
    assert _frac(_texts("sst5", 4, shared_data), r"\b(best|great)\b") > 2 * _frac(_texts("sst5", 0, shared_data), r"\b(best|great)\b")

    # AG News: World, Sports, Business, Technology
    for label, pattern in [(0, r"\b(iraq|minister|president)\b"), (1, r"\b(game|season|coach)\b"),
                           (2, r"\b(stocks?|profit|shares)\b"), (3, r"\b(software|internet|microsoft)\b")]:
        hit = _frac(_texts("agnews", label, shared_data), pattern)
        others = max(_frac(_texts("agnews", o, shared_data), pattern) for o in range(4) if o != label)
        assert hit > 2 * others, (label, hit, others)

    # DBPedia: ids from dbpedia_meta.txt mapped to the release's words
    for word, pattern in [("album", r"\balbum\b"), ("film", r"\bfilm\b"), ("village", r"\bvillage\b"),
                          ("sport", r"\b(player|footballer|athlete)\b"), ("book", r"\b(novel|book|magazine)\b")]:
        label = get_task("dbpedia").labels.index(word)
        assert _frac(_texts("dbpedia", label, shared_data), pattern) > 0.4, word

    # TREC: coarse class by meaning
    trec = {d["query"]: d["gold"] for d in load_docs("trec", "test", shared_data)}
    labels = get_task("trec").labels
    who = [labels[g] for q, g in trec.items() if q.startswith("Question: Who ")]
    assert Counter(who).most_common(1)[0][0] == "Person"
    how_many = [labels[g] for q, g in trec.items() if q.startswith("Question: How many")]
    assert set(how_many) == {"Number"}
    stands = [labels[g] for q, g in trec.items() if "stand for" in q]
    assert stands and set(stands) == {"Expression"}  # ABBR

    # CB: entailment -> Yes, contradiction -> No, neutral -> Maybe; BoolQ: yes -> True
    cb = Counter(d["gold"] for d in load_docs("cb", "test", shared_data))
    assert cb == Counter({1: 28, 0: 23, 2: 5})
    boolq = load_docs("boolq", "all", shared_data)
    assert Counter(d["gold"] for d in boolq) == Counter({1: 2033, 0: 1237})


def test_splits_are_deterministic_and_disjoint(shared_data):
    for task in ("mr", "subj", "agnews", "arc_easy", "hellaswag_ll"):
        train = load_docs(task, "train", shared_data)
        test = load_docs(task, "test", shared_data)
        rows_all = {d["row"] for d in load_docs(task, "all", shared_data)}
        tr, te = {d["row"] for d in train}, {d["row"] for d in test}
        assert not tr & te and tr | te == rows_all
        assert [d["row"] for d in load_docs(task, "test", shared_data)] == [d["row"] for d in test]
    assert len(load_docs("mr", "test", shared_data)) == 1066  # 10% of 10662
    assert len(load_docs("sst2", "validation", shared_data)) == 872  # official dev split
    assert load_docs("arc_easy", "test", shared_data)[0]["row"] == load_docs("arc_easy_ll", "test", shared_data)[0]["row"]
    s = load_samples("sst2", "train", shared_data, limit=5, seed=3)
    assert s == load_samples("sst2", "train", shared_data, limit=5, seed=3)
    assert s != load_samples("sst2", "train", shared_data, limit=5, seed=4)


def test_prompt_formats(shared_data):
    s = load_samples("sst2", "test", shared_data, limit=1, seed=None)[0]
    assert s.prompt.startswith("Classify the sentiment of the user's message") and s.prompt.endswith("\nSentiment:")
    assert s.choices == (" negative", " positive")
    m = load_samples("arc_easy", "test", shared_data, limit=1, seed=None)[0]
    assert m.prompt.startswith("Generate the correct answer to the following question.\n\n")
    assert "\nA. " in m.prompt and m.prompt.endswith("\nD. " + m.prompt.split("\nD. ")[1]) and m.prompt.endswith("\nAnswer:")
    assert m.choices == (" A", " B", " C", " D")
    ll = load_samples("arc_easy_ll", "test", shared_data, limit=1, seed=None)[0]
    assert ll.prompt.startswith("Question: ") and ll.prompt.endswith("\nAnswer:") and len(ll.choices[0]) > 2
    k = load_samples("trec", "test", shared_data, limit=2, seed=0, num_fewshot=3)
    assert all(p.prompt.count("\nType:") == 4 for p in k)


def test_missing_data_gives_one_clear_message(tmp_path: Path, shared_data, monkeypatch):
    with pytest.raises(TaskDataError) as e:
        load_samples("sst2", "test", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "sst" / "stsa.binary.dev") in msg and "data_dir" in msg and "ACT_DATA_DIR" in msg
    (tmp_path / "mc").mkdir()
    shutil.copy(shared_data / "mc" / "arc_easy.jsonl", tmp_path / "mc")
    monkeypatch.setenv("ACT_DATA_DIR", str(tmp_path))
    check_data(["arc_easy", "lm_eval:hellaswag"])  # present, and lm-eval's own tasks are not checked
    with pytest.raises(TaskDataError, match=r"task agnews \(AG News\): data file not found: .*agnews/test.csv.*\$ACT_DATA_DIR"):
        check_data(["arc_easy", "agnews"])


def test_shipped_lm_eval_tasks_match_the_definitions():
    folder = REPO_ROOT / "evals" / "tasks"
    expected = render_lm_eval_tasks()
    shipped = {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".yaml", ".py")}
    assert shipped == expected, "regenerate with: python -m act_plugin.tasks evals/tasks"
    assert set(SUITES["paper"]) <= set(TASKS)


def test_lm_eval_builds_the_same_prompts(shared_data):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(REPO_ROOT / "evals" / "tasks"), include_defaults=False,
                     metadata={"data_dir": str(shared_data)})
    loaded = tm.load(["act_sst2", "act_commonsense_qa", "act_hellaswag_ll"])["tasks"]
    for name, task in loaded.items():
        task.set_config(key="num_fewshot", value=0)
        short = name.removeprefix("act_")
        samples = load_samples(short, "test", shared_data, limit=3, seed=None)
        for doc_id, doc in enumerate(list(task.test_docs())[:3]):
            ctx = task.fewshot_context(doc, 0)
            assert ctx == samples[doc_id].prompt
            reqs = task.construct_requests(doc, ctx)
            assert tuple(r.args[1] for r in reqs) == samples[doc_id].choices
            assert task.doc_to_target(doc) == samples[doc_id].gold
