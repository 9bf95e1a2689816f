"""Probes of frozen features: pure functions of (fit rows, their labels, query rows).

    knn_paper    KNeighborsRegressor(16, distance) on the raw features (the paper, eval_knn)
    knn_v2       the same with 64 neighbours on standardised features (AstroCLIP v2)
    ridge        closed-form ridge on standardised features and targets, its penalty chosen on
                 a validation slice of the labelled rows, then refitted on all of them
    mlp          D -> 64 -> 64 -> out, ReLU + dropout 0.1, Adam 1e-3, batch 64, early stopping
                 on the validation slice (the epoch with the lowest validation loss is kept)

Regression targets are standardised with the labelled rows' mean and std and predictions are
returned in the target's units. Classification (the synthetic artefact flag) uses the same
probes on one-hot labels (kNN: distance-weighted class votes; ridge: one-hot scores; MLP:
softmax cross-entropy) and is scored by accuracy and the macro one-vs-rest ROC AUC.

Several regression targets are probed by one call: the MLPs of all targets are trained side by
side (parameters stacked on a leading axis, `jax.vmap`), each with its own loss, Adam moments
and early stopping, so the result equals separate trainings while compiling one program.
Nothing here sees the held-out rows' labels: the caller passes only the query features.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from astroclip_jax.data import pipeline
from astroclip_jax.evaluation import knn


# ------------------------------------------------------------------------------- rows

def few_shot_rows(n: int, fraction: float, seed: int, minimum: int = 4) -> np.ndarray:
    """A seeded subset of ``range(n)``: ``max(minimum, round(fraction * n))`` rows, sorted."""
    size = int(min(n, max(minimum, round(fraction * n))))
    return np.sort(np.random.default_rng([seed, 1]).permutation(n)[:size])


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) positions of ``n`` labelled rows; at least one of each when n >= 2."""
    n_val = int(min(max(1, round(fraction * n)), n - 1))
    order = np.random.default_rng([seed, 2]).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def standardise(fit_x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Arrays scaled by the mean and std of ``fit_x``. Columns (about) constant on the fit rows
    (std <= 1e-6 of the largest: rounding noise, e.g. PCA components beyond the fit rows' rank)
    are only centred: dividing by their std would blow other rows up."""
    fit_x = np.asarray(fit_x, np.float64)
    mean, std = fit_x.mean(axis=0), fit_x.std(axis=0)
    std = np.where(std > 1e-6 * np.max(std, initial=0.0), std, 1.0)
    return [(np.asarray(x, np.float64) - mean) / std for x in (fit_x, *others)]


# ------------------------------------------------------------------------------- kNN

def knn_paper(fit_x, fit_y, query_x, n_neighbors: int = 16) -> np.ndarray:
    """The paper's zero-shot regressor (as `eval_knn`): distance-weighted, raw features."""
    return knn.knn_predict(fit_x, fit_y, query_x, n_neighbors)


def knn_v2(fit_x, fit_y, query_x, n_neighbors: int = 64) -> np.ndarray:
    """AstroCLIP v2's zero-shot regressor: 64 distance-weighted neighbours on features
    standardised by the fit rows."""
    fit_s, query_s = standardise(fit_x, query_x)
    return knn.knn_predict(fit_s, fit_y, query_s, n_neighbors)


def knn_classify(fit_x, fit_y, query_x, n_classes: int, n_neighbors: int,
                 standardised: bool) -> np.ndarray:
    """(n_query, n_classes) distance-weighted vote shares (absent classes get 0)."""
    if standardised:
        fit_x, query_x = standardise(fit_x, query_x)
    k = min(n_neighbors, len(fit_x))
    model = KNeighborsClassifier(n_neighbors=k, weights="distance").fit(fit_x, fit_y)
    out = np.zeros((len(query_x), n_classes))
    out[:, model.classes_.astype(int)] = model.predict_proba(query_x)
    return out


# ------------------------------------------------------------------------------- ridge

def ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(coef (D, T), intercept (T,)) minimising ||y - x w - b||^2 + alpha ||w||^2 (float64).

    The intercept is not penalised (centred data), as scikit-learn's `Ridge`."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    n, d = xc.shape
    if d <= n:  # (X'X + aI) w = X'y
        coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ yc)
    else:  # w = X' (XX' + aI)^-1 y: the same solution, an n x n system
        coef = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(n), yc)
    return coef, y_mean - x_mean @ coef


def ridge_predict(fit_x, fit_y, query_x, alpha: float) -> np.ndarray:
    """Ridge with penalty ``alpha`` fitted on (fit_x, fit_y), predictions for ``query_x``."""
    coef, intercept = ridge_solve(fit_x, fit_y, alpha)
    return np.asarray(query_x, np.float64) @ coef + intercept


def _mse_per_column(y, pred) -> np.ndarray:
    return np.mean((np.asarray(y, np.float64) - pred) ** 2, axis=0)


def ridge_probe(fit_x, fit_y, query_x, alphas: Sequence[float], val_fraction: float,
                seed: int) -> tuple[np.ndarray, list[float]]:
    """Ridge on standardised features and targets (``fit_y`` (N, T)); each target's penalty
    chosen by validation MSE on a slice of the fit rows, then refitted on all of them.

    Returns (predictions (n_query, T) in target units, chosen alphas per target)."""
    fit_y = np.asarray(fit_y, np.float64).reshape(len(fit_x), -1)
    fx, qx = standardise(fit_x, query_x)
    fy_s, = standardise(fit_y)
    y_mean, y_std = fit_y.mean(axis=0), np.where(fit_y.std(axis=0) > 0, fit_y.std(axis=0), 1)
    tr, va = validation_split(len(fx), val_fraction, seed)
    val_mse = np.stack([_mse_per_column(fy_s[va], ridge_predict(fx[tr], fy_s[tr], fx[va], a))
                        for a in alphas])  # (n_alphas, T)
    chosen = [float(alphas[i]) for i in np.argmin(val_mse, axis=0)]
    pred = np.stack([ridge_predict(fx, fy_s[:, t], qx, a) for t, a in enumerate(chosen)], axis=1)
    return pred * y_std + y_mean, chosen


# ------------------------------------------------------------------------------- MLP

@dataclasses.dataclass(frozen=True)
class MLPConfig:
    hidden: tuple[int, ...] = (64, 64)
    dropout: float = 0.1
    learning_rate: float = 1e-3
    batch_size: int = 64
    max_epochs: int = 50
    patience: int = 5  # epochs without a better validation loss before stopping


class ProbeMLP(nn.Module):
    """D -> hidden... -> out with ReLU and dropout after each hidden layer."""

    hidden: tuple[int, ...]
    out: int
    dropout: float

    @nn.compact
    def __call__(self, x, train: bool):
        for n in self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(nn.Dense(n)(x)))
        return nn.Dense(self.out)(x)


def _losses(logits, y, w, classify: bool):
    """Per-model mean loss over weighted rows: logits (M, B, K), y (M, B[, K]), w (B,)."""
    if classify:
        per_row = optax.softmax_cross_entropy_with_integer_labels(logits, y.astype(jnp.int32))
    else:
        per_row = jnp.square(logits[..., 0] - y)
    return jnp.sum(per_row * w, axis=-1) / jnp.maximum(jnp.sum(w), 1.0)


def _apply(module, p, x, rng=None):
    """(M, B, out) outputs of M stacked models; dropout on when an rng is given."""
    if rng is None:
        return jax.vmap(lambda q: module.apply(q, x, train=False))(p)
    keys = jax.random.split(rng, jax.tree.leaves(p)[0].shape[0])
    return jax.vmap(lambda q, r: module.apply(q, x, train=True, rngs={"dropout": r}))(p, keys)


STEPS_PER_CALL = 16  # train steps per compiled call (a scan); an epoch is a few calls


def adam_scan(batch_loss, tx: optax.GradientTransformation, params, opt_state, order, weights,
              keys):
    """Optimiser steps, one per batch of `order`, as one scan (the probes' and the morphology
    MLPs' training): `batch_loss(params, rows, row_weights, rng)` is a batch's loss. A step
    whose batch weighs nothing (padding past the epoch's end) changes nothing, not even Adam's
    moments, so every epoch length shares one program."""
    def step(carry, inputs):
        p, s = carry
        rows, wb, rng = inputs
        updates, s_new = tx.update(jax.grad(batch_loss)(p, rows, wb, rng), s, p)
        live = jnp.sum(wb) > 0
        keep = lambda new, old: jnp.where(live, new, old)  # noqa: E731
        return (jax.tree.map(keep, optax.apply_updates(p, updates), p),
                jax.tree.map(keep, s_new, s)), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), (order, weights, keys))
    return params, opt_state


@functools.partial(jax.jit, static_argnames=("module", "tx", "classify"))
def _steps(module, tx, classify, p, s, x, y, order, weights, keys):
    """STEPS_PER_CALL steps as one compiled scan (`adam_scan`). Every shape is fixed by the
    feature set (rows padded to its fit set), so all fractions and seeds share one program."""
    def batch_loss(q, rows, wb, rng):
        return jnp.sum(_losses(_apply(module, q, x[rows], rng), y[:, rows], wb, classify))

    return adam_scan(batch_loss, tx, p, s, order, weights, keys)


@functools.partial(jax.jit, static_argnames=("module", "classify"))
def _val_loss(module, classify, p, x, y, w):
    return _losses(_apply(module, p, x), y, w, classify)


@functools.partial(jax.jit, static_argnames=("module",))
def _predict(module, p, x):
    return _apply(module, p, x)


@functools.partial(jax.jit, static_argnames=("n_models", "module"))
def _init(module, n_models, key, x):
    return jax.vmap(lambda k: module.init(k, x, train=False))(jax.random.split(key, n_models))


@jax.jit
def _keep_better(better, new, old):
    return jax.tree.map(
        lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def train_mlps(x_train, y_train, x_val, y_val, out: int, cfg: MLPConfig, seed: int,
               classify: bool = False, pad_to: int | None = None):
    """Train M independent MLPs side by side; y (M, N) per model (float targets or int class
    labels), x shared. Returns a function features -> (M, n, out) of the early-stopped models.

    Each model has its own loss (the sum's gradient splits by model), Adam moments (Adam is
    elementwise) and early stopping (its parameters of its best validation epoch are kept).
    `pad_to`: rows the training and validation arrays are zero-padded to (weight 0), so calls
    with different row counts reuse one compiled program."""
    module = ProbeMLP(tuple(cfg.hidden), out, cfg.dropout)
    tx = adam(cfg.learning_rate)
    y_dtype = np.int32 if classify else np.float32
    n, n_val, n_models = len(x_train), len(x_val), np.shape(y_train)[0]
    rows = max(pad_to or 0, n, n_val)
    x_dev = jnp.asarray(pipeline.pad_rows(np.asarray(x_train, np.float32), rows))
    y_dev = jnp.asarray(pipeline.pad_rows(np.asarray(y_train, y_dtype).T, rows).T)
    xv = jnp.asarray(pipeline.pad_rows(np.asarray(x_val, np.float32), rows))
    yv = jnp.asarray(pipeline.pad_rows(np.asarray(y_val, y_dtype).T, rows).T)
    wv = jnp.asarray(np.arange(rows) < n_val, jnp.float32)
    key = jax.random.PRNGKey(seed)
    params = _init(module, n_models, jax.random.fold_in(key, 0), x_dev[:1])
    opt_state = tx.init(params)
    batch, k = cfg.batch_size, STEPS_PER_CALL
    steps = -(-n // batch)
    calls = -(-steps // k)
    slots = calls * k * batch
    weights = (np.arange(slots) < n).astype(np.float32).reshape(calls, k, batch)
    best = np.asarray(_val_loss(module, classify, params, xv, yv, wv))
    best_params, bad = params, np.zeros(n_models, int)
    for epoch in range(cfg.max_epochs):
        order = np.random.default_rng([seed, 3, epoch]).permutation(n)
        order = np.concatenate([order, np.zeros(slots - n, int)]).reshape(calls, k, batch)
        keys = jax.random.split(jax.random.fold_in(key, 1 + epoch), calls * k).reshape(
            calls, k, -1)
        for c in range(calls):
            params, opt_state = _steps(module, tx, classify, params, opt_state, x_dev, y_dev,
                                       order[c], weights[c], keys[c])
        loss = np.asarray(_val_loss(module, classify, params, xv, yv, wv))
        better = loss < best
        best = np.where(better, loss, best)
        bad = np.where(better, 0, bad + 1)
        best_params = _keep_better(jnp.asarray(better), params, best_params)
        if np.all(bad >= cfg.patience):
            break
    return lambda x: np.asarray(_predict(module, best_params, jnp.asarray(x, jnp.float32)),
                                np.float64)


@functools.lru_cache(maxsize=None)
def adam(learning_rate: float) -> optax.GradientTransformation:
    """One optimiser object per rate: it is a static (hashed) argument of the compiled epoch."""
    return optax.adam(learning_rate)


def mlp_probe(fit_x, fit_y, query_x, cfg: MLPConfig, val_fraction: float, seed: int,
              pad_to: int | None = None) -> np.ndarray:
    """Regression MLPs (one per column of ``fit_y`` (N, T)) on standardised features and
    targets, early-stopped on a validation slice of the fit rows; (n_query, T) in target units."""
    fit_y = np.asarray(fit_y, np.float64).reshape(len(fit_x), -1)
    fx, qx = standardise(fit_x, query_x)
    y_mean, y_std = fit_y.mean(axis=0), np.where(fit_y.std(axis=0) > 0, fit_y.std(axis=0), 1)
    ys = ((fit_y - y_mean) / y_std).T  # (T, N)
    tr, va = validation_split(len(fx), val_fraction, seed)
    predict = train_mlps(fx[tr], ys[:, tr], fx[va], ys[:, va], 1, cfg, seed, pad_to=pad_to)
    return predict(qx)[..., 0].T * y_std + y_mean


def mlp_classify(fit_x, fit_y, query_x, n_classes: int, cfg: MLPConfig, val_fraction: float,
                 seed: int, pad_to: int | None = None) -> np.ndarray:
    """(n_query, n_classes) softmax probabilities of an early-stopped MLP classifier."""
    fx, qx = standardise(fit_x, query_x)
    labels = np.asarray(fit_y, np.int64)[None]
    tr, va = validation_split(len(fx), val_fraction, seed)
    predict = train_mlps(fx[tr], labels[:, tr], fx[va], labels[:, va], n_classes, cfg, seed,
                         classify=True, pad_to=pad_to)
    return np.asarray(jax.nn.softmax(predict(qx)[0], axis=-1), np.float64)


def ridge_classify(fit_x, fit_y, query_x, n_classes: int, alphas: Sequence[float],
                   val_fraction: float, seed: int) -> np.ndarray:
    """(n_query, n_classes) ridge scores of one-hot labels (a ridge classifier)."""
    onehot = np.eye(n_classes)[np.asarray(fit_y, np.int64)]
    return ridge_probe(fit_x, onehot, query_x, alphas, val_fraction, seed)[0]


# ------------------------------------------------------------------------------- scores

def r2(y, pred) -> float:
    return float(r2_score(np.asarray(y, np.float64), np.asarray(pred, np.float64)))


def classification_scores(y, scores, seen=None) -> dict[str, float]:
    """Accuracy of the arg-max class and the macro one-vs-rest ROC AUC over the classes present
    in ``y`` (both sides of each one-vs-rest split must occur) and, when ``seen`` is given,
    among the training labels (a probe's score for a class it never saw means nothing, and one
    that saw a single class learnt no ranking); NaN if no class qualifies."""
    y = np.asarray(y, np.int64)
    seen = None if seen is None else set(np.asarray(seen).tolist())
    # A probe that saw one class only has never seen a negative: its one-vs-rest scores
    # rank nothing it learnt (the extrapolation of a saturated softmax), so no AUC.
    classes = [c for c in np.unique(y) if 0 < np.sum(y == c) < len(y)
               and (seen is None or (c in seen and len(seen) > 1))]
    aucs = [roc_auc_score(y == c, scores[:, c]) for c in classes]
    return {"accuracy": float(accuracy_score(y, np.argmax(scores, axis=1))),
            "roc_auc": float(np.mean(aucs)) if aucs else float("nan")}
