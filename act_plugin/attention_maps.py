"""``act-plugin inspect``: attention maps and the hidden sinks ACT would calibrate.

    act-plugin inspect --prompt "Review: a charming, funny film.\\nSentiment:" --layers 2,15 --heads 0-2
    act-plugin inspect --model smollm2-135m --prompt-file prompts.txt --layers "2-4" --heads all -o runs/insp

For each prompt and each chosen (layer, head) it writes an attention map PNG (queries x
keys, token labels on the axes, sink columns highlighted; left the model's attention, right
the same rows after calibration with ``beta``), and a table of the sinks (printed, and saved
as ``sinks.md`` and ``sinks.json``): position, token text, the column score ``c_j`` (mean
attention the key receives from the rows that can see it, ACT_SPEC section 1) and the
attention mass calibration moves away from it, ``sum_i (1 - beta) * A[i, s]``.

It runs the Hugging Face reference path (:func:`act_plugin.hf.enable_act` with
``capture=True, capture_probs=True``) on the uncalibrated model (``beta = 1`` while
capturing, so every chosen head shows its own attention, not one changed by calibration of
the heads below it), so the sinks are exactly those :func:`act_plugin.core.find_sinks`
detects inside the ACT attention; the column scores are recomputed from the captured
probabilities and checked against that sink set.

``--rule``: the right-hand map shows what a calibration rule does to the same rows
(:mod:`act_plugin.rules`): ``act`` (default; the sinks above, scaled by ``beta``),
``first_token`` (``--scale`` gamma on position 0, ZeroTuning) or ``spans`` (``--span
START:END`` character ranges of the prompt emphasised, everything else scaled by ``--alpha``,
PASTA). The rule's key set is boxed and the table gives, per head, the attention mass on the
key set summed over rows before and after the rule: what the rule moved onto (or off) it.

``--prompt-file``: one prompt per file, or several separated by lines holding only ``---``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HeadMap", "attention_maps", "rule_table", "sink_table", "write_outputs", "add_arguments", "run"]


@dataclass
class HeadMap:
    """One (prompt, layer, head): its attention and the sinks ACT finds there."""

    prompt_index: int
    layer: int
    head: int
    token_ids: list[int]
    tokens: list[str]  # display text of each token
    probs: np.ndarray  # [Lq, Lk] the model's attention
    calibrated: np.ndarray  # [Lq, Lk] after calibration with beta
    sinks: list[int]  # sink positions (never 0)
    col_score: np.ndarray  # [Lk] c_j
    rows_seeing: np.ndarray  # [Lk] n_j
    moved: dict[int, float] = field(default_factory=dict)  # sink -> sum_i (1 - beta) * A[i, s]
    beta: float = 0.4
    threshold: float = 0.1
    rule: str = "act"  # the rule drawn on the right (act_plugin.rules)
    rule_label: str = "beta=0.4"  # its parameters, for titles and tables
    key_set: list[int] = field(default_factory=list)  # positions the rule reweights (act: the sinks)
    set_mass: tuple[float, float] = (0.0, 0.0)  # sum over rows of the mass on key_set: before, after

    def rule_row(self) -> dict[str, Any]:
        """What the rule did in this head: its key set and the mass on it, summed over rows."""
        return {"prompt": self.prompt_index, "layer": self.layer, "head": self.head, "rule": self.rule,
                "parameters": self.rule_label, "key_set": list(self.key_set),
                "key_tokens": [self.tokens[i] for i in self.key_set],
                "set_mass_before": self.set_mass[0], "set_mass_after": self.set_mass[1],
                "moved_onto_set": self.set_mass[1] - self.set_mass[0]}

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in self.sinks:
            out.append({"prompt": self.prompt_index, "layer": self.layer, "head": self.head, "position": s,
                        "token": self.tokens[s], "token_id": self.token_ids[s],
                        "mean_attention": float(self.col_score[s]), "rows": int(self.rows_seeing[s]),
                        "moved_mass": float(self.moved[s]),
                        "moved_share": float(self.moved[s] / max(1, len(self.token_ids)))})
        return out


def _display(tok, ids: Sequence[int]) -> list[str]:
    out = []
    for i in ids:
        text = tok.decode([int(i)])
        out.append(text.replace("\n", "\\n").replace("\t", "\\t") or f"<{int(i)}>")
    return out


def _rule(rule: str, prompt: str, tokenizer, *, beta: float, threshold: float, scale: float, alpha: float,
          spans: Sequence[Sequence[int]] | None, prompt_index: int):
    """The rule object and its label for one prompt (``None`` for ``act``, drawn with the sinks)."""
    import torch

    from act_plugin.config import ACTConfigError
    from act_plugin.rules import FirstTokenRule, SpanRule
    from act_plugin.span_marks import SpanError, emphasis_from_spans

    if rule == "act":
        return None, f"beta={beta}, tau={threshold}"
    if rule == "first_token":
        if not scale > 0:
            raise ACTConfigError(f"--scale must be > 0 for rule 'first_token', got {scale}")
        return FirstTokenRule(scale=float(scale)), f"gamma={scale}"
    if rule == "spans":
        if not 0 < alpha <= 1:
            raise ACTConfigError(f"--alpha must be in (0, 1] for rule 'spans', got {alpha}")
        if not spans:
            raise ACTConfigError("rule 'spans' needs at least one --span START:END (character range of the prompt)")
        try:
            marked = emphasis_from_spans(tokenizer, [prompt], [[list(x) for x in spans]])
        except SpanError as e:
            raise ACTConfigError(f"--span for prompt {prompt_index}: {e}") from None
        return SpanRule(emphasised=marked.to(torch.bool), alpha=float(alpha)), \
            f"alpha={alpha}, spans={[list(x) for x in spans]}"
    raise ACTConfigError(f"unknown rule {rule!r}: choose act, first_token or spans")


def attention_maps(model, tokenizer, prompts: Sequence[str], layers: Sequence[int], heads: Sequence[int],
                   beta: float = 0.4, threshold: float = 0.1, *, rule: str = "act", scale: float = 1.0,
                   alpha: float = 0.01, spans: Sequence[Sequence[int]] | None = None) -> list[HeadMap]:
    """Capture the attention of ``heads`` in ``layers`` for each prompt (one forward each).

    The sinks are always ACT's (``beta``, ``threshold``); ``rule`` chooses what the calibrated
    map shows: ``act`` (the sinks scaled by ``beta``), ``first_token`` (``scale``) or ``spans``
    (``alpha``, with ``spans`` the character ranges emphasised in every prompt)."""
    import torch

    from act_plugin.config import ACTConfig
    from act_plugin.core import calibrate_probs, find_sinks, visibility_mask
    from act_plugin.hf import act_enabled
    from act_plugin.rules import SpanRule, apply_rule_to_probs
    from act_plugin.span_marks import emphasised_keys

    ACTConfig(beta=beta, threshold=threshold)  # validates both with the usual messages
    capture_cfg = ACTConfig(beta=1.0, threshold=threshold, heads={int(lyr): list(heads) for lyr in layers})
    maps: list[HeadMap] = []
    for pi, prompt in enumerate(prompts):
        rule_obj, label = _rule(rule, prompt, tokenizer, beta=beta, threshold=threshold, scale=scale, alpha=alpha,
                                spans=spans, prompt_index=pi)
        enc = tokenizer(prompt, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        tokens = _display(tokenizer, ids)
        with torch.no_grad(), act_enabled(model, capture_cfg, capture=True, capture_probs=True) as handle:
            model(**enc)
            records = list(handle.records)
        for rec in sorted(records, key=lambda r: r["layer"]):
            probs = rec["probs"][0].float()  # [Hsel, Lq, Lk]: beta = 1, i.e. the model's own attention
            sinks = rec["sinks"][0]  # [Hsel, Lk] from core.find_sinks inside the ACT attention
            vis = visibility_mask(rec["q_pos"], rec["k_pos"], rec["window"])[0]  # [Lq, Lk]
            n_j = vis.sum(0)
            col_mass = (probs * vis).sum(-2)  # [Hsel, Lk]
            again = find_sinks(col_mass, n_j, (rec["k_pos"][0] == 0), threshold)
            if not torch.equal(again, sinks):  # pragma: no cover - would mean a capture bug
                raise RuntimeError(f"layer {rec['layer']}: recomputed sinks differ from the captured ones")
            col = col_mass / n_j.clamp_min(1)
            k_pos = rec["k_pos"][:1]
            if rule_obj is None:
                cal = calibrate_probs(probs, sinks, beta)
                key_set = sinks
            else:
                layer_rule = rule_obj
                if isinstance(rule_obj, SpanRule):  # the emphasis by position -> by key of this call
                    layer_rule = SpanRule(emphasised=emphasised_keys(rule_obj.emphasised, k_pos), alpha=rule_obj.alpha)
                cal, key_set = apply_rule_to_probs(layer_rule, probs.unsqueeze(0), vis.view(1, 1, *vis.shape), k_pos)
                cal, key_set = cal[0], key_set[0]
            for j, head in enumerate(rec["heads"]):
                s_pos = [int(x) for x in torch.nonzero(sinks[j]).flatten().tolist()]
                k_set = [int(x) for x in torch.nonzero(key_set[j]).flatten().tolist()]
                moved = {s: float((1.0 - beta) * (probs[j, :, s] * vis[:, s]).sum()) for s in s_pos}
                set_mass = (float(probs[j][:, k_set].sum()), float(cal[j][:, k_set].sum()))
                maps.append(HeadMap(
                    prompt_index=pi, layer=int(rec["layer"]), head=int(head), token_ids=ids, tokens=tokens,
                    probs=probs[j].numpy(), calibrated=cal[j].numpy(), sinks=s_pos, col_score=col[j].numpy(),
                    rows_seeing=n_j.numpy(), moved=moved, beta=beta, threshold=threshold, rule=rule,
                    rule_label=label, key_set=k_set, set_mass=set_mass))
    return maps


def rule_table(maps: Sequence[HeadMap]) -> str:
    """Markdown table: per head, the rule's key set and the attention mass on it (summed over
    rows) before and after the rule."""
    lines = ["| prompt | layer | head | rule | key set (positions: tokens) | mass on key set, before | after | "
             "moved onto it |",
             "|---:|---:|---:|---|---|---:|---:|---:|"]
    for m in maps:
        r = m.rule_row()
        keys = ", ".join(f"{i}:`{t}`" for i, t in zip(r["key_set"][:12], r["key_tokens"][:12])).replace("|", "\\|")
        if len(r["key_set"]) > 12:
            keys += f" ... ({len(r['key_set'])} tokens)"
        lines.append(f"| {m.prompt_index} | {m.layer} | {m.head} | {m.rule} ({m.rule_label}) | {keys or '(empty)'} | "
                     f"{r['set_mass_before']:.3f} | {r['set_mass_after']:.3f} | {r['moved_onto_set']:+.3f} |")
    return "\n".join(lines)


def sink_table(maps: Sequence[HeadMap]) -> str:
    """Markdown table: one row per sink (and one per head without sinks)."""
    lines = ["| prompt | layer | head | pos | token | mean attention c_j | moved mass sum_i (1-beta) A[i,s] | "
             "c_0 (first token, never calibrated) |",
             "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for m in maps:
        c0 = f"{float(m.col_score[0]):.3f}"
        if not m.sinks:
            lines.append(f"| {m.prompt_index} | {m.layer} | {m.head} | - | (no sink above tau={m.threshold}) "
                         f"| - | - | {c0} |")
        for r in m.rows():
            tok = r["token"].replace("|", "\\|")
            lines.append(f"| {m.prompt_index} | {m.layer} | {m.head} | {r['position']} | `{tok}` | "
                         f"{r['mean_attention']:.3f} | {r['moved_mass']:.3f} | {c0} |")
    return "\n".join(lines)


def plot_map(m: HeadMap, path: Path, max_labels: int = 64) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    n = len(m.tokens)
    size = min(16.0, 3.0 + 0.16 * n)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size + 0.8), squeeze=False)
    step = max(1, int(np.ceil(n / max_labels)))
    ticks = list(range(0, n, step))
    labels = [f"{i}:{m.tokens[i][:12]}" for i in ticks]
    vmax = float(max(m.probs.max(), m.calibrated.max(), 1e-6))
    after = (f"after calibration (beta={m.beta})" if m.rule == "act"
             else f"after rule {m.rule} ({m.rule_label}); its key set boxed in orange")
    for ax, data, title, boxed, colour in ((axes[0][0], m.probs, "attention A", m.sinks, "red"),
                                           (axes[0][1], m.calibrated, after,
                                            m.sinks if m.rule == "act" else m.key_set,
                                            "red" if m.rule == "act" else "orange")):
        masked = np.ma.masked_where(np.tril(np.ones_like(data)) == 0, data)
        im = ax.imshow(masked, cmap="viridis", norm=mcolors.PowerNorm(0.5, vmin=0.0, vmax=vmax),
                       interpolation="nearest")
        for s in boxed:
            ax.axvspan(s - 0.5, s + 0.5, facecolor="none", edgecolor=colour, linewidth=1.4)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=6)
        for lab, t in zip(ax.get_xticklabels(), ticks):
            if t in boxed:
                lab.set_color(colour)
                lab.set_fontweight("bold")
        ax.set_xlabel("key (sink columns boxed in red)" if colour == "red" else "key (the rule's key set boxed)")
        ax.set_ylabel("query")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    desc = ", ".join(f"{s} '{m.tokens[s]}' c={m.col_score[s]:.2f}" for s in m.sinks) or "none"
    fig.suptitle(f"prompt {m.prompt_index}, layer {m.layer}, head {m.head} -- sinks (tau={m.threshold}): {desc}",
                 fontsize=10)
    fig.tight_layout()
    import io

    from act_plugin.atomic_files import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(maps: Sequence[HeadMap], out_dir: str | Path, prompts: Sequence[str], plots: bool = True,
                  meta: dict | None = None) -> dict[str, Any]:
    from act_plugin.atomic_files import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    if plots:
        for m in maps:
            pngs.append(str(plot_map(m, out / f"p{m.prompt_index}_L{m.layer}_H{m.head}.png")))
    table = sink_table(maps)
    moved = rule_table(maps)
    head = "\n".join(f"- prompt {i}: {p[:200]!r}" for i, p in enumerate(prompts))
    atomic_write_text(out / "sinks.md", f"# Hidden sinks\n\n{head}\n\n{table}\n\n"
                                        f"## What the rule moves\n\n{moved}\n")
    data = {
        **(meta or {}),
        "prompts": list(prompts),
        "heads": [{"prompt": m.prompt_index, "layer": m.layer, "head": m.head, "tokens": m.tokens,
                   "sinks": m.rows(), "first_token_mean_attention": float(m.col_score[0]),
                   "rule": m.rule_row()} for m in maps],
    }
    atomic_write_json(out / "sinks.json", data)
    return {"dir": str(out), "pngs": pngs, "markdown": str(out / "sinks.md"), "json": str(out / "sinks.json"),
            "table": table, "rule_table": moved}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="smollm2-135m", help="model folder or embedded model name")
    parser.add_argument("--prompt", "-p", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", action="append", default=[],
                        help="file with one prompt, or several separated by lines '---' (repeatable)")
    parser.add_argument("--layers", default=None, help="layers, compact spec ('2,15', '2-4', 'all'); "
                        "default: 2, the middle one and the last but one")
    parser.add_argument("--heads", default="0-2", help="heads, compact spec ('0-2', '1,4', 'all'); default 0-2")
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--threshold", type=float, default=0.1, help="sink threshold tau")
    parser.add_argument("--rule", choices=["act", "first_token", "spans"], default="act",
                        help="the rule the right-hand map applies (default act: the sinks scaled by --beta)")
    parser.add_argument("--scale", type=float, default=None, help="first_token: gamma, the factor on position 0")
    parser.add_argument("--alpha", type=float, default=0.01, help="spans: the factor on keys outside the spans")
    parser.add_argument("--span", action="append", default=[], metavar="START:END",
                        help="spans: a character range [START, END) of the prompt to emphasise (repeatable; "
                             "the same ranges apply to every prompt)")
    parser.add_argument("--output-dir", "-o", default=None, help="default runs/inspect-<timestamp>")
    parser.add_argument("--no-plots", action="store_true", help="tables only")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for f in args.prompt_file:
        p = Path(f)
        if not p.is_file():
            from act_plugin.config import ACTConfigError

            raise ACTConfigError(f"--prompt-file {f}: file not found")
        text = p.read_text()
        parts = [x.strip("\n") for x in text.split("\n---\n")]
        prompts += [x for x in parts if x.strip()]
    return prompts


def _spans(args) -> list[list[int]] | None:
    """``--span START:END`` values, checked for the rule that uses them."""
    from act_plugin.config import ACTConfigError

    if args.rule != "spans":
        if args.span:
            raise ACTConfigError(f"--span is a setting of rule 'spans', not of rule {args.rule!r} (add --rule spans)")
        if args.rule != "first_token" and args.scale is not None:
            raise ACTConfigError(f"--scale is a setting of rule 'first_token', not of rule {args.rule!r}")
        if args.rule == "first_token" and args.scale is None:
            raise ACTConfigError("rule 'first_token' needs --scale (gamma > 0, the factor on the first token)")
        return None
    if args.scale is not None:
        raise ACTConfigError("--scale is a setting of rule 'first_token', not of rule 'spans'")
    out = []
    for text in args.span:
        parts = text.split(":")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            raise ACTConfigError(f"--span {text!r}: expected START:END, two character offsets (e.g. 10:42)")
        out.append([int(parts[0]), int(parts[1])])
    return out


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from act_plugin.config import ALL_HEADS, ACTConfigError, model_shape, parse_index_spec
    from act_plugin.models import ensure_model

    prompts = _prompts(args)
    if not prompts:
        raise ACTConfigError("give at least one --prompt or --prompt-file")
    spans = _spans(args)
    path = ensure_model(args.model)
    shape = model_shape(AutoConfig.from_pretrained(path))
    if args.layers is None:
        layers = sorted({min(2, shape.num_layers - 1), shape.num_layers // 2, max(0, shape.num_layers - 2)})
    else:
        spec = parse_index_spec(args.layers, "--layers")
        layers = list(range(shape.num_layers)) if spec == ALL_HEADS else spec
    hspec = parse_index_spec(args.heads, "--heads")
    heads = list(range(shape.num_heads)) if hspec == ALL_HEADS else hspec
    bad_l = [x for x in layers if x >= shape.num_layers]
    bad_h = [x for x in heads if x >= shape.num_heads]
    if bad_l or bad_h:
        raise ACTConfigError(f"--layers/--heads name {bad_l or ''}{bad_h or ''} but {shape.describe()}")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    maps = attention_maps(model, tok, prompts, layers, heads, beta=args.beta, threshold=args.threshold,
                          rule=args.rule, scale=args.scale if args.scale is not None else 1.0, alpha=args.alpha,
                          spans=spans)
    out_dir = args.output_dir or f"runs/inspect-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    meta = {"model": args.model, "layers": layers, "heads": heads, "beta": args.beta, "threshold": args.threshold,
            "rule": args.rule, **({"scale": args.scale} if args.rule == "first_token" else {}),
            **({"alpha": args.alpha, "spans": spans} if args.rule == "spans" else {})}
    res = write_outputs(maps, out_dir, prompts, plots=not args.no_plots, meta=meta)
    print(res["table"])
    if args.rule != "act":
        print("\n" + res["rule_table"])
    print(f"\n{len(res['pngs'])} attention maps, sinks.md and sinks.json in {res['dir']}", file=sys.stderr)
    return 0
