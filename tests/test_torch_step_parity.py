"""Our jitted online train step against the paper's PyTorch step, from the same weights.

The reference is `benchmarks/torch_baseline.py` (torchvision ResNet + MoCo v2 head, the
`spender` package's encoder, upstream's CLIPLoss, torch.optim.Adam), run by the same
`benchmarks/train_step.parity` that the train-step benchmark checks before it times anything:
test-size torch towers with random, non-trivial weights (BatchNorm statistics from a
calibration pass, random PReLU slopes and biases) are written as upstream files (a MoCo v2
Lightning checkpoint, a Spender hub file) and read back through our converters; JAX's initial
heads are copied into torch. Then both take PARITY_STEPS Adam steps (lr 5e-4) on the same
batches with augmentation off (centre crop only, a no-op at this size), so both are
deterministic and must agree step by step.

Tolerances, from float32 (unit roundoff u = 2**-24 = 6e-8):
  * loss, rtol 1e-5 (~170 u). Both sides round every multiply-add to float32 but sum in a
    different order (XLA's kernels vs ATen/oneDNN), through about 20 layers of dots, so the
    embeddings, and the loss (~ln 16 = 2.8), differ by a few ulps per layer. Anything that is
    a real difference is orders larger: one Adam step changes the loss of its batch by 3.5 %
    here (2.919 -> 2.817), a transposed kernel, a shifted crop or a wrong scale far more.
  * final head parameters, atol 1e-2 * lr = 5e-6, wherever float32 determines Adam's step.
    Both sides start from the same float32 values, and Adam moves a parameter by
    lr * m_hat / (sqrt(v_hat) + eps). Where the gradient's RMS so far, sqrt(v_hat), is at
    least 100 eps (= 1e-6) on both sides, the first step lr * g / (|g| + eps) is within 1 % of
    +-lr whatever float32 does to g, and later steps are smooth in the gradients' ratios;
    where it is exactly 0 on both sides (a hidden unit that is off for every galaxy of the
    batch) the step is exactly 0 on both; rounding parameter + update adds < 1 ulp (< 6e-8
    for |param| < 1) per step. 1 % of one step's update still catches a missing, extra or
    mis-scaled step (wrong lr, bias correction, betas or eps).
    Elsewhere ("unresolved": at some step sqrt(v_hat) < 100 eps on a side, and not exactly 0
    on both) float32 does not determine the step: a gradient that is exactly 0 on one side
    and a few 1e-9 of rounding residue on the other makes g / (|g| + eps) anything in [0, 1),
    so the steps may differ by up to ~lr. Those few entries are held to Adam's own bound,
    |m_hat| / sqrt(v_hat) <= 1.004 for these betas and t <= 3, i.e. at most 2 x 1.004 lr of
    difference per step, and must stay rare (< 0.1 % of the entries).
The trained entries must also have moved by far more than the tolerance (else comparing the
final parameters would say nothing).
"""

import time

import numpy as np
import pytest

from benchmarks import train_step
from configs import spender as spender_config

SIZE = "test"
BATCH = 16
LOSS_RTOL = 1e-5
HEAD_ATOL = 1e-2 * train_step.LEARNING_RATE
_TRAIN = spender_config.get_config("").train
ADAM_EPS, ADAM_B2 = _TRAIN.adam_eps, _TRAIN.adam_b2  # what both sides use (torch's defaults)
RESOLVED_GRAD = 100 * ADAM_EPS
ADAM_STEP_BOUND = 1.004  # max |m_hat| / sqrt(v_hat) for betas (0.9, 0.999), t <= 3


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("torch_step_parity"))
    t0 = time.perf_counter()
    train_step.shared_weights(SIZE, workdir)
    batches = [train_step.make_inputs(SIZE, BATCH, seed=1 + i)
               for i in range(train_step.PARITY_STEPS)]
    out = train_step.parity(SIZE, workdir, batches, torch_device="cpu")
    out["seconds"] = time.perf_counter() - t0
    print(f"\nparity (size {SIZE}, batch {BATCH}, {train_step.PARITY_STEPS} steps): "
          f"{out['seconds']:.1f} s")
    return out


def test_losses_agree_step_by_step(parity):
    jax_losses, torch_losses = np.array(parity["jax_losses"]), np.array(parity["torch_losses"])
    assert len(jax_losses) == train_step.PARITY_STEPS
    rel = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
    print(f"losses jax {jax_losses.tolist()} torch {torch_losses.tolist()}, max rel diff "
          f"{rel.max():.2e}")
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=LOSS_RTOL, atol=0)
    assert abs(torch_losses[0] - np.log(BATCH)) < 0.5  # InfoNCE of untrained heads: ~ln B


def _rms_gradients(nu, name, t):
    """sqrt(v_hat) after step t (1-based): Adam's bias-corrected RMS of the gradients so far."""
    return np.sqrt(nu[t - 1][name] / (1.0 - ADAM_B2 ** t))


def _masks(parity, name):
    """(unresolved, trained) entries of head tensor `name` (see the module docstring)."""
    unresolved = np.zeros(parity["torch_heads"][name].shape, bool)
    for t in range(1, train_step.PARITY_STEPS + 1):
        rms = [_rms_gradients(parity[side], name, t) for side in ("jax_nu", "torch_nu")]
        unresolved |= (np.minimum(*rms) < RESOLVED_GRAD) & (np.maximum(*rms) > 0)
    trained = parity["torch_nu"][-1][name] > 0
    return unresolved, trained


def test_final_heads_agree(parity):
    jax_heads, torch_heads, initial = (parity[k] for k in ("jax_heads", "torch_heads",
                                                          "initial_heads"))
    assert set(jax_heads) == set(torch_heads) == set(initial)
    lr, steps = train_step.LEARNING_RATE, train_step.PARITY_STEPS
    worst = {"resolved": 0.0, "all": 0.0}
    moves, n_unresolved, n_total = [], 0, 0
    for name in sorted(torch_heads):
        diff = np.abs(jax_heads[name] - torch_heads[name])
        unresolved, trained = _masks(parity, name)
        n_unresolved, n_total = n_unresolved + int(unresolved.sum()), n_total + unresolved.size
        worst["resolved"] = max(worst["resolved"], float(diff[~unresolved].max()))
        worst["all"] = max(worst["all"], float(diff.max()))
        np.testing.assert_array_less(diff[~unresolved], HEAD_ATOL, err_msg=name)
        np.testing.assert_array_less(diff, 2 * ADAM_STEP_BOUND * lr * steps, err_msg=name)
        moves.append(float(np.median(np.abs(torch_heads[name] - initial[name])[
            trained & ~unresolved])))
    print(f"final heads: max |jax - torch| {worst['resolved']:.2e} on resolved entries (tol "
          f"{HEAD_ATOL:.0e}), {worst['all']:.2e} on all; {n_unresolved} of {n_total} entries "
          f"unresolved; median move of the trained entries >= {min(moves):.2e}")
    assert n_unresolved < 1e-3 * n_total
    assert min(moves) > 20 * HEAD_ATOL  # every tensor trained: its entries moved ~steps x lr
