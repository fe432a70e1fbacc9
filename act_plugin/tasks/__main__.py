"""``python -m act_plugin.tasks [FOLDER]``: regenerate the lm-eval task folder (default ``evals/tasks``)."""

import sys

from act_plugin.tasks.data import REPO_ROOT
from act_plugin.tasks.lm_eval_tasks import write_lm_eval_tasks

if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else str(REPO_ROOT / "evals" / "tasks")
    print(write_lm_eval_tasks(target))
