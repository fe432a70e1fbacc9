from act_plugin.config.act_config import *  # noqa: F401,F403
from act_plugin.config.act_config import (  # noqa: F401
    REQUEST_DEFAULT,
    REQUEST_OFF,
    engine_args,
    explain_validation,
    load_config_file,
    parse_act_file,
    read_config_mapping,
)
