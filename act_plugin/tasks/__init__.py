"""The shared task layer: the ACT paper's evaluation suite as project tasks, read from local
data files, used by eval (:mod:`act_plugin.eval`) and head search (:mod:`act_plugin.search`).

Modules by job: :mod:`~act_plugin.tasks.readers` (file readers), :mod:`~act_plugin.tasks.registry`
(task specs, suites, names), :mod:`~act_plugin.tasks.data` (data folder, splits),
:mod:`~act_plugin.tasks.prompts` (documents, prompts), :mod:`~act_plugin.tasks.sample` (:class:`Sample`),
:mod:`~act_plugin.tasks.tokens` (single-token answer checks), :mod:`~act_plugin.tasks.lm_eval_tasks`
(lm-eval's ``custom_dataset`` and the generated task folder). Importing it needs neither vLLM nor lm-eval.

One definition per task serves three consumers:

* lm-evaluation-harness, through the generated task folder ``evals/tasks`` (YAML files with
  ``custom_dataset: !function utils.dataset``; see :func:`write_lm_eval_tasks`);
* head search and other code that wants prompts without lm-eval: :func:`load_samples`;
* the eval runner (:mod:`act_plugin.eval.runner`), which maps short names (``sst2``) to the
  lm-eval task names (``act_sst2``).

Prompt formats (the paper's, ``docs/ACT_SPEC.md`` section 4; instructions and
templates as in the authors' release, ``utils/data_utils.py`` of GATECH-EIC/ACT)::

    <instruction>\\n\\n[<k few-shot examples: query + " " + answer + "\\n\\n">]<query>

* classification: the query ends with e.g. ``Sentiment:``; the answers are the label words
  with a leading space (``" negative"``), each a single token; prediction = the label whose
  token has the highest next-token log-probability at the end of the prompt;
* multiple choice (``arc_easy`` ...): question, lettered options ``A. ...``, ``Answer:``;
  answers ``" A"``, ``" B"``, ...; prediction = the letter with the highest next-token
  log-probability (the paper compares the greedy token with the gold letter; restricting the
  argmax to the letters differs only when the greedy token is not a letter, which the
  per-sample files record as ``greedy`` flags);
* ``*_ll`` variants: lm-eval's usual log-likelihood of each full answer text after
  ``Question: ...\\nAnswer:`` (acc and length-normalised acc_norm).

Differences from the release, on purpose: the release's templates end with a space
(``"Sentiment: "``) and its label words start with one (``" negative"``); here the space
belongs to the label token (``"Sentiment:"`` + ``" negative"``), which is how BPE tokenizers
see the words in running text and makes every label one token. The SUBJ instruction's
typo ``'object'`` is written ``'objective'`` (the label word). TREC's coarse classes map to
the paper's six words by meaning (ABBR -> Expression (TREC's ABBR has the fine classes
``abb`` and ``exp``), ENTY -> Entity, DESC -> Description, HUM -> Person, NUM -> Number,
LOC -> Location); the release indexed the words by HF label id, which mislabels four classes.

Splits: ``train`` (for head search and few-shot examples) and ``test`` (reported accuracy;
aliases ``dev``, ``validation``, ``val``). Where the data has no official training split, a
deterministic seeded carve-out of the file is the ``train`` split (see ``evals/README.md``
and :data:`CARVE_SEED`); ``all`` is then the whole file in file order. The
``test`` split is served in a fixed seeded order (:data:`ORDER_SEED`) so that a ``limit``
(the first N documents) is a random subset rather than, say, all negatives; every document
keeps ``row``, its 0-based row in the data file.
"""


from act_plugin.tasks.data import ENV_DATA_DIR, REPO_ROOT, check_data, resolve_data_dir
from act_plugin.tasks.lm_eval_tasks import lm_eval_dataset, render_lm_eval_tasks, write_lm_eval_tasks
from act_plugin.tasks.prompts import ORDER_SEED, load_docs, load_samples
from act_plugin.tasks.readers import LETTERS, TaskDataError
from act_plugin.tasks.registry import (
    CARVE_SEED,
    LM_EVAL_PREFIX,
    SUITES,
    TASKS,
    TaskSpec,
    get_task,
    lm_eval_name,
    parse_task_list,
    resolve_task_names,
)
from act_plugin.tasks.sample import Sample
from act_plugin.tasks.tokens import label_token_ids

__all__ = [
    "TaskSpec",
    "Sample",
    "TaskDataError",
    "TASKS",
    "SUITES",
    "LETTERS",
    "CARVE_SEED",
    "ORDER_SEED",
    "REPO_ROOT",
    "ENV_DATA_DIR",
    "get_task",
    "resolve_task_names",
    "lm_eval_name",
    "resolve_data_dir",
    "check_data",
    "load_docs",
    "load_samples",
    "label_token_ids",
    "parse_task_list",
    "lm_eval_dataset",
    "write_lm_eval_tasks",
    "render_lm_eval_tasks",
    "LM_EVAL_PREFIX",
]
