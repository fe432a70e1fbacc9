"""The eval's statistics live in :mod:`act_plugin.stats` (shared with the search); this
module keeps the old import path working."""

from act_plugin.stats import *  # noqa: F401,F403
from act_plugin.stats import __all__  # noqa: F401
