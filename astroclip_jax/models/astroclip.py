"""The AstroCLIP model: two frozen towers, two trainable heads, one embedding space.

    images  (N, H, W, 3) -> image tower    -> features (N, 2048) -> image head    -> (N, 128)
    spectra (N, L)       -> spectrum tower -> features (N, 256)  -> spectrum head -> (N, 128)

That is the paper's reproduction (ResNet50 + Spender, MLP heads). The released AstroCLIP runs
the same way with token towers and cross-attention heads (`models/towers.py` KINDS):

    images  -> AstroDINO ViT -> tokens (N, 144, 1024) -> cross-attention head -> (N, 1024)
    spectra -> SpecFormer    -> tokens (N, 778, 768)  -> cross-attention head -> (N, 1024)

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
from astroclip_jax.models import heads, tower_weights, towers
from astroclip_jax.settings import ModelSettings, TowerSettings

Params = dict[str, Any]
HEADS_KIND = "astroclip_heads"  # converters/astroclip.py: both heads in one directory


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
    image_head: nn.Module  # heads.MLPHead | heads.CrossAttentionHead
    spectrum_head: nn.Module
    image_size: int  # side of the images the towers see
    logit_scale: float  # used unless params hold a learned one
    image_kind: str = "resnet"  # towers.KINDS
    spectrum_kind: str = "spender"

    # ---------------------------------------------------------------- the frozen towers
    def image_features(self, params: Params, images: jax.Array) -> jax.Array:
        images = center_crop(images, self.image_size)
        return towers.features(self.image_kind, self.image_tower, params["image_tower"], images)

    def spectrum_features(self, params: Params, spectra: jax.Array) -> jax.Array:
        return towers.features(self.spectrum_kind, self.spectrum_tower, params["spectrum_tower"],
                               spectra)

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
        config = towers.with_compute_dtype(kind, weights.config, tower.dtype, tower.weights)
        return config, variables, dict(weights.extras)
    logging.warning(
        "\n" + "!" * 78 + "\n!! %s tower: NO WEIGHTS GIVEN (model.*.weights is None) -> RANDOMLY "
        "INITIALISED %r tower.\n!! Fine for tests and the synthetic demo; meaningless for real "
        "science.\n" + "!" * 78, kind.upper(), tower.size)
    module_cfg = towers.tower_config(kind, tower.size)
    abstract = jax.eval_shape(towers.build_tower(kind, module_cfg).init, rng,
                              jnp.zeros(tuple(example_shape), jnp.float32))
    module_cfg = towers.with_compute_dtype(kind, module_cfg, tower.dtype, f"{kind} {tower.size}")
    return module_cfg, random_tower_variables(abstract, rng), {}


# Flax's default initialisers, by leaf name (kernels: LeCun normal over the fan-in).
_CONSTANT_INIT = {"bias": 0.0, "scale": 1.0, "mean": 0.0, "var": 1.0,
                  "negative_slope": 0.25,  # PReLU's torch default
                  "mask_token": 0.0, "gamma": 1.0}  # ViT: unused iBOT token, LayerScale
# Normal(0, std) leaves: token and position tables (DINOv2, SpecFormer), a learned query.
_NORMAL_INIT = {"cls_token": 0.02, "pos_embed": 0.02, "embedding": 0.02, "query": 1.0}


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
        elif leaf_name in _NORMAL_INIT:
            flat[name] = (gen.standard_normal(leaf.shape) * _NORMAL_INIT[leaf_name]).astype(
                leaf.dtype)
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
    """The model and its full params (towers loaded or random, heads initialised, or loaded
    from `heads_weights`)."""
    k_img, k_spec, k_ihead, k_shead = jax.random.split(rng, 4)
    size, length = settings.image_size, settings.spectrum_length
    img_kind, spec_kind = settings.image_tower.kind, settings.spectrum_tower.kind
    img_shape = towers.example_input(img_kind, size, length)
    spec_shape = towers.example_input(spec_kind, size, length)

    spec_cfg, spec_vars, spec_extras = _tower(spec_kind, settings.spectrum_tower, k_spec,
                                              spec_shape)
    if settings.spectrum_tower.weights:
        _check_grid(settings, spec_extras)  # before any expensive work
    img_cfg, img_vars, _ = _tower(img_kind, settings.image_tower, k_img, img_shape)

    # A frozen tower stops at its features: its own head is not run. The image tower's MoCo
    # head moves to the image head (`init_from_tower`).
    img_vars, own_image_head = _without_own_head(img_kind, img_vars)
    spec_vars, _ = _without_own_head(spec_kind, spec_vars)
    if img_kind == "resnet":
        img_cfg = {**img_cfg, "head_hidden": None}

    image_tower = towers.build_tower(img_kind, img_cfg)
    spectrum_tower = towers.build_tower(spec_kind, spec_cfg)
    img_feat, spec_feat = jax.eval_shape(
        lambda iv, sv: (towers.features(img_kind, image_tower, iv, jnp.zeros(img_shape)),
                        towers.features(spec_kind, spectrum_tower, sv, jnp.zeros(spec_shape))),
        img_vars, spec_vars)
    model = AstroCLIP(
        image_tower=image_tower, spectrum_tower=spectrum_tower,
        image_head=heads.build_head(settings.image_head, img_feat.shape[-1]),
        spectrum_head=heads.build_head(settings.spectrum_head, spec_feat.shape[-1]),
        image_size=size, logit_scale=settings.logit_scale, image_kind=img_kind,
        spectrum_kind=spec_kind)
    params: Params = {"image_tower": img_vars, "spectrum_tower": spec_vars}
    # Strict check: the loaded (or edited) tower trees are exactly what the modules expect.
    _check_tree("image_tower", img_vars, _without_own_head(img_kind, jax.eval_shape(
        lambda k: model.image_tower.init(k, jnp.zeros(img_shape), **_feature_args(img_kind)),
        k_img))[0])
    _check_tree("spectrum_tower", spec_vars, _without_own_head(spec_kind, jax.eval_shape(
        lambda k: model.spectrum_tower.init(k, jnp.zeros(spec_shape),
                                            **_feature_args(spec_kind)), k_spec))[0])

    params["image_head"] = jax.jit(model.image_head.init)(k_ihead, jnp.zeros(img_feat.shape))
    params["spectrum_head"] = jax.jit(model.spectrum_head.init)(k_shead,
                                                                jnp.zeros(spec_feat.shape))
    if settings.heads_weights:
        params.update(_converted_heads(settings.heads_weights, params))
    elif settings.image_head.init_from_tower and settings.image_tower.weights:
        params["image_head"] = _moco_head_init(params["image_head"], own_image_head)
    if settings.learn_logit_scale:
        params["logit_scale"] = {"log_scale": jnp.asarray(math.log(settings.logit_scale), jnp.float32)}
    return model, params


def _feature_args(kind: str) -> dict[str, Any]:
    return dict(towers.kind_of(kind).feature_args)


def _without_own_head(kind: str, variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """(variables without the tower's own head, that head's parameters)."""
    pattern = towers.kind_of(kind).own_head
    params = dict(variables["params"])
    own = {k: params.pop(k) for k in list(params) if pattern and re.fullmatch(pattern, k)}
    return {**variables, "params": params}, own


def _converted_heads(path: str, initial: Params) -> Params:
    """Both heads from a converted heads directory (kind "astroclip_heads"), checked against
    the heads the config builds."""
    weights = tower_weights.load_tower(path, kind=HEADS_KIND)
    out = {}
    for name in ("image_head", "spectrum_head"):
        converted = {"params": weights.variables["params"][name]}
        try:
            _check_tree(name, converted, initial[name])
        except DataError as e:
            raise ConfigError(f"config field model.heads_weights: {path}: {e}; set "
                              f"model.{name} to the converted head's shape") from None
        out[name] = jax.tree.map(jnp.asarray, converted)
    return out


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
