"""The AstroCLIP model: two frozen towers, two trainable heads, one embedding space.

    images  (N, H, W, 3) -> image tower    -> features (N, 2048) -> image head    -> (N, 128)
    spectra (N, L)       -> spectrum tower -> features (N, 256)  -> spectrum head -> (N, 128)

All parameters live in one dict

    {"image_tower": {"params", "batch_stats"}, "spectrum_tower": {"params"},
     "image_head": {"params"}, "spectrum_head": {"params"}[, "logit_scale": {"log_scale"}]}

split into a trainable and a frozen part by `partition.py`.

The model's methods are the one embedding function of the project: training (online and
cached), the feature cache, `--mode=embed` and the notebook `Embedder` all call them. Images
are centre-cropped on the device to the towers' input size (a no-op when the host or the
augmentation already cropped them).

The towers come from converted weight directories (`model.*.weights`) or, when none is
given, are randomly initialised at a named size (with a loud warning: a random tower is only
good for tests and the synthetic demo). The image tower is built without its MoCo head; that
head's weights (`fc_0`, `fc_2`) seed the image head when `model.image_head.init_from_tower`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from astroclip_jax import wavelength_grids
from astroclip_jax.data.preprocess import center_crop
from astroclip_jax.errors import ConfigError, DataError
from astroclip_jax.flat_tree import SEP as _SEP
from astroclip_jax.flat_tree import flatten, unflatten
from astroclip_jax.models import heads, towers
from astroclip_jax.settings import ModelSettings, TowerSettings

Params = dict[str, Any]
_MOCO_HEAD = ("fc_0", "fc_2")  # the image tower's MoCo v2 head layers
_SPENDER_MLP = re.compile(r"mlp_\d+")  # Spender's own MLP, replaced by the spectrum head


def l2_normalize(x: jax.Array, eps: float = 1e-3) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (torch ``F.normalize``, as upstream).

    Written as ``sqrt(max(sum x^2, eps^2))`` so the gradient stays finite at ``x = 0``
    (``jnp.linalg.norm`` has a NaN gradient there).
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


@dataclasses.dataclass(frozen=True)
class AstroCLIP:
    """The four Flax modules; all methods are pure functions of a params dict."""

    image_tower: nn.Module
    spectrum_tower: nn.Module
    image_head: heads.MLPHead
    spectrum_head: heads.MLPHead
    image_size: int  # side of the images the towers see
    logit_scale: float  # used unless params hold a learned one

    # ---------------------------------------------------------------- the frozen towers
    def image_features(self, params: Params, images: jax.Array) -> jax.Array:
        images = center_crop(images, self.image_size)
        return self.image_tower.apply(params["image_tower"], images)["features"]

    def spectrum_features(self, params: Params, spectra: jax.Array) -> jax.Array:
        return self.spectrum_tower.apply(params["spectrum_tower"], spectra,
                                         features_only=True)["features"]

    def tower_features(self, params: Params, images: jax.Array, spectra: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
        """The towers alone: (image features, spectrum features). Frozen work, cacheable."""
        return self.image_features(params, images), self.spectrum_features(params, spectra)

    # ---------------------------------------------------------------- the heads
    def image_embedding(self, params: Params, image_features: jax.Array) -> jax.Array:
        return l2_normalize(self.image_head.apply(params["image_head"], image_features))

    def spectrum_embedding(self, params: Params, spectrum_features: jax.Array) -> jax.Array:
        return l2_normalize(self.spectrum_head.apply(params["spectrum_head"], spectrum_features))

    def heads_from_features(self, params: Params, image_features: jax.Array,
                            spectrum_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The heads alone, on tower features: L2-normalised (image_emb, spectrum_emb)."""
        return (self.image_embedding(params, image_features),
                self.spectrum_embedding(params, spectrum_features))

    # ---------------------------------------------------------------- towers + heads
    def embed_images(self, params: Params, images: jax.Array) -> jax.Array:
        """(N, out) normalised image embeddings of preprocessed images."""
        return self.image_embedding(params, self.image_features(params, images))

    def embed_spectra(self, params: Params, spectra: jax.Array) -> jax.Array:
        """(N, out) normalised spectrum embeddings of preprocessed spectra."""
        return self.spectrum_embedding(params, self.spectrum_features(params, spectra))

    def embed(self, params: Params, images: jax.Array, spectra: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
        """Normalised (image_emb, spectrum_emb), each (N, out)."""
        return self.embed_images(params, images), self.embed_spectra(params, spectra)

    def scale(self, params: Params) -> jax.Array:
        """The logit scale: learned (exp of `logit_scale/log_scale`) or the fixed config value."""
        if "logit_scale" in params:
            return jnp.exp(params["logit_scale"]["log_scale"])
        return jnp.asarray(self.logit_scale, jnp.float32)


# ------------------------------------------------------------------------------- building

def _tower(kind: str, tower: TowerSettings, rng: jax.Array, example_shape: Sequence[int]
           ) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """(module config, variables, extras) from converted weights or a random init."""
    if tower.weights:
        _, variables, weights = towers.load_tower_module(tower.weights, kind=kind)
        logging.info("%s tower: converted weights from %s", kind, tower.weights)
        return dict(weights.config), variables, dict(weights.extras)
    logging.warning(
        "\n" + "!" * 78 + "\n!! %s tower: NO WEIGHTS GIVEN (model.*.weights is None) -> RANDOMLY "
        "INITIALISED %r tower.\n!! Fine for tests and the synthetic demo; meaningless for real "
        "science.\n" + "!" * 78, kind.upper(), tower.size)
    module_cfg = towers.tower_config(kind, tower.size)
    abstract = jax.eval_shape(towers.build_tower(kind, module_cfg).init, rng,
                              jnp.zeros(tuple(example_shape), jnp.float32))
    return module_cfg, random_tower_variables(abstract, rng), {}


# Flax's default initialisers, by leaf name (kernels: LeCun normal over the fan-in).
_CONSTANT_INIT = {"bias": 0.0, "scale": 1.0, "mean": 0.0, "var": 1.0,
                  "negative_slope": 0.25}  # PReLU's torch default


def random_tower_variables(abstract: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
    """Random tower variables drawn with NumPy from the shapes of `abstract`.

    Same distributions as the modules' own initialisers, but no compiled program (a random
    ResNet's jitted init costs tens of seconds of XLA compilation on a small CPU) and the same
    numbers on every platform (NumPy's PCG64), so a run with random towers is rebuilt exactly
    from its seed anywhere.
    """
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).tolist())
    flat = {}
    for name, leaf in sorted(flatten(abstract).items()):
        leaf_name = name.rsplit(_SEP, 1)[-1]
        if leaf_name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            # lecun_normal: truncated normal at +-2 std, rescaled to variance 1 / fan_in.
            x = gen.standard_normal(leaf.shape)
            while np.any(bad := np.abs(x) > 2.0):
                x[bad] = gen.standard_normal(int(bad.sum()))
            flat[name] = (x / 0.87962566103423978 / math.sqrt(fan_in)).astype(leaf.dtype)
        elif leaf_name in _CONSTANT_INIT:
            flat[name] = np.full(leaf.shape, _CONSTANT_INIT[leaf_name], leaf.dtype)
        else:
            raise ValueError(f"no random initialiser for tower variable {name!r}")
    return unflatten(flat)


def _check_grid(model: ModelSettings, extras: Mapping[str, np.ndarray]) -> None:
    """The spectra must be on the wavelength grid the Spender tower was trained on."""
    if "wave_obs" not in extras:
        return
    wave_obs = np.asarray(extras["wave_obs"], np.float64).ravel()
    data_wave = wavelength_grids.wave(model.grid)
    if wave_obs.shape != data_wave.shape or not np.allclose(wave_obs, data_wave, rtol=0, atol=1e-3):
        raise ConfigError(
            f"spectrum tower {model.spectrum_tower.weights} was trained on a grid of "
            f"{wave_obs.size} pixels [{wave_obs[0]:.2f}, {wave_obs[-1]:.2f}] A, but "
            f"data.grid={model.grid!r} has {data_wave.size} pixels "
            f"[{data_wave[0]:.2f}, {data_wave[-1]:.2f}] A: use the matching grid or weights")


def build(settings: ModelSettings, rng: jax.Array) -> tuple[AstroCLIP, Params]:
    """The model and its full params (towers loaded or random, heads initialised)."""
    k_img, k_spec, k_ihead, k_shead = jax.random.split(rng, 4)
    size, length = settings.image_size, settings.spectrum_length

    spec_cfg, spec_vars, spec_extras = _tower("spender", settings.spectrum_tower, k_spec, (1, length))
    if settings.spectrum_tower.weights:
        _check_grid(settings, spec_extras)  # before any expensive work
    img_cfg, img_vars, _ = _tower("resnet", settings.image_tower, k_img, (1, size, size, 3))

    # The frozen image tower stops at its pooled features; its MoCo head moves to the image head.
    img_vars = dict(img_vars)  # a shallow copy we may edit
    img_params = dict(img_vars["params"])
    moco_head = {name: img_params.pop(name) for name in _MOCO_HEAD if name in img_params}
    img_vars["params"] = img_params
    img_cfg = {**img_cfg, "head_hidden": None}
    spec_vars = {"params": {k: v for k, v in spec_vars["params"].items()
                            if not _SPENDER_MLP.fullmatch(k)}}

    model = AstroCLIP(
        image_tower=towers.build_tower("resnet", img_cfg),
        spectrum_tower=towers.build_tower("spender", spec_cfg),
        image_head=heads.MLPHead(hidden=tuple(settings.image_head.hidden), out=settings.image_head.out),
        spectrum_head=heads.MLPHead(hidden=tuple(settings.spectrum_head.hidden), out=settings.spectrum_head.out),
        image_size=size, logit_scale=settings.logit_scale,
    )
    params: Params = {"image_tower": img_vars, "spectrum_tower": spec_vars}
    # Strict check: the loaded (or edited) tower trees are exactly what the modules expect.
    _check_tree("image_tower", img_vars, jax.eval_shape(
        model.image_tower.init, k_img, jnp.zeros((1, size, size, 3))))
    _check_tree("spectrum_tower", spec_vars, jax.eval_shape(
        lambda k: model.spectrum_tower.init(k, jnp.zeros((1, length)), features_only=True), k_spec))

    img_feat, spec_feat = jax.eval_shape(
        model.tower_features, params, jnp.zeros((1, size, size, 3)), jnp.zeros((1, length)))
    params["image_head"] = jax.jit(model.image_head.init)(k_ihead, jnp.zeros(img_feat.shape))
    params["spectrum_head"] = jax.jit(model.spectrum_head.init)(k_shead,
                                                                jnp.zeros(spec_feat.shape))
    if settings.image_head.init_from_tower and settings.image_tower.weights:
        params["image_head"] = _moco_head_init(params["image_head"], moco_head)
    if settings.learn_logit_scale:
        params["logit_scale"] = {"log_scale": jnp.asarray(math.log(settings.logit_scale), jnp.float32)}
    return model, params


def _check_tree(name: str, got: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    got_flat, want_flat = flatten(got), flatten(want)
    missing, extra = sorted(set(want_flat) - set(got_flat)), sorted(set(got_flat) - set(want_flat))
    bad = [k for k in set(got_flat) & set(want_flat)
           if tuple(np.shape(got_flat[k])) != tuple(want_flat[k].shape)]
    if missing or extra or bad:
        raise DataError(f"{name}: variables do not match the module: missing {missing}, "
                         f"unexpected {extra}, wrong shape {sorted(bad)}")


def _moco_head_init(head_vars: Params, moco_head: Mapping[str, Any]) -> Params:
    """The image head's variables copied from the tower's MoCo head (same names and shapes)."""
    want = head_vars["params"]
    try:
        _check_tree("image_head", moco_head, want)
    except ValueError as e:
        raise ConfigError(f"model.image_head.init_from_tower: the image head does not have the "
                         f"shape of the tower's MoCo head ({e}); set image_head.hidden/out to the "
                         "MoCo sizes or init_from_tower=False") from None
    return {"params": jax.tree.map(jnp.asarray, dict(moco_head))}
