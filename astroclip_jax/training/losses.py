"""The symmetric InfoNCE (CLIP) loss between image and spectrum embeddings.

Pure ``jnp`` functions of global arrays: under a ``Mesh`` with a batch-sharded input XLA
inserts the gathers, so every row sees every negative of the global batch (a loss computed
per device would silently drop negatives).

Upstream (PolymathicAI/AstroCLIP ``CLIPLoss``) normalises with
``F.normalize(x, dim=-1, eps=1e-3)``, i.e. ``x / max(||x||, 1e-3)``, then
``logits = logit_scale * x_img @ x_spec.T`` and averages the cross-entropies of both
directions with labels ``arange(B)``. The scale is multiplied (15.5, fixed, a config value).
"""

import jax
import jax.numpy as jnp

from astroclip_jax.models.astroclip import l2_normalize


def _cross_entropy_rows(logits, mask):
    """Per-row cross-entropy with the diagonal as label; masked columns are no negatives."""
    dtype = logits.dtype
    # A large finite negative (not -inf) keeps every intermediate finite, so no NaN can
    # leak into gradients even for padded rows whose own column is masked.
    very_negative = jnp.asarray(jnp.finfo(dtype).min / 2, dtype)
    masked = jnp.where(mask[None, :], logits, very_negative)
    lse = jax.nn.logsumexp(masked, axis=-1)
    loss = lse - jnp.diagonal(logits)
    hit = jnp.argmax(masked, axis=-1) == jnp.arange(logits.shape[0])
    return loss, hit


def infonce_with_metrics(image_emb, spectrum_emb, logit_scale,
                         mask=None, eps=1e-3):
    """Symmetric InfoNCE loss and its parts.

    Args:
      image_emb: (B, D) image embeddings (need not be normalised).
      spectrum_emb: (B, D) spectrum embeddings; row i pairs with image row i.
      logit_scale: multiplies the cosine similarity (15.5 in AstroCLIP; not a temperature).
      mask: optional bool (B,); False rows (padding) are dropped both as anchors and as
        negatives, so the result equals the loss on the unpadded subset.
      eps: normalisation floor, as upstream.

    Returns:
      ``(loss, metrics)``: ``loss`` is the mean of both directions; ``metrics`` holds
      ``loss`` (same), ``loss_i2s`` (image rows against all spectra), ``loss_s2i``,
      ``acc_i2s`` and ``acc_s2i`` (top-1 retrieval accuracy of the true partner),
      ``accuracy`` (their mean) and ``n_valid`` (number of unmasked rows, float).
      Computed in at least float32.
    """
    dtype = jnp.promote_types(jnp.result_type(image_emb, spectrum_emb), jnp.float32)
    img = l2_normalize(image_emb.astype(dtype), eps)
    spectrum = l2_normalize(spectrum_emb.astype(dtype), eps)
    batch = img.shape[0]
    if mask is None:
        mask = jnp.ones((batch,), dtype=bool)
    mask = mask.astype(bool)

    logits = logit_scale * jnp.matmul(img, spectrum.T, precision=jax.lax.Precision.HIGHEST)
    loss_i, hit_i = _cross_entropy_rows(logits, mask)
    loss_s, hit_s = _cross_entropy_rows(logits.T, mask)

    weight = mask.astype(dtype)
    n_valid = jnp.sum(weight)
    denom = jnp.maximum(n_valid, 1.0)

    def mean(v):
        # where (not multiply) so nothing from a padded row can reach the sum
        return jnp.sum(jnp.where(mask, v.astype(dtype), 0.0)) / denom

    loss_i2s, loss_s2i = mean(loss_i), mean(loss_s)
    acc_i2s, acc_s2i = mean(hit_i), mean(hit_s)
    loss = 0.5 * (loss_i2s + loss_s2i)
    metrics = {
        "loss": loss,
        "loss_i2s": loss_i2s,
        "loss_s2i": loss_s2i,
        "acc_i2s": acc_i2s,
        "acc_s2i": acc_s2i,
        "accuracy": 0.5 * (acc_i2s + acc_s2i),
        "n_valid": n_valid,
    }
    return loss, metrics


def infonce(image_emb, spectrum_emb, logit_scale, mask=None, eps=1e-3):
    """Symmetric InfoNCE loss (scalar); see ``infonce_with_metrics``."""
    return infonce_with_metrics(image_emb, spectrum_emb, logit_scale, mask, eps)[0]
