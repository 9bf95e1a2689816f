"""AstroCLIP-JAX entry point: flags and dispatch only.

    python main.py --config=configs/spender.py --mode=train --workdir=runs/default
    python main.py --config=configs/spender.py --mode=eval_knn --workdir=runs/default
"""

import importlib

from absl import app, flags
from ml_collections import config_flags

from astroclip_jax.settings import ConfigError

# Each mode is `run(config, workdir)` in its own module, imported only when chosen.
MODES = {
    "prepare": "astroclip_jax.data.prepare",
    "train": "astroclip_jax.training.contrastive",
    "embed": "astroclip_jax.evaluation.embed",
    "eval_knn": "astroclip_jax.evaluation.knn",
    "search": "astroclip_jax.evaluation.search",
    "cluster": "astroclip_jax.evaluation.cluster",
}

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.DEFINE_string("workdir", "runs/default", "Work directory: checkpoints, metrics, results.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    module = importlib.import_module(MODES[flags.FLAGS.mode])
    try:
        module.run(flags.FLAGS.config, flags.FLAGS.workdir)
    # What is missing, what would be overwritten, a config field that is not what it must be.
    except (FileNotFoundError, FileExistsError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
