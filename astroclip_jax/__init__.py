"""AstroCLIP in JAX/Flax: galaxy images and spectra in one embedding space."""

__version__ = "0.1.0"
