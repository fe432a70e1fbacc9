"""``run_search``: prepare -> rank -> verify -> combine -> report -> write.

Data (:mod:`act_plugin.search.split`): each task's TRAINING split is divided, seeded, into a
search part and a validation part, leaving out every document whose text an evaluated split
of any task holds. The modules, by job:

* :mod:`~act_plugin.search.steps` -- :func:`prepare`, :func:`rank`, :func:`verify`,
  :func:`combine`, each returning a dataclass;
* :mod:`~act_plugin.search.evaluator` -- exact evaluations through the partial-results store,
  and the backends (transformers, one vLLM engine) that make them;
* :mod:`~act_plugin.search.analysis` -- ranking agreement, which objective predicts validation;
* :mod:`~act_plugin.search.report` -- :func:`build_report`, the JSON report;
* :mod:`~act_plugin.search.outputs` -- :func:`write_outputs`: the ACT config, the per-task
  engine config, the report (+ Markdown summary) and the heatmap, each written atomically to
  the run folder ``runs/<name>/`` (or, with ``update_shipped``, to the configured paths).

With ``rules: [act, first_token]`` the search also proposes ``first_token`` sets after
ACT's (:mod:`~act_plugin.search.first_token`) and compares the two rules per task
(:mod:`~act_plugin.search.rules_compare`); the written configs then hold, per task, the
rule the comparison chose.

Every exact evaluation is appended to a JSONL keyed by a hash of the settings
(:mod:`act_plugin.search.store`), so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from act_plugin.config import ACTConfig
from act_plugin.search.analysis import ranking_agreement
from act_plugin.search.backends import close_backends, open_exact_backends, open_ranking_backend
from act_plugin.search.config import SearchConfig
from act_plugin.search.evaluator import Evaluator
from act_plugin.search.first_token import FirstTokenSearch, first_token_config, rank_first_token, search_first_token
from act_plugin.search.outputs import act_config, log, write_outputs
from act_plugin.search.report import build_report
from act_plugin.search.rules_compare import compare_rules, rules_section
from act_plugin.search.steps import Combination, Head, Prepared, Ranking, combine, prepare, rank, verify

__all__ = ["run_search", "SearchResult", "ranking_agreement", "prepare", "rank", "verify", "combine",
           "build_report", "write_outputs"]


@dataclass
class SearchResult:
    config: ACTConfig | None  # the shared set (None: no set passed validation)
    profiles: dict[str, ACTConfig]  # per-task sets (task -> profile), when per_task
    report: dict[str, Any]
    output: Path
    profiles_path: Path | None
    report_path: Path
    heatmap_path: Path


def run_search(
    cfg: SearchConfig,
    *,
    progress: bool = True,
    resume: bool = True,
    quiet: bool = False,
    on_candidate: Callable[[Head, dict], None] | None = None,
    hf_model: Any = None,
    llm: Any = None,
    write: bool = True,
    update_shipped: bool = False,
) -> SearchResult:
    """Run the search of ``cfg`` (see the module docs) and write its outputs: into the run
    folder (``cfg.run_dir``, default ``runs/<name>/``), or with ``update_shipped`` to the
    config's ``output`` / ``profiles_output`` / ``report`` / ``heatmap`` paths.

    ``on_candidate(head, record)`` is called after each exact single-head score (raise from
    it to interrupt; a rerun resumes). ``hf_model`` / ``llm`` reuse a loaded transformers
    model / a running ACT-enabled vLLM engine (tests)."""
    t0 = time.perf_counter()
    paths = cfg.destinations(update_shipped)
    prep = prepare(cfg, resume)
    _announce(prep, quiet)
    ranking, comb, report, ver, ft = _search(prep, t0, progress, quiet, on_candidate, hf_model, llm)
    report["timing"]["total_s"] = time.perf_counter() - t0
    shared = act_config(prep, comb.shared.heads, cfg.config_name, "shared set") if comb.shared.heads else None
    profiles = {t: act_config(prep, s.heads, t, f"per-task set for {t}") for t, s in comb.per_task.items() if s.heads}
    if ft is not None:
        shared, profiles = _chosen_configs(prep, ft, report["rules"]["comparison"], shared, profiles)
    if write:
        write_outputs(prep, paths, report, shared, profiles, ranking, ver, quiet)
    log(f"{len(comb.shared.heads)} heads selected; {report['timing']['total_s']:.1f}s", quiet)
    return SearchResult(config=shared, profiles=profiles, report=report, output=paths.output,
                        profiles_path=paths.profiles if cfg.per_task else None, report_path=paths.report,
                        heatmap_path=paths.heatmap)


def _chosen_configs(prep: Prepared, ft: FirstTokenSearch, comparison: dict[str, Any], shared: ACTConfig | None,
                    profiles: dict[str, ACTConfig]) -> tuple[ACTConfig | None, dict[str, ACTConfig]]:
    """The configs the comparison of the rules chose: a first_token set where it was accepted
    and beats ACT's on validation (:data:`~act_plugin.search.rules_compare.CHOICE_RULE`)."""
    if comparison["shared"]["chosen"] == "first_token":
        shared = first_token_config(prep, ft.shared.heads, prep.cfg.config_name, "shared set")
    chosen = dict(profiles)
    for task, row in comparison["per_task"].items():
        if row["chosen"] == "first_token":
            chosen[task] = first_token_config(prep, ft.per_task[task].heads, task, f"per-task set for {task}")
    return shared, chosen


def _announce(prep: Prepared, quiet: bool) -> None:
    cfg, d = prep.cfg, prep.data
    dropped = {t: x["dropped"] for t, x in d.dedup_record()["tasks"].items() if x["dropped"]}
    log(f"model {cfg.model} ({prep.shape.num_layers} layers x {prep.shape.num_heads} heads), "
        f"{len(prep.candidates)} candidates; training splits divided (seed {cfg.seed}) into a search part of "
        f"{len(d.search)} prompts and a validation part of {sum(len(c) for c in d.validation.values())} prompts: "
        + ", ".join(f"{t} {c.get('search', 0)}+{c.get('validation', 0)}" for t, c in d.counts.items())
        + ("; drawn documents dropped because an evaluated split holds their text: "
           + ", ".join(f"{t} {n}" for t, n in dropped.items()) if dropped else "")
        + f"; method {cfg.method}, objective {cfg.score}; partial results: {prep.store.path}"
        + (f" (resuming: {prep.store.resumed} records)" if prep.store.resumed else ""), quiet)
    if d.not_checked:
        log("evaluated splits NOT checked for shared texts (data missing): " + "; ".join(
            f"{t}: {why}" for t, why in d.not_checked.items()), quiet)


def _search(prep: Prepared, t0: float, progress: bool, quiet: bool, on_candidate, hf_model: Any, llm: Any):
    """Rank, verify, combine and report, with the backends open only for as long as they are needed."""
    ev = Evaluator(prep.store, prep.data)
    backends = open_ranking_backend(prep, ev, hf_model)
    ranking = Ranking()
    try:
        if prep.cfg.method == "fast":
            ranking = rank(prep, backends.hf, progress)
            log(f"ranking pass: {ranking.seconds:.1f}s for {len(prep.candidates)} heads", quiet)
        # first_token's ranking pass too runs here, before a data-parallel search releases the model
        ft_ranking = rank_first_token(prep, backends.hf, progress) if "first_token" in prep.cfg.rules else None
        open_exact_backends(prep, ev, backends, ranking, llm)
        ver = verify(prep, ev, ranking, progress, on_candidate)
        log(f"{len(ver.kept)} of {len(ver.singles)} exactly scored heads gain alone on the search part", quiet)
        comb: Combination = combine(prep, ev, ver)
        log(f"shared set: {len(comb.shared.heads)} heads ({comb.note or comb.shared.note}); per-task sets: "
            + (", ".join(f"{t} {len(s.heads)}" for t, s in comb.per_task.items()) or "not asked"), quiet)
        ft, rules = None, None
        if ft_ranking is not None:
            ft = search_first_token(prep, ev, ft_ranking, ver, progress)
            rules = rules_section(prep, ft, compare_rules(prep, ev, ver, comb, ft))
            log(f"first_token: {len(ft.kept)} of {len(ft.units)} exactly scored candidates gain; chosen per task: "
                + ", ".join(f"{t} {r['chosen']}" for t, r in rules["comparison"]["per_task"].items())
                + f"; shared: {rules['comparison']['shared']['chosen']}", quiet)
        report = build_report(prep, ranking, ver, comb, ev, time.perf_counter() - t0, backends.threads())
        if rules is not None:
            report["rules"] = rules
        report["data_parallel"] = prep.cfg.data_parallel  # scoring replicas (results do not depend on it)
    finally:
        close_backends(ev, backends)
    return ranking, comb, report, ver, ft

