"""Galaxy Zoo DECaLS morphology from frozen features, as AstroCLIP scores it (pure functions).

AstroCLIP (`downstream_tasks/morphology_classification/`): for each of the ten GZD-5 questions,
an MLP (three hidden layers, dropout 0.2, ReLU, softmax) on a frozen embedding is trained on
the question's vote fractions with cross-entropy (Adam 1e-3, batch 256, 25 epochs, rows drawn
with replacement weighted by their top vote fraction), the epoch of the lowest loss on a 10 %
validation slice of the training rows kept; it is scored on held-out galaxies with more than 34
answers to the question by the accuracy and the support-weighted F1 of the discretised
predictions (`discretise`: the arg-max answer of the prediction against the arg-max of the
vote fractions, ties kept as several answers, scored as scikit-learn scores indicator
matrices).

Here (`MorphologySettings`):
- fit rows of a question: the caller's fit rows with at least `min_votes` answers to it (the
  fractions of fewer votes are noise, and of none undefined); upstream cuts only on
  smooth-or-featured >= 3 and trains on every row of a question, dropping NaN labels;
- scored rows: the caller's held-out rows with at least `min_answers` (35) answers;
- the loss is the cross-entropy of softmax(logits) with the fractions; upstream applies
  torch's CrossEntropyLoss to the softmax output (a second softmax), and its "best" state is a
  reference to the live weights (so it keeps the last epoch): here the best epoch is kept;
- features are scaled by the fit rows when `standardise` (upstream feeds raw embeddings).
A question with no fit or no scored rows is left out (`skipped` says why).

Beside the probes, the supervised bound (not in upstream, which quotes Zoobot's published
scores): the image tower's architecture of `training/supervised.py` trained from scratch on the
same fit rows' cutouts, one output per answer, all ten questions at once (the sum over
questions of each one's cross-entropy on its rows with enough votes), scored like the probes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from astroclip_jax import settings as settings_lib
from astroclip_jax.data import galaxy_zoo
from astroclip_jax.errors import DataError
from astroclip_jax.evaluation import probe_methods
from astroclip_jax.evaluation.feature_sets import modality_of

METHOD = "mlp_morphology"
STEPS_PER_CALL = 16  # at most this many train steps per compiled scan


# ------------------------------------------------------------------------------- rows and labels

def question_rows(total_votes: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                  min_votes: int) -> np.ndarray:
    """The entries of `rows` whose question has at least `min_votes` answers and finite labels."""
    rows = np.asarray(rows, np.int64)
    ok = (np.nan_to_num(total_votes[rows]) >= min_votes) & np.all(np.isfinite(labels[rows]), 1)
    return rows[ok]


# ------------------------------------------------------------------------------- scores

def discretise(p: np.ndarray) -> np.ndarray:
    """(N, K) 0/1: the answers at each row's maximum (ties: all of them), as upstream."""
    p = np.asarray(p, np.float64)
    return (p == p.max(axis=1, keepdims=True)).astype(np.int64)


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Rows whose discretised answers match exactly (indicator-matrix subset accuracy)."""
    return float(np.mean(np.all(np.asarray(y_true) == np.asarray(y_pred), axis=1)))


def f1_weighted(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of each answer column, averaged with weights = the answer's true count (0 where a
    column has no true or predicted row, and 0 if no row is true anywhere)."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    tp = np.sum(t & p, axis=0)
    fp = np.sum(~t & p, axis=0)
    fn = np.sum(t & ~p, axis=0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    support = tp + fn
    return float(np.sum(f1 * support) / support.sum()) if support.sum() > 0 else 0.0


def scores(fractions: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """{"accuracy", "f1"} of predicted answer probabilities against vote fractions."""
    t, p = discretise(fractions), discretise(predicted)
    return {"accuracy": accuracy(t, p), "f1": f1_weighted(t, p)}


# ------------------------------------------------------------------------------- the MLP

def _loss(module, params, x, y, w, rng=None):
    """Weighted mean soft-label cross-entropy of softmax(logits) against the fractions."""
    if rng is None:
        logits = module.apply(params, x, train=False)
    else:
        logits = module.apply(params, x, train=True, rngs={"dropout": rng})
    per_row = optax.softmax_cross_entropy(logits, y)
    return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


@functools.partial(jax.jit, static_argnames=("module", "tx"))
def _steps(module, tx, params, opt_state, x, y, order, weights, keys):
    """Adam steps, one per batch of `order`, as one compiled scan (`probe_methods.adam_scan`)."""
    return probe_methods.adam_scan(
        lambda q, rows, wb, rng: _loss(module, q, x[rows], y[rows], wb, rng),
        tx, params, opt_state, order, weights, keys)


@functools.partial(jax.jit, static_argnames=("module",))
def _eval_loss(module, params, x, y, w):
    return _loss(module, params, x, y, w)


@functools.partial(jax.jit, static_argnames=("module",))
def _probabilities(module, params, x):
    return jax.nn.softmax(module.apply(params, x, train=False), axis=-1)


def train_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_query: np.ndarray,
                  settings: settings_lib.MorphologySettings, seed: int,
                  pad_to: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Train the MLP on (x_fit, fractions y_fit (N, K)) with the best epoch chosen on a
    validation slice of the fit rows; (query answer probabilities (n, K), summary).

    `pad_to`: rows the arrays are padded to (weight 0), so that questions with different row
    counts share one compiled program per answer count."""
    x_fit, x_query = np.asarray(x_fit, np.float64), np.asarray(x_query, np.float64)
    y_fit = np.asarray(y_fit, np.float64)
    if settings.standardise:
        x_fit, x_query = probe_methods.standardise(x_fit, x_query)
    tr, va = probe_methods.validation_split(len(x_fit), settings.val_fraction, seed)
    n_tr, k = len(tr), y_fit.shape[1]
    rows = max(pad_to or 0, len(x_fit))
    x_dev = jnp.asarray(_pad(x_fit[tr], rows), jnp.float32)
    y_dev = jnp.asarray(_pad(y_fit[tr], rows), jnp.float32)
    xv = jnp.asarray(_pad(x_fit[va], rows), jnp.float32)
    yv = jnp.asarray(_pad(y_fit[va], rows), jnp.float32)
    wv = jnp.asarray(np.arange(rows) < len(va), jnp.float32)
    # probe_methods' MLP: (Dense, ReLU, dropout) per hidden width -> Dense(K) logits, softmax
    # outside (dropout after the ReLU equals before it: it only zeroes or scales by 1/keep)
    module = probe_methods.ProbeMLP(tuple(settings.hidden), k, settings.dropout)
    key = jax.random.PRNGKey(seed)
    params = module.init(jax.random.fold_in(key, 0), x_dev[:1], train=False)
    tx = probe_methods.adam(settings.learning_rate)  # one object per rate (static arg)
    opt_state = tx.init(params)
    batch = settings.batch_size
    steps = -(-rows // batch)  # enough steps for `rows` rows, in calls of `per_call` steps
    per_call = min(STEPS_PER_CALL, steps)
    calls = -(-steps // per_call)
    slots = calls * per_call * batch
    weights = (np.arange(slots) < n_tr).astype(np.float32).reshape(calls, per_call, batch)
    # Upstream's WeightedRandomSampler: n draws with replacement, p ~ the top vote fraction.
    draw_p = y_fit[tr].max(axis=1)
    draw_p = draw_p / draw_p.sum() if draw_p.sum() > 0 else None
    best, best_params, best_epoch, curve = np.inf, params, -1, []
    for epoch in range(settings.epochs):
        rng = np.random.default_rng([seed, 5, epoch])
        order = (rng.choice(n_tr, n_tr, replace=True, p=draw_p) if settings.weighted_sampling
                 else rng.permutation(n_tr))
        order = np.concatenate([order, np.zeros(slots - n_tr, np.int64)]).reshape(
            calls, per_call, batch)
        keys = jax.random.split(jax.random.fold_in(key, 1 + epoch), calls * per_call
                                ).reshape(calls, per_call, -1)
        for c in range(calls):
            params, opt_state = _steps(module, tx, params, opt_state, x_dev, y_dev,
                                       jnp.asarray(order[c]), jnp.asarray(weights[c]), keys[c])
        loss = float(_eval_loss(module, params, xv, yv, wv))
        curve.append(loss)
        if loss < best:
            best, best_params, best_epoch = loss, params, epoch
    pred = np.concatenate([np.asarray(_probabilities(module, best_params, jnp.asarray(
        _pad(x_query[i:i + rows], rows), jnp.float32)))[:len(x_query[i:i + rows])]
        for i in range(0, len(x_query), rows)]) if len(x_query) else np.zeros((0, k))
    return pred.astype(np.float64), {"best_epoch": best_epoch, "val_loss": curve,
                                     "n_train": n_tr, "n_val": len(va)}


# ------------------------------------------------------------------------------- supervised bound

SUPERVISED_FEATURES = "images_resnet"  # as probe.SUPERVISED_INPUTS["image"]


def answer_slices() -> list[tuple[str, slice]]:
    """(question, its columns) in the network's output: the answers of all ten, in order."""
    out, start = [], 0
    for q in galaxy_zoo.schema():
        out.append((q.name, slice(start, start + len(q.answers))))
        start += len(q.answers)
    return out


def question_sums(logits, y, w):
    """Per question (Q,): the weighted sum over rows of the cross-entropy of softmax(the
    question's logits) with its fractions, and the rows' summed weights. logits, y (B, answers
    of all questions); w (B, Q): 0 where the row is padding or has too few votes."""
    ce = jnp.stack([optax.softmax_cross_entropy(logits[:, cols], y[:, cols])
                    for _, cols in answer_slices()], axis=1)
    return jnp.sum(ce * w, axis=0), jnp.sum(w, axis=0)


_question_sums = jax.jit(question_sums)


def multi_question_loss(sums, weights):
    """The sum over questions of each one's weighted mean cross-entropy."""
    return jnp.sum(sums / jnp.maximum(weights, 1.0))


def supervised_image_bound(fit_images: np.ndarray, y_fit: np.ndarray, w_fit: np.ndarray,
                           query_images: np.ndarray, probe: settings_lib.ProbeSettings,
                           val_fraction: float, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The image tower's architecture (`training/supervised.py`'s network, size
    `probe.supervised_image_size`) from scratch with one output per answer, trained on all ten
    questions at once by `multi_question_loss` (Adam `probe.supervised_learning_rate`, batch
    `probe.supervised_batch_size`, `probe.supervised_epochs` epochs, the best by the loss on a
    validation slice of the fit rows). y_fit (N, answers) fractions (NaN allowed where w is 0),
    w_fit (N, questions) 1 where the row's question counts. Returns the query rows' answer
    probabilities (n, answers; softmax per question) and a summary."""
    from astroclip_jax.training import supervised  # the network (training precedes evaluation)

    n_out = sum(len(q.answers) for q in galaxy_zoo.schema())
    module = supervised.network("image", probe, n_out)
    y_fit = np.nan_to_num(np.asarray(y_fit, np.float32))
    w_fit = np.asarray(w_fit, np.float32)
    tr, va = probe_methods.validation_split(len(fit_images), val_fraction, seed)
    batch = int(min(probe.supervised_batch_size, len(tr)))
    key = jax.random.PRNGKey(seed)
    variables = jax.jit(module.init)(jax.random.fold_in(key, 0),
                                     jnp.asarray(fit_images[:1], jnp.float32))
    params = variables["params"]
    fixed = {k: v for k, v in variables.items() if k != "params"}  # BatchNorm statistics
    tx = optax.adam(probe.supervised_learning_rate)
    opt_state = tx.init(params)

    def sums(p, x, y, w):
        return question_sums(module.apply({"params": p, **fixed}, x), y, w)

    @jax.jit
    def step(p, s, x, y, w):
        grads = jax.grad(lambda q: multi_question_loss(*sums(q, x, y, w)))(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    # One compiled forward pass serves validation and prediction (a ResNet compiles slowly).
    forward = jax.jit(lambda p, x: module.apply({"params": p, **fixed}, x))

    def batches(rows):
        for i in range(0, len(rows), batch):
            idx = rows[i:i + batch]
            pad = batch - len(idx)
            w = np.concatenate([w_fit[idx], np.zeros((pad, w_fit.shape[1]), np.float32)])
            idx = np.concatenate([idx, np.full(pad, idx[0])])  # padding rows weigh nothing
            yield (jnp.asarray(fit_images[idx], jnp.float32), jnp.asarray(y_fit[idx]),
                   jnp.asarray(w))

    best, best_params, best_epoch, curve = np.inf, params, -1, []
    for epoch in range(probe.supervised_epochs):
        order = tr[np.random.default_rng([seed, 6, epoch]).permutation(len(tr))]
        for x, y, w in batches(order):
            params, opt_state = step(params, opt_state, x, y, w)
        # The loss of the whole validation slice (its sums over all batches).
        parts = [_question_sums(forward(params, x), y, w) for x, y, w in batches(va)]
        val = float(multi_question_loss(sum(p[0] for p in parts), sum(p[1] for p in parts)))
        curve.append(val)
        if val < best:
            best, best_params, best_epoch = val, params, epoch

    def probabilities(p, x):
        logits = forward(p, x)
        return jnp.concatenate([jax.nn.softmax(logits[:, cols], axis=-1)
                                for _, cols in answer_slices()], axis=1)

    pred = [np.asarray(probabilities(best_params, jnp.asarray(
        _pad(query_images[i:i + batch], batch), jnp.float32)))[:len(query_images[i:i + batch])]
        for i in range(0, len(query_images), batch)]
    pred = np.concatenate(pred) if pred else np.zeros((0, n_out))
    return pred.astype(np.float64), {"best_epoch": best_epoch, "val_loss": curve,
                                     "n_train": len(tr), "n_val": len(va),
                                     "size": probe.supervised_image_size}


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + a.shape[1:], a.dtype)
    out[:len(a)] = a
    return out


# ------------------------------------------------------------------------------- entry point

def _entry(features, modality, target, metric, value, n_labelled) -> dict[str, Any]:
    return {"features": features, "modality": modality, "method": METHOD, "target": target,
            "metric": metric, "fraction": 1.0, "n_labelled": int(n_labelled),
            "mean": float(value), "std": 0.0, "values": [float(value)]}


def evaluate_morphology(arrays: dict[str, np.ndarray], fit_rows, query_rows,
                        feature_sets: dict[str, tuple[np.ndarray, np.ndarray]],
                        settings: settings_lib.MorphologySettings, seed: int, *,
                        images: tuple[np.ndarray, np.ndarray] | None = None,
                        probe: settings_lib.ProbeSettings | None = None) -> dict[str, Any]:
    """Accuracy and F1 of every question x feature set on the held-out rows.

    `arrays`: per-galaxy columns with the published Galaxy Zoo names (`<q>_total-votes`,
    `<q>_<a>_fraction` or `_debiased`, `settings.labels`); `fit_rows`, `query_rows`: rows of
    `arrays`; `feature_sets`: {name: (features of fit_rows, features of query_rows)}. With
    `images` (the model-input cutouts of fit_rows, of query_rows) and `probe` (its supervised_*
    sizes), the supervised image bound is trained on the same rows (`supervised_image_bound`).
    Returns {"entries": [...] (probe's entry shape, method "mlp_morphology" or
    "supervised_morphology", target the question, metric "accuracy" or "f1"), "figures":
    {"morphology.png": figure}, "questions": {question: rows used}, "skipped": {question:
    why}, "training": {features: {question: summary}}}."""
    fit_rows, query_rows = np.asarray(fit_rows, np.int64), np.asarray(query_rows, np.int64)
    inputs = dict(feature_sets)
    if images is not None:
        if probe is None:
            raise ValueError("the supervised image bound needs the probe settings")
        inputs[SUPERVISED_FEATURES] = images
    for name, (fx, qx) in inputs.items():
        if len(fx) != len(fit_rows) or len(qx) != len(query_rows):
            raise DataError(f"morphology: feature set {name!r} has {len(fx)} fit and {len(qx)} "
                            f"query rows; expected {len(fit_rows)} and {len(query_rows)}")
    entries, questions, skipped, training = [], {}, {}, {}
    y_all, w_all, query_masks = [], [], {}
    for q in galaxy_zoo.schema():
        y, total = galaxy_zoo.labels(arrays, q.name, settings.labels)
        y_all.append(y[fit_rows])
        fit_ok = np.isin(fit_rows, question_rows(total, y, fit_rows, settings.min_votes))
        query_ok = np.isin(query_rows, question_rows(total, y, query_rows, settings.min_answers))
        w_all.append(fit_ok)
        if fit_ok.sum() < 2 or not query_ok.any():
            skipped[q.name] = (f"{int(fit_ok.sum())} fit rows with >= {settings.min_votes} "
                               f"votes, {int(query_ok.sum())} held-out rows with >= "
                               f"{settings.min_answers}")
            continue
        query_masks[q.name] = query_ok
        questions[q.name] = {"n_fit": int(fit_ok.sum()), "n_query": int(query_ok.sum())}
        y_query = y[query_rows[query_ok]]
        for name, (fx, qx) in feature_sets.items():
            pred, summary = train_predict(np.asarray(fx)[fit_ok], y[fit_rows[fit_ok]],
                                          np.asarray(qx)[query_ok], settings, seed,
                                          pad_to=len(fit_rows))
            training.setdefault(name, {})[q.name] = summary
            for metric, value in scores(y_query, pred).items():
                entries.append(_entry(name, modality_of(name), q.name, metric, value,
                                      fit_ok.sum()))
    if images is not None and query_masks:
        pred, summary = supervised_image_bound(
            images[0], np.concatenate(y_all, axis=1), np.stack(w_all, axis=1), images[1],
            probe, settings.val_fraction, seed)
        training[SUPERVISED_FEATURES] = summary
        for q, cols in answer_slices():
            if q not in query_masks:
                continue
            mask = query_masks[q]
            y, _ = galaxy_zoo.labels(arrays, q, settings.labels)
            for metric, value in scores(y[query_rows[mask]], pred[mask][:, cols]).items():
                entries.append({**_entry(SUPERVISED_FEATURES, "image", q, metric, value,
                                         questions[q]["n_fit"]),
                                "method": "supervised_morphology"})
    return {"entries": entries, "figures": {"morphology.png": plot_morphology(entries)},
            "questions": questions, "skipped": skipped, "training": training}


def format_table(entries: list[dict[str, Any]]) -> str:
    """Rows: feature set x method; columns: the questions scored; cells accuracy / F1."""
    questions = [q.name for q in galaxy_zoo.schema()
                 if any(e["target"] == q.name for e in entries)]
    cells: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    for e in entries:
        cells.setdefault((e["features"], e["method"]), {})[(e["target"], e["metric"])] = e["mean"]
    width = 13
    lines = ["Galaxy Zoo DECaLS morphology on held-out rows (accuracy / weighted F1)",
             f"{'features':<26}{'method':<22}" + "".join(f"{q[:width - 1]:>{width}}"
                                                        for q in questions)]
    for (features, method), got in cells.items():
        vals = [f"{got[(q, 'accuracy')]:.2f}/{got[(q, 'f1')]:.2f}" if (q, "f1") in got else "-"
                for q in questions]
        lines.append(f"{features:<26}{method:<22}" + "".join(f"{v:>{width}}" for v in vals))
    return "\n".join(lines)


def plot_morphology(entries: list[dict[str, Any]]):
    """Accuracy (top) and F1 (bottom) per question, one bar per feature set."""
    import matplotlib.pyplot as plt

    questions = [q.name for q in galaxy_zoo.schema()
                 if any(e["target"] == q.name for e in entries)]
    sets = list(dict.fromkeys(e["features"] for e in entries))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(questions) + 2), 6.5),
                             sharex=True)
    width = 0.8 / max(1, len(sets))
    for ax, metric in zip(axes, ("accuracy", "f1")):
        for j, name in enumerate(sets):
            value = {e["target"]: e["mean"] for e in entries
                     if e["features"] == name and e["metric"] == metric}
            ax.bar(np.arange(len(questions)) + (j - (len(sets) - 1) / 2) * width,
                   [value.get(q, np.nan) for q in questions], width, label=name, color=f"C{j}")
        ax.set_ylabel({"accuracy": "accuracy", "f1": "F1 (weighted)"}[metric])
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(np.arange(len(questions)), questions, rotation=30, ha="right")
    if sets:
        axes[0].legend(fontsize=8, ncol=min(4, len(sets)), loc="lower left")
    axes[0].set_title("Galaxy Zoo DECaLS morphology: MLP on frozen features, held-out rows "
                      "with enough answers")
    fig.tight_layout()
    return fig
