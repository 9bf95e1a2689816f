"""Run configs: `get_config(arg)` of each file is what `--config=configs/<file>.py[:arg]` loads."""
