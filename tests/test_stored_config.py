"""A run written before a config field existed still restores and resumes.

Checkpoints store the whole config; fields added to configs/spender.py later are missing there.
"""

import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError
from configs import spender


def _without(config_json: dict, dotted: str) -> dict:
    section, name = dotted.rsplit(".", 1)
    node = config_json
    for part in section.split("."):
        node = node[part]
    del node[name]
    return config_json


def test_a_stored_config_lacking_a_field_resolves_to_its_default():
    defaults = spender.get_config("")
    stored = _without(settings_lib.config_json(spender.get_config("smoke")), "eval.embed_chunk_rows")
    with pytest.raises(ConfigError, match="eval.embed_chunk_rows is missing"):
        settings_lib.resolve(stored)
    completed = settings_lib.resolve(settings_lib.with_missing_fields(stored, defaults))
    # Everything the stored config has wins; only the missing field comes from the defaults.
    assert completed == settings_lib.resolve(spender.get_config("smoke"))
    assert completed.eval.embed_chunk_rows == defaults.eval.embed_chunk_rows


def test_resume_accepts_a_field_newer_than_the_run_but_not_a_changed_one():
    current = settings_lib.config_json(spender.get_config("smoke"))
    saved = _without(settings_lib.config_json(spender.get_config("smoke")), "eval.embed_chunk_rows")
    changes = settings_lib.changes_on_resume(saved, current)
    assert changes == {"eval.embed_chunk_rows": (None, current["eval"]["embed_chunk_rows"])}
    saved["train"]["batch_size"] = current["train"]["batch_size"] * 2
    with pytest.raises(ConfigError, match="train.batch_size"):
        settings_lib.changes_on_resume(saved, current)


def test_an_empty_tower_path_on_the_command_line_means_a_random_tower():
    config = spender.get_config("")
    assert settings_lib.resolve(config).model.spectrum_tower.weights  # the shipped tower
    config.model.spectrum_tower.weights = ""
    assert settings_lib.resolve(config).model.spectrum_tower.weights is None
