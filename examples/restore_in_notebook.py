"""Restore a trained AstroCLIP-JAX run in a notebook and search by similarity.

Paste into a Jupyter/Colab cell (or run: python examples/restore_in_notebook.py runs/synthetic).
The run can come from any machine (N GPUs, TPU, CPU): it is restored onto this machine's first
device. The frozen towers are reloaded from the weight directories named in the run's config.
"""

import sys

import numpy as np

from astroclip_jax.evaluation.restore import load_embedder

workdir = sys.argv[1] if len(sys.argv) > 1 else "runs/synthetic"
embedder = load_embedder(workdir, which="best")  # or "latest", or a checkpoint step

# Raw inputs, exactly as stored upstream: g, r, z flux cutouts and flux spectra on the DESI grid.
# (Here: random numbers of the right shape; use your own galaxies.)
rng = np.random.default_rng(0)
images = rng.normal(0.0, 0.01, (4, 152, 152, 3)).astype(np.float32)
spectra = rng.normal(1.0, 0.5, (4, 7781)).astype(np.float32)

z_img = embedder.embed_images(images)     # (4, 128) unit vectors
z_spec = embedder.embed_spectra(spectra)  # (4, 128) unit vectors
print("checkpoint step", embedder.step)
print("image -> spectrum cosine similarity:\n", np.round(z_img @ z_spec.T, 3))

# The embed mode's file holds the whole test split for retrieval against it:
#   import h5py; f = h5py.File(f"{workdir}/embeddings/test.h5")
#   best = np.argsort(-(f["spectrum_embedding"][()] @ z_img[0]))[:5]; f["targetid"][()][best]
