"""Spender's decoder and the whole autoencoder (spender 0.3, `spender.model`) in Flax.

    latent s (N, S) -> MLP S -> 64 -> 256 -> 1024 -> L_rest, each Linear then its activation
                    -> restframe model x(wave_rest)                               (N, L_rest)
                    -> redshift: grid wave_rest * (1 + z), linear interpolation onto wave_obs,
                       zero outside the redshifted range                           (N, L_obs)
                    -> LSF convolution when the instrument has one (flux-preserving)
    fidelity loss   = sum_batch sum_L 0.5 * w * valid * (y - y_hat)^2 / L_obs

The decoder's activation is `SpeculatorActivation` (Alsing et al. 2020; the last layer adds 1)
or, as `train_DESI.py` builds its hub models, LeakyReLU (slope 0.01) after every layer.
Variable names mirror the torch keys with "." -> "_": `mlp_0` (Linear), `mlp_1` (beta, gamma),
`mlp_3`, ..., so `converters/spender.py` maps `decoder.mlp.*` with a rename and a transpose.

The encoder is `models.spender.SpectrumEncoder`; `Autoencoder` holds both modules with the
instrument's grids and LSF, and its methods are pure functions of
`params = {"encoder": {"params": ...}, "decoder": {"params": ...}}`.

Under jit on CPU, XLA fuses the redshifted grid's product into the node differences and LLVM
contracts them into FMAs (unrounded nodes): a node spacing then differs from spender's by up to
one float32 ulp of the wavelength, so the jitted reconstruction differs from spender's by up to
~6e-5 relative next to sharp restframe features (op by op it agrees to 1e-5, as tested).

Precision: the observed grid is kept as a float32 pair (hi, lo = wave - hi), so the distance of
an observed pixel to its restframe node is computed to ~float64 accuracy as spender does (it
searches and subtracts in float64 on the DESI grid); plain float32 would shift the model by up
to 1e-3 of a pixel, a 1e-3 relative error on a rough restframe model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astroclip_jax import files
from astroclip_jax.errors import MissingInput
from astroclip_jax.flat_tree import SEP, flatten, unflatten
from astroclip_jax.models import spender, tower_weights
from astroclip_jax.models.astroclip import random_tower_variables

ACTIVATIONS = ("speculator", "leaky_relu")
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU default

# Decoder sizes: spender's own (64, 256, 1024) and small ones for the synthetic demo and tests.
DECODER_SIZES: dict[str, tuple[int, ...]] = {
    "spender": (64, 256, 1024), "small": (32, 128, 512), "test": (16, 32, 64)}

Params = dict[str, Any]


class SpeculatorActivation(nn.Module):
    """a(x) = [gamma + (1 - gamma) * sigmoid(beta * x)] * x (+ 1), per-feature beta and gamma."""

    features: int
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(1.0)  # torch.randn
        beta = self.param("beta", init, (self.features,), jnp.float32)
        gamma = self.param("gamma", init, (self.features,), jnp.float32)
        x = (gamma + (1 - gamma) * jax.nn.sigmoid(beta * x)) * x
        return x + 1 if self.plus_one else x


class SpectrumDecoder(nn.Module):
    """Latents (N, S) -> restframe spectra (N, n_rest): spender's decoder MLP."""

    n_rest: int
    hidden: Sequence[int] = DECODER_SIZES["spender"]
    activation: str = "speculator"

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(v) for v in self.hidden))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}; expected one of {ACTIVATIONS}")
        super().__post_init__()

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        x = jnp.asarray(s, jnp.float32)
        sizes = (*self.hidden, self.n_rest)
        for j, n in enumerate(sizes):
            x = nn.Dense(n, name=f"mlp_{3 * j}")(x)
            if self.activation == "speculator":
                x = SpeculatorActivation(n, plus_one=j == len(sizes) - 1, name=f"mlp_{3 * j + 1}")(x)
            else:
                x = jax.nn.leaky_relu(x, LEAKY_SLOPE)
        return x


# ------------------------------------------------------------------------ pure functions

def split_grid(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A wavelength grid as float32 (hi, lo) with hi + lo = wave to ~1e-14 relative."""
    wave = np.asarray(wave, np.float64)
    hi = wave.astype(np.float32)
    return hi, (wave - hi.astype(np.float64)).astype(np.float32)


def interp1d(x: jax.Array, y: jax.Array, xnew_hi: jax.Array, xnew_lo: jax.Array | None = None
             ) -> jax.Array:
    """Linear interpolation of rows y(x) (N, L) at xnew (M,) or (N, M), as
    `spender.util.interp1d`: left neighbour by searchsorted - 1, clamped to the first and last
    interval (so linear extrapolation outside x). x (L,) or (N, L). xnew = xnew_hi + xnew_lo
    (see `split_grid`)."""
    n = y.shape[0]
    x = jnp.broadcast_to(x, (n, x.shape[-1]))
    xnew_hi = jnp.broadcast_to(xnew_hi, (n, xnew_hi.shape[-1]))
    lo = jnp.zeros_like(xnew_hi) if xnew_lo is None else jnp.broadcast_to(xnew_lo, xnew_hi.shape)
    # First node >= xnew, exactly: a node equal to hi lies below hi + lo when lo > 0. The side
    # matters at a node, where the two intervals' slopes differ (spender searches in float64).
    first = jax.vmap(lambda row, q: jnp.searchsorted(row, q, side="left"))(x, xnew_hi)
    at_node = jnp.take_along_axis(x, jnp.minimum(first, x.shape[1] - 1), axis=1) == xnew_hi
    ind = first + (at_node & (lo > 0)) - 1
    ind = jnp.clip(ind, 0, x.shape[1] - 2)
    eps = jnp.finfo(y.dtype).eps
    slopes = (y[:, 1:] - y[:, :-1]) / (eps + x[:, 1:] - x[:, :-1])
    x0 = jnp.take_along_axis(x, ind, axis=1)
    dx = (xnew_hi - x0) + lo  # hi - x0 is exact for neighbours
    return jnp.take_along_axis(y, ind, axis=1) + jnp.take_along_axis(slopes, ind, axis=1) * dx


def _above(hi: jax.Array, lo: jax.Array, edge: jax.Array) -> jax.Array:
    """(hi + lo) > edge, exactly, for a float32 edge."""
    return (hi > edge) | ((hi == edge) & (lo > 0))


def _below(hi: jax.Array, lo: jax.Array, edge: jax.Array) -> jax.Array:
    """(hi + lo) < edge, exactly, for a float32 edge."""
    return (hi < edge) | ((hi == edge) & (lo < 0))


def lsf_convolve(spectra: jax.Array, weight: jax.Array) -> jax.Array:
    """spender's `LSF`: Conv1d(1, 1, K, padding="same", no bias) with `weight` (the module's
    own, already flipped kernel), divided by its sum. torch pads (K - 1) // 2 on the left."""
    k = weight.shape[0]
    left = (k - 1) // 2
    out = jax.lax.conv_general_dilated(
        spectra[:, None, :], weight[None, None, :], window_strides=(1,),
        padding=[(left, k - 1 - left)], dimension_numbers=("NCH", "OIH", "NCH"),
        precision=jax.lax.Precision.HIGHEST)
    return out[:, 0, :] / jnp.sum(weight)


def to_observed(restframe: jax.Array, wave_rest: jax.Array, wave_obs: tuple[jax.Array, jax.Array],
                z: jax.Array, lsf: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Restframe models (N, L_rest) at redshifts z (N,) -> (observed (N, L_obs), valid mask).

    spender's `SpectrumDecoder.transform`: grid wave_rest * (1 + z), interpolation onto
    wave_obs (no (1 + z) flux factor), zero where wave_obs is outside the redshifted range,
    then the LSF."""
    hi, lo = wave_obs
    factor = 1 + jnp.asarray(z, jnp.float32)[:, None]
    wave_z = wave_rest[None, :] * factor
    spectra = interp1d(wave_z, restframe, hi, lo)
    first, last = wave_rest[0] * factor, wave_rest[-1] * factor
    valid = _above(hi[None, :], lo[None, :], first) & _below(hi[None, :], lo[None, :], last)
    spectra = jnp.where(valid, spectra, 0.0)
    if lsf is not None:
        spectra = lsf_convolve(spectra, lsf)
    return spectra, valid


def fidelity_loss(y: jax.Array, w: jax.Array, y_hat: jax.Array, individual: bool = False
                  ) -> jax.Array:
    """spender's `_loss`: sum 0.5 w (y - y_hat)^2 / L per spectrum; summed over the batch."""
    per = jnp.sum(0.5 * w * jnp.square(y - y_hat), axis=1) / y.shape[1]
    return per if individual else jnp.sum(per)


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """Spender's `SpectrumAutoencoder`: encoder and decoder modules, grids and LSF."""

    encoder: spender.SpectrumEncoder
    decoder: SpectrumDecoder
    wave_rest: np.ndarray  # (L_rest,) float32, as `decoder.wave_rest`
    wave_obs: np.ndarray  # (L_obs,) the instrument grid, any float dtype
    lsf: np.ndarray | None = None  # the LSF module's weight (K,), or None

    def grids(self) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        hi, lo = split_grid(self.wave_obs)
        return jnp.asarray(self.wave_rest, jnp.float32), (jnp.asarray(hi), jnp.asarray(lo))

    def encode(self, params: Params, spectra: jax.Array, train: bool = False,
               rngs: Any = None) -> jax.Array:
        return self.encoder.apply(params["encoder"], spectra, train=train, rngs=rngs)["latent"]

    def decode(self, params: Params, latents: jax.Array) -> jax.Array:
        return self.decoder.apply(params["decoder"], latents)

    def forward(self, params: Params, spectra: jax.Array, z: jax.Array, latents=None
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(latents, restframe, reconstruction, valid), as spender's `_forward`."""
        s = self.encode(params, spectra) if latents is None else latents
        restframe = self.decode(params, s)
        wave_rest, wave_obs = self.grids()
        lsf = None if self.lsf is None else jnp.asarray(self.lsf, jnp.float32)
        recon, valid = to_observed(restframe, wave_rest, wave_obs, z, lsf)
        return s, restframe, recon, valid

    def loss(self, params: Params, spectra: jax.Array, weights: jax.Array, z: jax.Array,
             individual: bool = False) -> jax.Array:
        """The fidelity loss of `spender.BaseAutoencoder.loss` (weights zeroed where invalid)."""
        _, _, recon, valid = self.forward(params, spectra, z)
        return fidelity_loss(spectra, weights * valid, recon, individual)

    def init(self, rng: jax.Array) -> Params:
        """Random params drawn with NumPy from the modules' shapes (no compiled init: seconds
        saved on a small CPU; the same numbers on every platform). Kernels LeCun normal,
        biases 0, PReLU slopes 0.25, Speculator beta and gamma standard normal (torch.randn)."""
        k_enc, k_dec, k_act = jax.random.split(rng, 3)
        enc = jax.eval_shape(self.encoder.init, k_enc, jnp.zeros((1, len(self.wave_obs))))
        dec = jax.eval_shape(self.decoder.init, k_dec, jnp.zeros((1, self.encoder.n_latent)))
        gen = np.random.default_rng(np.asarray(jax.random.key_data(k_act)).tolist())
        flat = flatten(dec)
        activation = {k: v for k, v in flat.items() if k.rsplit(SEP, 1)[-1] in ("beta", "gamma")}
        rest = random_tower_variables(unflatten({k: v for k, v in flat.items()
                                                 if k not in activation}), k_dec)
        drawn = {k: gen.standard_normal(v.shape).astype(v.dtype)
                 for k, v in sorted(activation.items())}
        return {"encoder": random_tower_variables(enc, k_enc),
                "decoder": unflatten({**flatten(rest), **drawn})}


def restframe_grid(wave_obs: np.ndarray, z_max: float, bins: int | None = None) -> np.ndarray:
    """`train_DESI.py`'s restframe grid: linspace(wave_obs[0] / (1 + z_max), wave_obs[-1],
    bins) in float32. Default bins: the span over the mean observed pixel size (9780 on
    DESI for z_max 0.8: 2000-9824 A in 0.8 A pixels, as there)."""
    wave_obs = np.asarray(wave_obs, np.float64)
    lo, hi = wave_obs[0] / (1.0 + z_max), wave_obs[-1]
    if bins is None:
        bins = int(round((hi - lo) / np.mean(np.diff(wave_obs))))
    return np.linspace(lo, hi, bins).astype(np.float32)


# ------------------------------------------------------------------------ tower directories

DECODER_DIR = tower_weights.DECODER_DIR  # sub-directory of a spender tower holding the decoder
DECODER_KIND = "spender_decoder"


def save_autoencoder(out_dir: str, encoder: tuple[dict[str, Any], Params, dict[str, np.ndarray]],
                     decoder: tuple[dict[str, Any], Params, dict[str, np.ndarray]],
                     source: dict[str, Any], what: str = "output directory") -> str:
    """A spender tower directory with its decoder: the encoder (kind "spender"; extras such as
    wave_obs) and `decoder/` (extras wave_rest, and lsf where the instrument has one), each
    given as (config, variables, extras), in one atomic directory: a failure leaves neither.
    Only an earlier spender tower is replaced (`what`: the setting named if refused)."""
    with files.atomic_directory(out_dir, tower_weights.output_kind("spender"), what) as tmp:
        for sub, kind, (config, variables, extras) in (("", "spender", encoder),
                                                        (DECODER_DIR, DECODER_KIND, decoder)):
            tower_weights.save_tower(os.path.join(tmp, sub), kind, config, variables,
                                     extras=extras, source=source, overwrite=True)
    return os.path.abspath(out_dir)


def load_autoencoder(tower_dir: str) -> tuple[Autoencoder, Params]:
    """The whole autoencoder of a spender tower directory that has a decoder (converted from
    a hub file, or written by `--mode=pretrain_spender`) and its params."""
    enc = tower_weights.load_tower(tower_dir, kind="spender")
    dec_dir = os.path.join(tower_dir, DECODER_DIR)
    if not os.path.isdir(dec_dir):
        raise MissingInput(f"{tower_dir} holds only a Spender encoder (no {DECODER_DIR}/): "
                           "convert the full hub file to restore the autoencoder")
    dec = tower_weights.load_tower(dec_dir, kind=DECODER_KIND)
    if "wave_obs" not in enc.extras:
        raise MissingInput(f"{tower_dir}: no extra/wave_obs, the instrument grid the decoder needs")
    model = Autoencoder(
        encoder=spender.SpectrumEncoder(**enc.config),
        decoder=SpectrumDecoder(**dec.config),
        wave_rest=np.asarray(dec.extras["wave_rest"], np.float32),
        wave_obs=np.asarray(enc.extras["wave_obs"]),
        lsf=None if "lsf" not in dec.extras else np.asarray(dec.extras["lsf"], np.float32))
    params = jax.tree.map(jnp.asarray, {"encoder": enc.variables, "decoder": dec.variables})
    return model, params
