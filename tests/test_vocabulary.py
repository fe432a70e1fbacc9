"""One ``act`` vocabulary on every surface (act_plugin.config.vocabulary).

The table below is checked through each surface's own entry point, never through the
vocabulary module alone, so a surface that reads a value differently fails here:

* ENGINE: ``read_engine_settings({"act": X})`` (what the engine's config hook calls) and
  ``act_explicitly_off``;
* REQUEST: the front end's ``validate_request`` (HTTP 400 / ValueError) *and* the worker's
  ``WorkerState.resolve_arm``, which must agree;
* CONTROL: runtime control's parsing of ``set_act_config(engine, X)``;
* ARM: an eval config's arm, as the baseline and as a calibrated arm.

Outcomes: ``off`` (uncalibrated / ACT off), ``default`` (the engine's default profile),
``profile:a``, ``config`` (a configuration that calibrates), ``ready`` (ACT ready, no
profile), or ``no: <regex of the message>``.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from act_plugin.config import ACTConfigError, ACTEngineConfig
from act_plugin.config.vocabulary import NO_REQUEST_VALUE

PROFILE_A = {"beta": 0.4, "heads": "2-5:0"}
PROFILE_B = {"beta": 0.2, "heads": {"3": [1]}}
CONFIG = {"beta": 0.3, "heads": "2:0"}
NO_PROFILE = {"profiles": {}, "default": None}

OFF_VALUES = [False, "false", "FALSE", "off", " Off ", "none", "NONE", "baseline", "Baseline", 0]
DEFAULT_VALUES = [True, "true", "TRUE", "on", "ON", "default", " Default ", 1]
OTHER_VALUES = [2, -1, 0.5, 1.0, ["a"], [], ("off",)]

DEFAULT_IS_NO_CONFIG = "no: means 'the default profile', which only a request can select"
REQUEST_TYPE = "no: must be a profile name, 'off', 'default', true or false; got"
CALIBRATES_NOTHING = "no: calibrates nothing"

# value -> (ENGINE, REQUEST, CONTROL, ARM)
TABLE: list[tuple[Any, tuple[str, str, str, str]]] = (
    [(v, ("off", "off", "ready", "off")) for v in OFF_VALUES]
    + [(v, (DEFAULT_IS_NO_CONFIG, "default", DEFAULT_IS_NO_CONFIG, DEFAULT_IS_NO_CONFIG)) for v in DEFAULT_VALUES]
    + [(v, ("no: give an ACT config", REQUEST_TYPE, "no: give an ACT config", "no: give an ACT config"))
       for v in OTHER_VALUES]
    + [
        (None, ("no: null says neither ACT off nor a configuration", "default",
                "no: null says neither ACT off nor a configuration", "off")),
        # a string: a profile name in a request, a file or YAML text elsewhere
        ("a", ("no: 'a' is neither an existing file nor a YAML/JSON mapping", "profile:a",
               "no: 'a' is neither an existing file nor a YAML/JSON mapping", "no: ACT config file not found: a")),
        ("zzz", ("no: 'zzz' is neither an existing file", r"no: unknown ACT profile 'zzz' in the request \(engine has "
                 r"\['a', 'b'\]; or use 'off' / 'default'\)", "no: 'zzz' is neither an existing file",
                 "no: ACT config file not found: zzz")),
        # a request selects a profile; it can never carry a configuration
        (CONFIG, ("config", REQUEST_TYPE, "config", "config")),
        ({}, (CALIBRATES_NOTHING + r" \(it names no heads\)", REQUEST_TYPE, CALIBRATES_NOTHING, "off")),
        ({"beta": 1, "heads": "2:0"}, (CALIBRATES_NOTHING + r" \(beta is 1", REQUEST_TYPE, CALIBRATES_NOTHING,
                                       CALIBRATES_NOTHING + r" \(beta is 1")),
        (NO_PROFILE, ("ready", REQUEST_TYPE, "ready", "no: a per-task arm takes 'profiles'")),
    ]
)
SURFACES = ("engine", "request", "control", "arm")


# ----------------------------------------------------------------------------- surfaces
def _engine(value: Any) -> str:
    from act_plugin.vllm.config_source import act_explicitly_off, read_engine_settings

    settings = read_engine_settings({"act": value})
    assert act_explicitly_off({"act": value}) == (settings is None)
    if settings is None:
        return "off"
    return "ready" if not settings.engine_cfg.profiles else "config"


class _EngineNotStarted(Exception):
    pass


def _lm_eval_model(value: Any, monkeypatch: pytest.MonkeyPatch, as_model_arg: bool = False) -> str:
    """The eval's lm-eval model (``ActVLLM``) reads its engine setting, stopped before vLLM starts."""
    pytest.importorskip("lm_eval")
    from act_plugin.eval import model as eval_model

    seen: dict[str, Any] = {}

    def stop(self, **kwargs):
        seen.update(kwargs, lm=self)
        raise _EngineNotStarted

    monkeypatch.setattr(eval_model.VLLM, "__init__", stop)
    monkeypatch.setattr(eval_model, "resolve_pretrained", lambda p: p)
    given = {"act": value} if as_model_arg else {"additional_config": {"act": value}}
    with pytest.raises(_EngineNotStarted):
        eval_model.ActVLLM(pretrained="m", **given)
    engine_cfg, setting = seen["lm"].act_config, seen["additional_config"]["act"]
    if engine_cfg is None:  # what the model read; what the engine is told must say the same
        assert setting is False or not as_model_arg
        return "off"
    assert ACTEngineConfig.from_any(setting) == engine_cfg
    return "ready" if not engine_cfg.profiles else "config"


def _request(value: Any) -> str:
    pytest.importorskip("vllm")
    from act_plugin.vllm.frontend_state import frontend_state
    from act_plugin.vllm.router import validate_request
    from act_plugin.vllm.worker_state import WorkerState

    engine_cfg = ACTEngineConfig.from_any({"profiles": {"a": PROFILE_A, "b": PROFILE_B}, "default": "b"})
    params = SimpleNamespace(extra_args={"act": value})
    saved = (frontend_state.engine_cfg, frontend_state.explicitly_off)
    frontend_state.set(engine_cfg)
    worker = WorkerState(engine_cfg=engine_cfg)
    try:
        validate_request(params)
    except ValueError:
        # the worker never sees a refused value; were it to, it must not read it as an arm
        assert worker.resolve_arm(value) is None and worker.unroutable == 1
        raise
    finally:
        frontend_state.set(*saved)
    arm = worker.resolve_arm(value)  # admitted: the worker reads it exactly as the front end did
    assert worker.unroutable == 0
    if arm is None:
        return "off"
    return "default" if arm.profile == engine_cfg.default else f"profile:{arm.profile}"


def _control(value: Any) -> str:
    from act_plugin.vllm import control

    engine = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={"act": NO_PROFILE}, model_config=None))
    cfg = control._validated(engine, value)
    return "ready" if not cfg.profiles else "config"


def _arm(value: Any) -> str:
    from act_plugin.eval.config import load_eval_config

    def load(arms: dict) -> Any:
        return load_eval_config({"model": "smollm2-135m", "arms": arms, "tasks": ["sst2"]})

    try:
        assert load({"baseline": value, "x": CONFIG}).arms["baseline"] is None
    except ACTConfigError as baseline_error:
        assert "arm 'baseline' is the uncalibrated model" in str(baseline_error)
    else:
        with pytest.raises(ACTConfigError, match="only 'baseline' may be|calibrates nothing"):
            load({"baseline": None, "x": value})  # what the baseline takes, a calibrated arm refuses
        return "off"
    load({"baseline": None, "x": value})
    return "config"


def _outcome(surface: str, value: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    fn = {"engine": _engine, "request": _request, "control": _control, "arm": _arm,
          "lm-eval engine": lambda v: _lm_eval_model(v, monkeypatch)}[surface]
    try:
        return fn(value)
    except (ACTConfigError, ValueError) as e:
        return f"no: {e}"


@pytest.mark.parametrize("surface", SURFACES + ("lm-eval engine",))
@pytest.mark.parametrize("value, expected", TABLE, ids=[repr(v) for v, _ in TABLE])
def test_every_surface_reads_the_table(monkeypatch, surface, value, expected):
    """The eval's lm-eval model passes its engine setting on: it reads it as the engine does."""
    import re

    monkeypatch.delenv("ACT_CONFIG", raising=False)
    want = expected[SURFACES.index(surface if surface in SURFACES else "engine")]
    got = _outcome(surface, value, monkeypatch)
    if want.startswith("no: "):
        assert got.startswith("no: ") and re.search(want[4:], got), f"{surface} {value!r}: {got}"
    else:
        assert got == want, f"{surface} {value!r}"


@pytest.mark.parametrize("value, expected", [("off", "off"), (False, "off"), (NO_PROFILE, "ready"),
                                             (CONFIG, "config")])
def test_lm_eval_model_arg_act_reads_the_vocabulary(monkeypatch, value, expected):
    """``act=`` of the lm-eval model: an off word starts a vanilla engine (``{"act": False}``)."""
    assert _lm_eval_model(value, monkeypatch, as_model_arg=True) == expected
    with pytest.raises(ACTConfigError, match="calibrates nothing"):
        _lm_eval_model({}, monkeypatch, as_model_arg=True)


# ----------------------------------------------------------------------------- documented differences
def test_a_request_without_a_value_follows_the_default():
    cfg = ACTEngineConfig.from_any({"profiles": {"a": PROFILE_A}, "default": "a"})
    assert cfg.resolve_request(NO_REQUEST_VALUE) == cfg.resolve_request(None) == "a"


@pytest.mark.parametrize("name", ["off", "none", "baseline", "false", "on", "default", "true"])
def test_every_keyword_is_a_reserved_profile_name(name):
    with pytest.raises(ACTConfigError, match="is reserved"):
        ACTEngineConfig.from_any({"profiles": {name: PROFILE_A}, "default": None})


def test_engine_keyword_wins_over_act_config_file(monkeypatch, tmp_path):
    """Off in additional_config and ACT_CONFIG=off both mean off; an exported file is ignored."""
    from act_plugin.vllm.config_source import read_engine_settings

    f = tmp_path / "act.yaml"
    f.write_text("heads: '2:0,4'\n")
    monkeypatch.setenv("ACT_CONFIG", str(f))
    for off in ("baseline", "FALSE", 0):
        assert read_engine_settings({"act": off}) is None
    assert read_engine_settings({}).engine_cfg.profiles["act"].heads == {2: [0, 4]}
    monkeypatch.setenv("ACT_CONFIG", "off")
    assert read_engine_settings({}) is None


@pytest.mark.parametrize("content, message", [
    ("", "no configuration: the file is empty"),
    ("act: {}\n", r"calibrates nothing \(it names no heads\)"),
    ("beta: 1\nheads: '2:0'\n", r"calibrates nothing \(beta is 1"),
    ("false\n", "the ACT engine config must be a mapping, got bool"),
])
def test_act_config_files_that_configure_nothing_are_refused(monkeypatch, tmp_path, content, message):
    from act_plugin.vllm.config_source import read_engine_settings

    f = tmp_path / "act.yaml"
    f.write_text(content)
    monkeypatch.setenv("ACT_CONFIG", str(f))
    with pytest.raises(ACTConfigError, match=rf"act\.yaml: .*{message}"):
        read_engine_settings({})


def test_named_profiles_that_calibrate_nothing_are_kept_and_described():
    """An eval's control arm is a named profile that calibrates nothing: kept, and logged."""
    cfg = ACTEngineConfig.from_any({"profiles": {"ctl": {"beta": 1, "heads": "2:0"}, "a": PROFILE_A},
                                    "default": "ctl"})
    assert cfg.calibrates_nothing_notes() == [
        "profile 'ctl' calibrates nothing (beta is 1 (no change)): requests that select it run uncalibrated"]
    ready = ACTEngineConfig.from_any(NO_PROFILE)
    assert "ACT ready, no profile" in ready.calibrates_nothing_notes()[0]


# ----------------------------------------------------------------------------- the engine's config hook
def _engine_config(smollm2_path, additional_config, monkeypatch):
    """A real VllmConfig built through vLLM's EngineArgs (the config hook runs; no engine starts)."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from act_plugin.vllm import register

    monkeypatch.delenv("ACT_CONFIG", raising=False)
    register()
    args = EngineArgs(model=smollm2_path, dtype="float32", max_model_len=512, gpu_memory_utilization=0.1,
                      enforce_eager=True, enable_prefix_caching=True, additional_config=additional_config)
    return args.create_engine_config()


def test_engine_ready_with_no_profile_is_set_up_and_says_so(smollm2_path, monkeypatch, caplog):
    from act_plugin.vllm.frontend_state import frontend_state

    saved = (frontend_state.engine_cfg, frontend_state.explicitly_off)
    try:
        with caplog.at_level(logging.INFO, logger="act_plugin"):
            cfg = _engine_config(smollm2_path, {"act": dict(NO_PROFILE)}, monkeypatch)
        # Everything runtime control needs is installed, and the scheduling a later profile
        # needs is already in force.
        assert cfg.additional_config["act"] == NO_PROFILE
        assert cfg.model_config.logits_processors and cfg.parallel_config.worker_extension_cls
        assert not cfg.cache_config.enable_prefix_caching and not cfg.scheduler_config.enable_chunked_prefill
        assert frontend_state.engine_cfg == ACTEngineConfig()
        log = caplog.text
        assert "ACT ready, no profile" in log and "prefix caching off" in log
        assert "the profiles runtime control adds need them" in log
        assert "every request runs uncalibrated until runtime control" in log
    finally:
        frontend_state.set(*saved)


@pytest.mark.parametrize("act", [{}, {"beta": 1.0, "heads": "2:0"}, "{}"])
def test_engine_config_that_calibrates_nothing_is_refused_before_scheduling_changes(smollm2_path, monkeypatch,
                                                                                     act):
    with pytest.raises(Exception, match=r"additional_config 'act': the ACT config calibrates nothing .*"
                                        r"\{\"profiles\": \{\}, \"default\": null\}"):
        _engine_config(smollm2_path, {"act": act}, monkeypatch)
