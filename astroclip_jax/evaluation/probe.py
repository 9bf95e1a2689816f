"""`--mode=probe`: what the embeddings are worth, beside baselines and supervised bounds.

    python main.py --config=configs/spender.py --mode=probe --workdir=runs/default

On the galaxies of the evaluation split that have every target, split as `eval_knn` splits them
(a seeded shuffle; the last min(eval.knn_holdout, eval.knn_holdout_fraction * N) are held out),
for each feature set (the run's image and spectrum embeddings; the baselines `eval_knn` has:
frozen tower features, the towers with untrained heads, PCA of the model inputs; and the g, r, z
magnitudes) and each target (`probe.regression_targets`, `probe.classification_targets`):

- zero-shot kNN: the paper's (16 neighbours, distance-weighted) and AstroCLIP v2's (64 on
  standardised features), fitted on all labelled fit rows;
- ridge and MLP probes (`probe_methods.py`) on `probe.fractions` of the labelled fit rows, each
  fraction drawn per seed (`probe.seeds`): the mean and std over seeds;
- supervised bounds (`training/supervised.py`): the image tower's architecture on the images,
  the Spender encoder on the spectra, an MLP on the magnitudes, trained end to end on the
  labelled fit rows (one seed), scored on the same held-out rows.

The penalty of ridge, the early stopping of the MLPs and of the supervised networks use a
validation slice of the labelled rows only: no number is chosen on the held-out rows.

Writes `workdir/probe/results.json` (every score, with its seeds' values), prints the table
(rows: modality x method, columns: targets, as AstroCLIP v2 reports) and draws
`workdir/probe/few_shot.png` (few-shot curves per target, supervised bounds as lines). The
supervised networks train in `workdir/probe_supervised/<modality>-<key>/` (checkpoints and
curves of the shared loop); a rerun with the same rows and settings reuses them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from astroclip_jax.errors import ConfigError, DataError
from astroclip_jax.evaluation import knn, probe_methods, runner
from astroclip_jax.evaluation.feature_sets import FEATURE_SETS

SUPERVISED_DIR = "probe_supervised"
# What each supervised bound sees (its rows' "features" in the table).
SUPERVISED_INPUTS = {"image": "images_resnet", "spectrum": "spectra_spender",
                     "photometry": "magnitudes_mlp"}

LABELS = {"z_hp": "redshift", "redshift": "redshift", "log_mstar": "log M*",
          "log_z_mw": "log Z_MW", "tage_mw": "t_age MW", "log_ssfr": "log sSFR",
          "bulge_fraction": "bulge frac.", "r_eff_kpc": "r_eff", "artefact": "artefact"}


# --------------------------------------------------------------------------------------------
# Rows, features, targets
# --------------------------------------------------------------------------------------------

def _check_targets(arrays, probe: settings_lib.ProbeSettings) -> None:
    missing = [c for c in (*probe.regression_targets, *probe.classification_targets)
               if c not in arrays]
    if missing:
        names = sorted(k for k, v in arrays.items() if np.ndim(v) == 1)
        raise ConfigError(f"config fields probe.regression_targets/classification_targets name "
                          f"{missing}, which the embeddings file does not hold; its per-galaxy "
                          f"columns are {names}")


def labelled_rows(arrays, probe: settings_lib.ProbeSettings) -> np.ndarray:
    """Rows with properties and a finite value of at least one target."""
    _check_targets(arrays, probe)
    keep = np.zeros(len(arrays["has_props"]), bool)
    for column in (*probe.regression_targets, *probe.classification_targets):
        keep |= np.isfinite(np.asarray(arrays[column], np.float64))
    return np.flatnonzero(keep & np.asarray(arrays["has_props"], bool))


def target_groups(arrays, probe: settings_lib.ProbeSettings, rows: np.ndarray
                  ) -> list[tuple[settings_lib.ProbeSettings, np.ndarray]]:
    """The targets grouped by which of `rows` have them: [(probe with that group's targets,
    boolean mask over rows)], largest group first. A real catalogue may have redshift and
    log M* for more galaxies than metallicity or age (two catalogues joined): each target is
    scored on every row that has it, not only on the rows that have every target."""
    masks: dict[bytes, list[str]] = {}
    for column in (*probe.regression_targets, *probe.classification_targets):
        finite = np.isfinite(np.asarray(arrays[column], np.float64)[rows])
        masks.setdefault(finite.tobytes(), []).append(column)
    groups = []
    for columns in masks.values():
        mask = np.isfinite(np.asarray(arrays[columns[0]], np.float64)[rows])
        groups.append((dataclasses.replace(
            probe, regression_targets=tuple(c for c in probe.regression_targets if c in columns),
            classification_targets=tuple(c for c in probe.classification_targets
                                         if c in columns)), mask))
    return sorted(groups, key=lambda g: -int(g[1].sum()))


def feature_sets(arrays, probe: settings_lib.ProbeSettings, fit_rows, query_rows, seed
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (fit features, query features)} of every feature set the file allows; PCA is
    fitted on the fit rows only."""
    unknown = sorted(set(probe.feature_sets) - set(FEATURE_SETS))
    if unknown:
        raise ConfigError(f"config field probe.feature_sets names {unknown}; expected some of "
                          f"{list(FEATURE_SETS)}")
    out = {}
    for name in probe.feature_sets:
        source = FEATURE_SETS[name][1]
        if source == "photometry":
            if not probe.photometry_columns or not all(c in arrays for c in
                                                       probe.photometry_columns):
                continue
            x = np.stack([np.asarray(arrays[c], np.float64) for c in probe.photometry_columns], 1)
            out[name] = (x[fit_rows], x[query_rows])
        elif source.startswith("pca:"):
            column = source[4:]
            if column in arrays:
                # As eval_knn's baseline; at most half the fit rows (a tiny run's last
                # components would be noise).
                out[name] = knn.pca_reduce(np.asarray(arrays[column][fit_rows], np.float32),
                                           np.asarray(arrays[column][query_rows], np.float32),
                                           min(knn.PCA_COMPONENTS, len(fit_rows) // 2), seed)
        elif source in arrays:
            out[name] = (np.asarray(arrays[source][fit_rows]),
                         np.asarray(arrays[source][query_rows]))
    return out


def _mlp_config(probe: settings_lib.ProbeSettings) -> probe_methods.MLPConfig:
    return probe_methods.MLPConfig(hidden=tuple(probe.mlp_hidden), dropout=probe.mlp_dropout,
                            learning_rate=probe.mlp_learning_rate,
                            batch_size=probe.mlp_batch_size, max_epochs=probe.mlp_max_epochs,
                            patience=probe.mlp_patience)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def _entry(features, method, target, metric, values, fraction, n_labelled, modality=None
           ) -> dict[str, Any]:
    values = [float(v) for v in values]
    finite = [v for v in values if np.isfinite(v)]  # NaN: undefined for that seed (AUC)
    return {"features": features, "modality": modality or FEATURE_SETS[features][0],
            "method": method, "target": target,
            "metric": metric, "fraction": fraction, "n_labelled": int(n_labelled),
            "mean": float(np.mean(finite)) if finite else float("nan"),
            "std": float(np.std(finite)) if finite else float("nan"), "values": values}


def _class_count(arrays, probe) -> dict[str, int]:
    return {c: int(np.nanmax(np.asarray(arrays[c], np.float64))) + 1
            for c in probe.classification_targets}


def probe_features(name, fit_x, query_x, y_fit, y_query, labels_fit, labels_query, n_classes,
                   probe: settings_lib.ProbeSettings, knn_neighbors: int, fractions) -> list:
    """Every score of one feature set: kNN (both), ridge and MLP at each fraction x seed.

    y_fit (N, T) regression targets; labels_* {column: int labels}; n_classes {column: K}."""
    targets = list(probe.regression_targets)
    entries = []
    for method, fn in (("knn16", probe_methods.knn_paper), ("knn64_std", probe_methods.knn_v2)):
        k = knn_neighbors if method == "knn16" else probe.knn_v2_neighbors
        for t, target in enumerate(targets):
            pred = fn(fit_x, y_fit[:, t], query_x, k)
            entries.append(_entry(name, method, target, "r2", [probe_methods.r2(y_query[:, t], pred)],
                                  1.0, len(fit_x)))
        for column, lab in labels_fit.items():
            scores = probe_methods.knn_classify(fit_x, lab, query_x, n_classes[column], k,
                                         standardised=method == "knn64_std")
            for metric, value in probe_methods.classification_scores(labels_query[column],
                                                              scores).items():
                entries.append(_entry(name, method, column, metric, [value], 1.0, len(fit_x)))
    cfg = _mlp_config(probe)
    for fraction in fractions:
        per = {}  # (method, target, metric) -> [value per seed]
        n_lab = 0
        for seed in probe.seeds:
            rows = probe_methods.few_shot_rows(len(fit_x), fraction, seed)
            n_lab = len(rows)
            x, yv = fit_x[rows], y_fit[rows]
            if targets:  # a group may hold only classification targets
                ridge, _ = probe_methods.ridge_probe(x, yv, query_x, probe.ridge_alphas,
                                                     probe.val_fraction, seed)
                mlp = probe_methods.mlp_probe(x, yv, query_x, cfg, probe.val_fraction, seed,
                                              pad_to=len(fit_x))
            for t, target in enumerate(targets):
                per.setdefault(("ridge", target, "r2"), []).append(
                    probe_methods.r2(y_query[:, t], ridge[:, t]))
                per.setdefault(("mlp", target, "r2"), []).append(
                    probe_methods.r2(y_query[:, t], mlp[:, t]))
            for column, lab in labels_fit.items():
                k = n_classes[column]
                for method, scores in (
                        ("ridge", probe_methods.ridge_classify(x, lab[rows], query_x, k,
                                                        probe.ridge_alphas, probe.val_fraction,
                                                        seed)),
                        ("mlp", probe_methods.mlp_classify(x, lab[rows], query_x, k, cfg,
                                                    probe.val_fraction, seed,
                                                    pad_to=len(fit_x)))):
                    for metric, value in probe_methods.classification_scores(
                            labels_query[column], scores, seen=lab[rows]).items():
                        per.setdefault((method, column, metric), []).append(value)
        for (method, target, metric), values in per.items():
            entries.append(_entry(name, method, target, metric, values, fraction, n_lab))
    return entries


def supervised_inputs(modality, arrays, rows, data, split, probe):
    """The supervised network's inputs for `rows` of the embeddings table."""
    if modality == "photometry":
        return np.stack([np.asarray(arrays[c], np.float32)[rows]
                         for c in probe.photometry_columns], axis=1)
    records = pipeline.PreprocessedRecords(data, split)
    index = np.asarray(arrays["index"])[rows]
    out = [records.batch(index[i:i + 256])[modality] for i in range(0, len(index), 256)]
    return np.concatenate(out).astype(np.float32)


def supervised_bounds(arrays, fit_rows, query_rows, y_fit, y_query, probe, run, data, split,
                      workdir, seed, log=print) -> tuple[list, dict]:
    """R^2 of each supervised bound on the held-out rows, and each one's training summary."""
    from astroclip_jax.training import supervised

    entries, summaries = [], {}
    tr, va = probe_methods.validation_split(len(fit_rows), probe.val_fraction, seed)
    mean, std = y_fit[tr].mean(axis=0), np.where(y_fit[tr].std(axis=0) > 0,
                                                 y_fit[tr].std(axis=0), 1.0)
    ys = (y_fit - mean) / std
    for modality in probe.supervised:
        if modality == "photometry" and not (probe.photometry_columns and all(
                c in arrays for c in probe.photometry_columns)):
            log(f"probe: no photometry columns {probe.photometry_columns}: no photometry bound")
            continue
        t0 = time.time()
        x_fit = supervised_inputs(modality, arrays, fit_rows, data, split, probe)
        x_query = supervised_inputs(modality, arrays, query_rows, data, split, probe)
        if modality == "photometry":  # magnitudes ~18: standardised by the training rows
            _, x_fit, x_query = (a.astype(np.float32) for a in probe_methods.standardise(
                x_fit[tr], x_fit, x_query))
        rows = supervised.SupervisedData(x_fit[tr], ys[tr].astype(np.float32), x_fit[va],
                               ys[va].astype(np.float32))
        key = supervised.key_of(modality, rows, probe, seed)
        folder = os.path.join(workdir, SUPERVISED_DIR, f"{modality}-{key}")
        pred, summary = supervised.train_and_predict(modality, rows, x_query, run, folder, seed)
        pred = pred * std + mean
        summary.update(seconds=round(time.time() - t0, 1), directory=folder)
        summaries[modality] = summary
        for t, target in enumerate(probe.regression_targets):
            entries.append(_entry(SUPERVISED_INPUTS[modality], "supervised", target, "r2",
                                  [probe_methods.r2(y_query[:, t], pred[:, t])], 1.0, len(fit_rows),
                                  modality=modality))
        log(f"probe: supervised {modality} bound trained in {summary['seconds']} s "
            f"(best epoch {summary['best_epoch']})")
    return entries, summaries


def evaluate(arrays, probe: settings_lib.ProbeSettings, eval_settings: settings_lib.EvalSettings,
             supervised=None, log=print) -> dict[str, Any]:
    """Every score (`entries`), the split and the timings; `supervised(probe, fit_rows,
    query_rows, y_fit, y_query) -> (entries, summaries)` adds the supervised bounds.

    One seeded split of the labelled rows into fit and held-out rows (as eval_knn's); each
    group of targets (`target_groups`) is scored on the rows of that split that have it."""
    rows = labelled_rows(arrays, probe)
    if len(rows) < 2 * max(eval_settings.knn_neighbors, 8):
        raise DataError(f"probe: only {len(rows)} galaxies have a target of "
                        f"{list(probe.regression_targets + probe.classification_targets)}")
    fit_pos, query_pos = knn.holdout_split(len(rows), eval_settings.knn_holdout,
                                           eval_settings.knn_holdout_fraction, eval_settings.seed)
    fit_rows, query_rows = rows[fit_pos], rows[query_pos]
    timings, entries, summaries, groups = {}, [], {}, []
    for group, mask in target_groups(arrays, probe, rows):
        g_fit, g_query = fit_rows[mask[fit_pos]], query_rows[mask[query_pos]]
        targets = [*group.regression_targets, *group.classification_targets]
        if (len(g_fit) + len(g_query) < 2 * max(eval_settings.knn_neighbors, 8)
                or len(g_query) == 0):  # as for all rows, above
            log(f"probe: only {len(g_fit)} fit and {len(g_query)} held-out galaxies have "
                f"{targets}: not scored")
            continue
        groups.append({"targets": targets, "n_fit": len(g_fit), "n_query": len(g_query)})
        y = np.stack([np.asarray(arrays[c], np.float64) for c in group.regression_targets],
                     axis=1) if group.regression_targets else np.zeros((len(arrays["index"]), 0))
        labels = {c: np.asarray(arrays[c]).astype(np.int64)
                  for c in group.classification_targets}
        n_classes = _class_count(arrays, group)
        sets = feature_sets(arrays, group, g_fit, g_query, eval_settings.seed)
        for name, (fit_x, query_x) in tqdm(sets.items(), desc="probe", unit="feature set"):
            t0 = time.time()
            fractions = group.fractions if name in group.curve_features else (1.0,)
            entries += probe_features(
                name, fit_x, query_x, y[g_fit], y[g_query],
                {c: v[g_fit] for c, v in labels.items()},
                {c: v[g_query] for c, v in labels.items()}, n_classes, group,
                eval_settings.knn_neighbors, fractions)
            timings[name] = round(timings.get(name, 0.0) + time.time() - t0, 1)
        if supervised is not None and group.supervised and group.regression_targets:
            t0 = time.time()
            more, done = supervised(group, g_fit, g_query, y[g_fit], y[g_query])
            entries += more
            summaries.update({k if len(groups) == 1 else f"{k}:{'+'.join(targets)}": v
                              for k, v in done.items()})
            timings["supervised"] = round(timings.get("supervised", 0.0) + time.time() - t0, 1)
    return {"entries": entries, "n_labelled_fit": len(fit_rows), "n_query": len(query_rows),
            "target_groups": groups, "fit_rows": fit_rows, "query_rows": query_rows,
            "timings_s": timings, "supervised": summaries}


# --------------------------------------------------------------------------------------------
# Table and figure
# --------------------------------------------------------------------------------------------

def _method_label(e) -> str:
    method = {"knn16": "kNN-16 (paper)", "knn64_std": "kNN-64 std (v2)", "ridge": "ridge",
              "mlp": "MLP", "supervised": "supervised"}[e["method"]]
    if e["method"] in ("ridge", "mlp"):
        method += f" @{100 * e['fraction']:g}%"
    return method


def table_columns(probe) -> list[tuple[str, str]]:
    """(target, metric) columns: R^2 of each regression target, accuracy and AUC of classes."""
    return ([(t, "r2") for t in probe.regression_targets]
            + [(c, m) for c in probe.classification_targets for m in ("accuracy", "roc_auc")])


def format_table(entries, probe) -> str:
    """Rows: modality x features x method; columns: targets (mean +- std over seeds)."""
    columns = table_columns(probe)
    cells, order = {}, []
    for e in entries:
        row = (e["modality"], e["features"], _method_label(e))
        if row not in cells:
            cells[row], _ = {}, order.append(row)
        cells[row][(e["target"], e["metric"])] = e
    heads = [LABELS.get(t, t)[:9] + {"r2": "", "accuracy": " acc", "roc_auc": " AUC"}[m]
             for t, m in columns]
    width = 15
    lines = ["Probe scores on held-out rows (R^2; classification: accuracy / ROC AUC); "
             "mean +- std over seeds",
             f"{'modality':<11}{'features':<26}{'method':<17}"
             + "".join(f"{h:>{width}}" for h in heads)]
    for row in order:
        vals = []
        for col in columns:
            e = cells[row].get(col)
            if e is None:
                vals.append(f"{'-':>{width}}")
            elif len(e["values"]) > 1:
                vals.append(f"{e['mean']:>8.3f}+-{e['std']:.3f}".rjust(width))
            else:
                vals.append(f"{e['mean']:>{width}.3f}")
        lines.append(f"{row[0]:<11}{row[1]:<26}{row[2]:<17}" + "".join(vals))
    return "\n".join(lines)


def plot_few_shot(entries, probe):
    """One panel per (target, metric): probe score vs labelled fraction for the feature sets
    with curves (MLP solid, ridge dashed, error bars = std over seeds), supervised bounds as
    horizontal lines, AstroCLIP v2's kNN as a marker at 100 %."""
    import matplotlib.pyplot as plt

    columns = [(t, m) for t, m in table_columns(probe) if m != "accuracy"]
    ncol = min(3, len(columns))
    nrow = -(-len(columns) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 3.9 * nrow), squeeze=False)
    curve_sets = [f for f in probe.curve_features if f in FEATURE_SETS]
    colors = {f: f"C{i}" for i, f in enumerate(curve_sets)}
    for ax, (target, metric) in zip(axes.flat, columns):
        mine = [e for e in entries if e["target"] == target and e["metric"] == metric]
        for features in curve_sets:
            for method, ls in (("mlp", "-"), ("ridge", "--")):
                pts = sorted((e["n_labelled"], e["mean"], e["std"]) for e in mine
                             if e["features"] == features and e["method"] == method)
                if pts:
                    n, mean, std = map(np.asarray, zip(*pts))
                    ax.errorbar(n, mean, yerr=std, fmt="o" + ls, ms=3, capsize=2, lw=1.2,
                                color=colors[features],
                                label=f"{features} {method}" if target == columns[0][0] else None)
            knn64 = [e for e in mine if e["features"] == features and e["method"] == "knn64_std"]
            for e in knn64:
                ax.plot(e["n_labelled"], e["mean"], "x", ms=7, color=colors[features])
        for e in (e for e in mine if e["method"] == "supervised"):
            # The colour of the modality's own curve (the embedding; the magnitudes).
            ax.axhline(e["mean"], color=colors.get(e["modality"], "k"), ls=":", lw=1.8,
                       label=f"supervised {e['modality']}" if target == columns[0][0] else None)
        ax.set_xscale("log")
        ax.set_xlabel("labelled training rows")
        ax.set_ylabel("ROC AUC" if metric == "roc_auc" else "R$^2$ (held-out rows)")
        ax.set_title(LABELS.get(target, target))
        low = min([e["mean"] for e in mine] + [0.0])
        ax.set_ylim(max(low, -0.5) - 0.05, 1.02)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.025 * (len(labels) // 4)))
    fig.suptitle("Few-shot probes (MLP solid, ridge dashed, x: kNN-64 std) and supervised "
                 "bounds (dotted)", fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Mode
# --------------------------------------------------------------------------------------------

def morphology_split(arrays, eval_settings: settings_lib.EvalSettings
                     ) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit rows, held-out rows) of the galaxies with Galaxy Zoo answers to the first question,
    split as `evaluate` splits (one seeded split: a galaxy with properties and votes is held out
    in both or in neither, when both sets of rows are the same)."""
    from astroclip_jax.data import galaxy_zoo  # pylint: disable=import-outside-toplevel

    root = galaxy_zoo.schema()[0].name
    rows = np.flatnonzero(np.nan_to_num(np.asarray(
        arrays[galaxy_zoo.total_column(root)], np.float64)) > 0)
    if len(rows) < 2 * max(eval_settings.knn_neighbors, 8):
        return None
    fit_pos, query_pos = knn.holdout_split(len(rows), eval_settings.knn_holdout,
                                           eval_settings.knn_holdout_fraction, eval_settings.seed)
    return rows[fit_pos], rows[query_pos]


def morphology_scores(inputs: runner.EvalInputs, log=print) -> dict[str, Any] | None:
    """The Galaxy Zoo questions (`evaluation/morphology.py`) on `morphology.feature_sets`, and
    the supervised image network when `probe.supervised` names "image"; None (with a line)
    when the table has no votes or the config turns it off."""
    from astroclip_jax.data import galaxy_zoo  # pylint: disable=import-outside-toplevel
    from astroclip_jax.evaluation import morphology  # pylint: disable=import-outside-toplevel

    morph, probe, arrays = inputs.run.morphology, inputs.run.probe, inputs.arrays
    if morph is None or not morph.enabled:
        return None
    if not galaxy_zoo.has_votes(arrays, morph.labels):
        log(f"probe: no Galaxy Zoo {morph.labels} columns in the embeddings table: no "
            f"morphology scores (morphology.enabled=False silences this)")
        return None
    split = morphology_split(arrays, inputs.settings)
    if split is None:
        log("probe: too few galaxies with Galaxy Zoo votes: no morphology scores")
        return None
    fit_rows, query_rows = split
    sets = feature_sets(arrays, dataclasses.replace(probe, feature_sets=morph.feature_sets),
                        fit_rows, query_rows, inputs.settings.seed)
    images = None
    if "image" in probe.supervised:
        images = tuple(supervised_inputs("image", arrays, rows, inputs.data,
                                         inputs.meta["split"], probe)
                       for rows in (fit_rows, query_rows))
    out = morphology.evaluate_morphology(arrays, fit_rows, query_rows, sets, morph,
                                         inputs.settings.seed, images=images, probe=probe)
    out["n_fit"], out["n_query"] = len(fit_rows), len(query_rows)
    return out


def posterior_scores(inputs: runner.EvalInputs, fit_rows, query_rows, log=print
                     ) -> dict[str, Any] | None:
    """The flow ensembles (`evaluation/posterior.py`) of `posterior.feature_sets` for the
    regression targets, on the probe's split; None when the config turns them off."""
    from astroclip_jax.evaluation import posterior  # pylint: disable=import-outside-toplevel

    post, probe = inputs.run.posterior, inputs.run.probe
    if post is None or not post.enabled or not probe.regression_targets:
        return None
    sets = feature_sets(inputs.arrays, dataclasses.replace(probe, feature_sets=post.feature_sets),
                        fit_rows, query_rows, inputs.settings.seed)
    return posterior.evaluate_posteriors(inputs.arrays, fit_rows, query_rows, sets,
                                         tuple(probe.regression_targets), post,
                                         inputs.settings.seed, log=log)


def report(inputs: runner.EvalInputs) -> runner.EvalResult:
    """``--mode=probe``: score, print the tables, write results.json and the figures."""
    probe, arrays = inputs.run.probe, inputs.arrays
    t0 = time.time()

    def supervised(group, fit_rows, query_rows, y_fit, y_query):
        return supervised_bounds(arrays, fit_rows, query_rows, y_fit, y_query, group, inputs.run,
                                 inputs.data, inputs.meta["split"],
                                 os.path.abspath(inputs.workdir), inputs.settings.seed)

    result = evaluate(arrays, probe, inputs.settings, supervised)
    table = format_table(result["entries"], probe)
    lines = [table]
    figures = {"few_shot.png": plot_few_shot(result["entries"], probe)}
    extra = {}
    t1 = time.time()
    post = posterior_scores(inputs, result["fit_rows"], result["query_rows"])
    if post is not None:
        from astroclip_jax.evaluation import posterior  # pylint: disable=import-outside-toplevel
        result["timings_s"]["posterior"] = round(time.time() - t1, 1)
        figures.update(post.pop("figures"))
        extra["posterior"] = post
        lines.append(posterior.format_table(post["entries"]))
    t1 = time.time()
    morph = morphology_scores(inputs)
    if morph is not None:
        from astroclip_jax.evaluation import morphology  # pylint: disable=import-outside-toplevel
        result["timings_s"]["morphology"] = round(time.time() - t1, 1)
        figures.update(morph.pop("figures"))
        extra["morphology"] = morph
        lines.append(morphology.format_table(morph["entries"]))
    result["timings_s"]["total"] = round(time.time() - t0, 1)
    report = {**{k: v for k, v in result.items() if k not in ("fit_rows", "query_rows")},
              **extra, "table": "\n\n".join(lines), "probe": dataclasses.asdict(probe),
              "knn_neighbors": inputs.settings.knn_neighbors,
              "supervised_seed": inputs.settings.seed,
              "held_out_targetids": np.asarray(arrays["targetid"])[result["query_rows"]]}
    timing = ", ".join(f"{k} {v} s" for k, v in result["timings_s"].items())
    return runner.EvalResult(report=report, figures=figures,
                             lines=[*lines, f"probe timings: {timing}"])
