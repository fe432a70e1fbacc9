"""``act-plugin inspect``: its sinks are the core's sinks for the same q/k/v/positions, its
column scores and moved mass follow the spec, and the PNG/table files are written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from act_plugin.core import act_attention_dense

PROMPT = ("Classify the sentiment of the user's message into one of the following categories:'positive' or "
          "'negative'.\n\nSentence: a charming , funny and moving film . \nSentiment:")


@pytest.fixture(scope="module")
def model_and_tok(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_path)


def _core_sinks(model, ids, layer, heads, beta, threshold):
    """The core's sinks from q/k/v recomputed by hand from the layer's input hidden states."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states[layer]
        blk = model.model.layers[layer]
        attn = blk.self_attn
        x = blk.input_layernorm(hs)
        B, L, _ = x.shape
        D = attn.head_dim
        q = attn.q_proj(x).view(B, L, -1, D).transpose(1, 2)
        k = attn.k_proj(x).view(B, L, -1, D).transpose(1, 2)
        v = attn.v_proj(x).view(B, L, -1, D).transpose(1, 2)
        pos = torch.arange(L).unsqueeze(0)
        cos, sin = model.model.rotary_emb(x, position_ids=pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        H, Hkv = q.shape[1], k.shape[1]
        sel = torch.tensor(heads)
        kvh = sel // (H // Hkv)
        res = act_attention_dense(q[:, sel], k[:, kvh], v[:, kvh], pos, pos, scale=attn.scaling, beta=beta,
                                  threshold=threshold)
    return res.sinks[0]


def test_inspect_sinks_equal_core_sinks(model_and_tok):
    from act_plugin.attention_maps import attention_maps

    model, tok = model_and_tok
    layers, heads, beta, tau = [2, 15, 27], [0, 1, 2, 5, 8], 0.4, 0.1
    maps = attention_maps(model, tok, [PROMPT], layers, heads, beta=beta, threshold=tau)
    assert len(maps) == len(layers) * len(heads)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    found = 0
    for layer in layers:
        core = _core_sinks(model, ids, layer, heads, beta, tau)
        for j, h in enumerate(heads):
            m = next(m for m in maps if m.layer == layer and m.head == h)
            assert m.sinks == torch.nonzero(core[j]).flatten().tolist(), (layer, h)
            assert 0 not in m.sinks
            found += len(m.sinks)
            # spec quantities from the captured attention: c_j and the mass calibration moves
            A = m.probs
            assert np.allclose(A.sum(-1), 1.0, atol=1e-5)
            n_j = np.arange(A.shape[0], 0, -1)  # rows that see key j (one causal prompt)
            np.testing.assert_allclose(m.col_score, A.sum(0) / n_j, rtol=1e-5, atol=1e-7)
            for s in m.sinks:
                assert m.col_score[s] > tau
                assert m.moved[s] == pytest.approx((1 - beta) * A[:, s].sum(), rel=1e-5)
                np.testing.assert_allclose(m.calibrated[:, s], beta * A[:, s], atol=1e-6)
    assert found > 0, "no sinks at all: the comparison would be vacuous"


def test_inspect_cli_writes_maps_and_tables(smollm2_path, tmp_path, capsys):
    from act_plugin.cli import main

    pf = tmp_path / "prompts.txt"
    pf.write_text("The capital of France is Paris . The capital of Italy is\n---\nReview: dull .\nSentiment:\n")
    out = tmp_path / "insp"
    rc = main(["inspect", "--model", smollm2_path, "--prompt", PROMPT, "--prompt-file", str(pf),
               "--layers", "3,20", "--heads", "1-2", "--beta", "0.3", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| prompt | layer | head | pos | token |" in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"p{p}_L{lyr}_H{h}.png" for p in range(3) for lyr in (3, 20) for h in (1, 2))
    assert all((out / p).stat().st_size > 5000 for p in pngs)
    md = (out / "sinks.md").read_text()
    assert "mean attention c_j" in md and "moved mass" in md
    data = json.loads((out / "sinks.json").read_text())
    assert data["beta"] == 0.3 and len(data["prompts"]) == 3 and len(data["heads"]) == 12
    rows = [r for h in data["heads"] for r in h["sinks"]]
    assert rows and all(r["position"] > 0 and r["mean_attention"] > 0.1 and r["moved_mass"] > 0 for r in rows)


def test_inspect_cli_errors(smollm2_path, capsys):
    from act_plugin.cli import main

    assert main(["inspect", "--model", smollm2_path]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["inspect", "--model", smollm2_path, "--prompt", "x", "--layers", "31"]) == 2
    assert "30 layers" in capsys.readouterr().err


def test_inspect_rules_follow_their_formulas(model_and_tok):
    """``--rule first_token`` / ``spans``: the right-hand map is the rule's formula applied to
    the captured attention, and the key set is position 0 / the tokens overlapping the span."""
    from act_plugin.attention_maps import attention_maps

    model, tok = model_and_tok
    gamma = 2.0
    maps = attention_maps(model, tok, [PROMPT], [2, 15], [0, 4], rule="first_token", scale=gamma)
    assert len(maps) == 4
    for m in maps:
        A, C = m.probs.astype(np.float64), m.calibrated.astype(np.float64)
        p0 = A[:, 0]
        denom = 1.0 + (gamma - 1.0) * p0
        assert m.key_set == [0] and m.rule == "first_token"
        np.testing.assert_allclose(C[:, 0], gamma * p0 / denom, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(C[:, 1:], A[:, 1:] / denom[:, None], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(C.sum(-1), 1.0, atol=1e-5)
        assert m.set_mass[0] == pytest.approx(p0.sum(), rel=1e-5)
        assert m.set_mass[1] > m.set_mass[0] + 1e-3  # gamma > 1 moves mass onto the first token
        assert m.sinks == next(x for x in attention_maps(model, tok, [PROMPT], [m.layer], [m.head])).sinks

    phrase = "a charming , funny and moving film"
    start = PROMPT.index(phrase)
    span = [start, start + len(phrase)]
    alpha = 0.05
    maps = attention_maps(model, tok, [PROMPT], [15], [1], rule="spans", alpha=alpha, spans=[span])
    (m,) = maps
    offsets = tok(PROMPT, return_offsets_mapping=True)["offset_mapping"]
    expect = [i for i, (a, b) in enumerate(offsets) if a < b and a < span[1] and span[0] < b]
    assert m.key_set == expect and len(expect) >= 6
    assert "".join(m.tokens[i] for i in expect).strip() == phrase
    A, C = m.probs.astype(np.float64), m.calibrated.astype(np.float64)
    inside = np.zeros(A.shape[1], dtype=bool)
    inside[expect] = True
    S = A[:, inside].sum(-1)
    N = A[:, ~inside].sum(-1)
    seen = S > 0  # rows before the span see no emphasised key and stay unchanged
    assert seen.sum() > 5 and (~seen).sum() > 5
    np.testing.assert_array_equal(C[~seen], A[~seen])
    d = (S + alpha * N)[seen, None]
    np.testing.assert_allclose(C[seen][:, inside], A[seen][:, inside] / d, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(C[seen][:, ~inside], alpha * A[seen][:, ~inside] / d, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(C.sum(-1), 1.0, atol=1e-5)
    assert m.set_mass[1] > m.set_mass[0]


def test_inspect_cli_rules(smollm2_path, tmp_path, capsys):
    from act_plugin.cli import main

    out = tmp_path / "ft"
    rc = main(["inspect", "--model", smollm2_path, "--prompt", PROMPT, "--layers", "3", "--heads", "0-1",
               "--rule", "first_token", "--scale", "0.5", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| prompt | layer | head | rule | key set" in printed and "first_token (gamma=0.5)" in printed
    data = json.loads((out / "sinks.json").read_text())
    assert data["rule"] == "first_token" and data["scale"] == 0.5
    rules = [h["rule"] for h in data["heads"]]
    assert len(rules) == 2 and all(r["key_set"] == [0] and r["moved_onto_set"] < 0 for r in rules)
    assert "## What the rule moves" in (out / "sinks.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["p0_L3_H0.png", "p0_L3_H1.png"]

    out = tmp_path / "sp"
    rc = main(["inspect", "--model", smollm2_path, "--prompt", PROMPT, "--layers", "3", "--heads", "0",
               "--rule", "spans", "--span", "0:8", "--alpha", "0.1", "--no-plots", "-o", str(out)])
    assert rc == 0
    row = json.loads((out / "sinks.json").read_text())["heads"][0]["rule"]
    assert row["rule"] == "spans" and row["key_set"] and row["moved_onto_set"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--rule", "spans"], "needs at least one --span"),
    (["--rule", "spans", "--span", "5-9"], "expected START:END"),
    (["--rule", "spans", "--span", "0:100000"], "past the end of the prompt"),
    (["--rule", "spans", "--span", "0:10", "--alpha", "0"], "--alpha must be in (0, 1]"),
    (["--rule", "first_token"], "needs --scale"),
    (["--rule", "first_token", "--scale", "-1"], "--scale must be > 0"),
    (["--scale", "2"], "--scale is a setting of rule 'first_token'"),
    (["--span", "0:4"], "--span is a setting of rule 'spans'"),
])
def test_inspect_cli_rule_errors(smollm2_path, capsys, argv, message):
    from act_plugin.cli import main

    assert main(["inspect", "--model", smollm2_path, "--prompt", "Review: dull .\nSentiment:", "--layers", "3",
                 "--heads", "0", "--no-plots", "-o", "/tmp/act-inspect-errors", *argv]) == 2
    assert message in capsys.readouterr().err
