"""The one rulebook (settings.RULES): every section read by one loop, every field checked from
one table, before anything is created; the config resolved once per mode."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import typing

import pytest

import cli_runs
from astroclip_jax import settings
from astroclip_jax.errors import ConfigError
from configs import moco, spender, spender_pretrain

# Fields any value of their type is right for (names, paths, switches, free-form lists).
FREE = {"data.builder_config", "data.data_dir", "data.manual_dir", "data.provabgs_path",
        "data.grid", "data.rebuild", "model.image_tower.size", "model.image_tower.weights",
        "model.spectrum_tower.size", "model.spectrum_tower.weights",
        "model.image_head.init_from_tower", "model.spectrum_head.init_from_tower",
        "model.heads_weights",
        "model.learn_logit_scale", "augment.rotation", "augment.flip", "feature_cache.enabled",
        "feature_cache.on_device", "feature_cache.dir", "train.trainable", "train.train_split",
        "train.val_split", "eval.split", "eval.search_targetids", "eval.overwrite",
        "eval.embed_inputs", "eval.survey_file", "probe.regression_targets",
        "probe.classification_targets", "probe.photometry_columns",
        "probe.supervised_image_size", "probe.supervised_spectrum_size",
        "spender_pretrain.init_from", "spender_pretrain.similarity",
        "spender_pretrain.consistency", "spender_pretrain.tower_dir", "moco.tower_dir",
        "specformer_pretrain.tower_dir",
        "model.grid", "model.spectrum_length"}


def _fields(cls, prefix):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from _fields(hint, f"{prefix}.{field.name}")
        else:
            yield f"{prefix}.{field.name}"


ALL_FIELDS = {name for section, cls, _ in settings.SECTIONS for name in _fields(cls, section)}


def test_every_field_has_a_rule_or_is_free():
    """A new field (or section) without a rule fails here: the table is the one place."""
    assert set(settings.RULES) <= ALL_FIELDS, set(settings.RULES) - ALL_FIELDS  # no typos
    unruled = ALL_FIELDS - set(settings.RULES) - FREE
    assert not unruled, f"fields without a rule: {sorted(unruled)}"


def test_only_main_and_stored_configs_resolve():
    """Modes receive settings: resolve() is called by main.py (once per mode) and by the
    restore of a *stored* config (a checkpoint's or an export's), nowhere else."""
    root = cli_runs.ROOT
    callers = set()
    for folder, _, names in os.walk(os.path.join(root, "astroclip_jax")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path).read())
                if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                       and n.func.attr == "resolve" for n in ast.walk(tree)):
                    callers.add(os.path.relpath(path, root))
    assert callers <= {"astroclip_jax/evaluation/restore.py"}, callers


@pytest.mark.parametrize("make, mode, field, value, needle", [
    (moco.get_config, "pretrain_moco", "moco.encoder_momentum", 1.5, "in [0, 1)"),
    (moco.get_config, "pretrain_moco", "moco.sgd_momentum", -0.1, "in [0, 1)"),
    (moco.get_config, "pretrain_moco", "moco.weight_decay", -1e-4, ">= 0"),
    (moco.get_config, "pretrain_moco", "moco.temperature", 0.0, "> 0"),
    (moco.get_config, "pretrain_moco", "moco.queue_size", 100, "multiple of train.batch_size"),
    (moco.get_config, "pretrain_moco", "moco.bn_groups", 3, "divisor of train.batch_size"),
    (moco.get_config, "pretrain_moco", "moco.crop", 0, "> 0"),
    (moco.get_config, "pretrain_moco", "moco.input_crop", 16, ">= moco.crop"),
    (moco.get_config, "pretrain_moco", "moco.jitter", -1, ">= 0"),
    (moco.get_config, "pretrain_moco", "moco.size", "resnet5", "sizes of moco.kind"),
    (moco.get_config, "pretrain_moco", "train.adam_eps", 0.0, "> 0"),
    (spender_pretrain.get_config, "pretrain_spender", "spender_pretrain.restframe_bins", 1,
     "at least 2 bins"),
    (spender_pretrain.get_config, "pretrain_spender", "spender_pretrain.z_max", -0.5, "> 0"),
    (spender_pretrain.get_config, "pretrain_spender", "spender_pretrain.consistency_amp", -1.0,
     ">= 0"),
    (spender_pretrain.get_config, "pretrain_spender", "spender_pretrain.encoder_size", "huge",
     "SIZES"),
    (spender_pretrain.get_config, "pretrain_spender", "train.adam_b2", 1.0, "in [0, 1)"),
    (spender.get_config, "train", "train.adam_b1", -0.9, "in [0, 1)"),
    (spender.get_config, "train", "eval.seed", -1, ">= 0"),
    (spender.get_config, "train", "train.learning_rate", float("nan"), "finite"),
    (spender.get_config, "probe", "probe.feature_sets", ("image", "images"), "FEATURE_SETS"),
])
def test_out_of_range_values_are_named(make, mode, field, value, needle):
    config = make("smoke")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=rf"config field {field} .*{_escaped(needle)}"):
        settings.resolve(config, mode)


def _escaped(text):
    import re

    return re.escape(text)


def test_a_mode_needs_its_section():
    with pytest.raises(ConfigError, match="no moco section, which --mode=pretrain_moco needs: "
                                          "use configs/moco.py"):
        settings.resolve(spender.get_config("smoke"), "pretrain_moco")
    settings.resolve(spender.get_config("smoke"), "train")  # train does not


@pytest.mark.parametrize("config_file, mode, override, needle", [
    ("configs/moco.py", "pretrain_moco", "--config.moco.encoder_momentum=1.5",
     "moco.encoder_momentum is 1.5"),
    ("configs/spender_pretrain.py", "pretrain_spender", "--config.train.adam_eps=0.0",
     "train.adam_eps is 0.0"),
    ("configs/spender.py", "pretrain_moco", "--config.seed=0", "no moco section"),
])
def test_refusals_leave_no_work_directory(tmp_path, config_file, mode, override, needle):
    workdir = tmp_path / "run"
    proc = subprocess.run(cli_runs.command(mode, str(workdir), override, config_file=config_file),
                          cwd=cli_runs.ROOT, env=cli_runs.env(), capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1].startswith("error: ") and needle in lines[-1], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()
