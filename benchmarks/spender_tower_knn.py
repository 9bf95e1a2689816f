"""kNN R^2 of frozen Spender features: the random default tower vs a pretrained one vs PCA.

    python benchmarks/spender_tower_knn.py --tower=runs/spender_ae/tower [--config=configs/spender.py]

On the test split of the configured dataset (the synthetic default: 3,277 galaxies), with the
spectra preprocessed as the contrastive run feeds them (z-score), the attention features of
(a) the default run's random spectrum tower (seed and size of the config), (b) the tower
directory given, and (c) PCA (64) of the inputs, each scored with the paper's protocol
(`evaluation/knn.py`: 16 distance-weighted neighbours, seeded hold-out) for redshift and
log M*. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import r2_score  # noqa: E402

from astroclip_jax import settings as settings_lib  # noqa: E402
from astroclip_jax.data import pipeline  # noqa: E402
from astroclip_jax.evaluation import knn  # noqa: E402
from astroclip_jax.models import astroclip, spender, towers  # noqa: E402


def _config(path: str, arg: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _features(module, variables, spectra, batch=256):
    apply = jax.jit(lambda v, x: spender.features(module, v, x))
    return np.concatenate([np.asarray(apply(variables, spectra[i:i + batch]))
                           for i in range(0, len(spectra), batch)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tower", required=True, help="a spender tower directory")
    parser.add_argument("--config", default="configs/spender.py")
    parser.add_argument("--variant", default="")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    config = _config(args.config, args.variant)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    settings = settings_lib.resolve(config)
    records = pipeline.PreprocessedRecords(settings.data, settings.eval.split)
    source = pipeline.data_source(settings.data, settings.eval.split)
    rows = np.arange(len(records))
    spectra = records.batch(rows)["spectrum"]
    truth = pipeline.read_records(source, rows, ("redshift", "log_mstar"))
    targets = {"redshift": truth["redshift"], "log_mstar": truth["log_mstar"]}

    _, params = astroclip.build(settings.model, jax.random.PRNGKey(settings.seed))
    random_module = towers.build_tower("spender", towers.tower_config("spender", settings.model.spectrum_tower.size))
    trained_module, trained_vars, _ = towers.load_tower_module(args.tower, kind="spender")
    feats = {"random tower (default)": _features(random_module, params["spectrum_tower"], spectra),
             "pretrained tower": _features(trained_module, trained_vars, spectra)}

    fit, query = knn.holdout_split(len(rows), settings.eval.knn_holdout,
                                   settings.eval.knn_holdout_fraction, settings.eval.seed)
    feats["PCA of the inputs"] = np.concatenate(knn.pca_reduce(spectra[fit], spectra[query]))
    print(f"{'features':28s} {'redshift R2':>12s} {'log M* R2':>12s}   (n_fit {len(fit)}, "
          f"n_query {len(query)})")
    for name, x in feats.items():
        if name == "PCA of the inputs":
            fit_x, query_x = x[:len(fit)], x[len(fit):]
        else:
            fit_x, query_x = x[fit], x[query]
        scores = [r2_score(targets[t][query], knn.knn_predict(fit_x, targets[t][fit], query_x,
                                                              settings.eval.knn_neighbors))
                  for t in ("redshift", "log_mstar")]
        print(f"{name:28s} {scores[0]:12.3f} {scores[1]:12.3f}")


if __name__ == "__main__":
    main()
