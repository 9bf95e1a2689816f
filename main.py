"""AstroCLIP-JAX entry point: flags and dispatch only.

    python main.py --config=configs/spender.py --mode=train --workdir=runs/default
    python main.py --config=configs/spender.py --mode=eval_knn --workdir=runs/default

A mistake in what the user gave (a file, a setting, a work directory: `errors.UserError`) is
printed as one line, `error: ...`, with exit status 1; anything else is a bug and keeps its
traceback.
"""

import importlib
import sys

from absl import app, flags
from ml_collections import config_flags

from astroclip_jax import locks, processes
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import UserError
from astroclip_jax.evaluation import registry

# Each mode is `run(settings, workdir)` in its own module, imported only when chosen; the
# evaluation modes are run by the evaluator runner from its registry (evaluation/registry.py).
MODES = {
    "prepare": "astroclip_jax.data.prepare",
    "train": "astroclip_jax.training.contrastive",
    "pretrain_spender": "astroclip_jax.training.spender_pretrain",
    "pretrain_moco": "astroclip_jax.training.moco",
    "pretrain_specformer": "astroclip_jax.training.specformer_pretrain",
    "embed": "astroclip_jax.evaluation.embed",
    **{mode: "astroclip_jax.evaluation.runner" for mode in registry.EVALUATORS},
    "export": "astroclip_jax.evaluation.export",
    "serve": "astroclip_jax.serving.app",
}

# Modes that write the work directory take its lock before importing anything heavy, so a
# second writer stops within a second; the mode itself holds the same (re-entrant) lock.
WRITERS = {"pretrain_spender": "spender pretraining", "pretrain_moco": "MoCo pretraining",
           "pretrain_specformer": "SpecFormer pretraining", "train": "training"}

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.DEFINE_string("workdir", "runs/default", "Work directory: checkpoints, metrics, results.")
flags.mark_flags_as_required(["config"])


def parse_flags(argv):
    """absl's parsing, with a misspelt or mistyped `--config.*` override as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {_without_traceback(str(e))}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config overrides
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
        flag = _override_named_in(message, argv)
        if flag.endswith("." + message):  # ml_collections said only the missing name
            message = "no such field"
        raise SystemExit(f"error: {flag}: not a config field or not of its type ({message})") \
            from None


def _without_traceback(message: str) -> str:
    """ml_collections puts the config file's traceback into its flag error: keep the first
    line and the exception's own line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines)


def _loaded_config():
    """The config; a config file that failed to load is reported only when first read."""
    try:
        config = flags.FLAGS.config
        config.keys()
    except OSError as e:
        raise SystemExit(f"error: {_without_traceback(str(e))}") from None
    return config


def _override_named_in(message: str, argv) -> str:
    """The `--config.a.b` flag an override error is about (ml_collections names only `b`)."""
    overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    key = message.split("'")[1] if message.count("'") >= 2 else message.split()[0]
    named = [flag for flag in overrides if key in flag.split(".")[1:]]
    return named[0] if named else "a --config override"


def run_mode(settings: settings_lib.RunSettings, mode: str, workdir: str) -> None:
    """Import the mode's module (only now: after the lock) and run it."""
    module = importlib.import_module(MODES[mode])
    if mode in registry.EVALUATORS:
        module.run(settings, workdir, mode)
    else:
        module.run(settings, workdir)


def main(argv):
    del argv
    mode, workdir, config = flags.FLAGS.mode, flags.FLAGS.workdir, _loaded_config()
    try:
        settings = settings_lib.resolve(config, mode)  # once: every setting checked before any work
        with locks.nothing_left_if_refused(workdir):
            if mode in WRITERS and not processes.wants_distributed(settings.multihost):
                with locks.DirectoryLock(workdir, WRITERS[mode]):
                    run_mode(settings, mode, workdir)
            else:
                run_mode(settings, mode, workdir)
    except UserError as e:
        if processes.started():  # one of several: leave now, not after JAX's shutdown wait
            processes.exit_now(str(e))
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
