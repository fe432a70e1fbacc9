"""Install layers: no module of the serving path imports anything from the [eval] extra, and
the eval and task packages import neither vLLM nor lm-eval until a model is used (each check
in a fresh interpreter, so no other test's imports can hide an import).

Third-party packages may still import an installed extra on their own (transformers imports
scipy when it is there): the check is on the importing module, so it names the act_plugin
module that would break a lean install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_EXTRA = ("scipy", "matplotlib", "lm_eval")

# Every module of the serving path: the engine plugin (walked, so new modules are covered),
# the config, the ACT maths, the kernels and the transformers path.
SERVING = ["act_plugin", "act_plugin.config", "act_plugin.core", "act_plugin.hf", "act_plugin.atomic_files",
           "act_plugin.kernels", "act_plugin.models", "act_plugin.vllm.*"]


def _loaded_after(modules: list[str], code: str = "") -> dict[str, list[str]]:
    """Import ``modules`` (``pkg.*`` = every module under ``pkg``) and run ``code`` in a fresh
    interpreter; report the modules imported, every ``act_plugin`` import of an [eval]
    package (``ours``) and ``sys.modules`` at the end."""
    script = f"""
import builtins, importlib, json, pkgutil, sys
WATCH = {EVAL_EXTRA!r}
GPU_ONLY = ("flashinfer",)
ours = []
_import, _import_module = builtins.__import__, importlib.import_module

def _note(importer, name):
    if name.split(".")[0] in WATCH and str(importer).startswith("act_plugin"):
        ours.append(importer + " -> " + name)

def _hooked_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        _note((globals or {{}}).get("__name__", ""), name)
    return _import(name, globals, locals, fromlist, level)

def _hooked_import_module(name, package=None):
    _note(sys._getframe(1).f_globals.get("__name__", ""), name)
    return _import_module(name, package)

builtins.__import__, importlib.import_module = _hooked_import, _hooked_import_module
names = []
for m in {modules!r}:
    if m.endswith(".*"):
        pkg = importlib.import_module(m[:-2])
        names += [pkg.__name__] + [i.name for i in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    else:
        names.append(m)
for n in names:
    try:
        importlib.import_module(n)
    except ModuleNotFoundError as e:
        # a wrapper of a GPU-only backend (flashinfer) imports vLLM's native backend, which
        # needs its GPU library; vLLM only loads it where that library is installed
        if e.name not in GPU_ONLY:
            raise
{code}
print(json.dumps({{"imported": names, "ours": ours, "modules": sorted(sys.modules)}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "ERROR"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_serving_path_needs_no_eval_extra():
    got = _loaded_after(SERVING)
    assert "act_plugin.vllm.config_hook" in got["imported"] and "act_plugin.vllm.backends" in got["imported"]
    assert got["ours"] == []


def test_eval_and_tasks_import_neither_vllm_nor_lm_eval():
    got = _loaded_after(["act_plugin.eval", "act_plugin.eval.scoring", "act_plugin.tasks", "act_plugin.lmeval"],
                        "import act_plugin.lmeval\nassert 'lm_eval' not in sys.modules\n"
                        "from act_plugin.eval import register_lm_eval_model\nregister_lm_eval_model()")
    loaded = set(got["modules"])
    assert "vllm" not in loaded and "act_plugin.eval.model" not in loaded
    # registering the model imports lm-eval's registry, not its model zoo
    assert "lm_eval.models.vllm_causallms" not in loaded


def test_lazy_registration_resolves_to_the_model():
    code = """
import sys
from act_plugin.eval import register_lm_eval_model
register_lm_eval_model(); register_lm_eval_model()  # idempotent
assert "vllm" not in sys.modules and "act_plugin.eval.model" not in sys.modules
from lm_eval.api.registry import get_model
cls = get_model("act-vllm")
from act_plugin.eval.model import ActVLLM
assert cls is ActVLLM, cls
register_lm_eval_model()  # still fine once the real class is registered
"""
    _loaded_after([], code)


def test_a_command_needing_the_eval_extra_names_it(monkeypatch, capsys):
    from act_plugin import cli

    real = cli.importlib.import_module

    def without_lm_eval(name, package=None):
        if name == "act_plugin.eval.cli":
            raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")
        return real(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", without_lm_eval)
    assert cli.main(["eval", "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "act-plugin eval: error: lm_eval is not installed" in err and "pip install 'act-plugin[eval]'" in err
