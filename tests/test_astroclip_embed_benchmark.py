"""benchmarks/astroclip_embed.py end to end at the small `grid` size: an upstream-format
astroclip.ckpt, our converter, the config-built JAX model and the torch reference
(benchmarks/torch_astroclip.py: timm ViT, torch SpecFormer, torch.nn.MultiheadAttention heads)
in their own processes; the benchmark refuses to report unless both embeddings agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

from benchmarks import astroclip_embed  # noqa: E402


def test_benchmark_embeddings_agree_with_torch_and_are_recorded(tmp_path):
    result = astroclip_embed.main(["--size", "grid", "--batch", "2", "--iters", "1",
                                   "--label", "test", "--results", str(tmp_path)])
    assert max(result["max_rel_diff"].values()) <= 1e-4
    with open(tmp_path / "astroclip_embed-test.json") as f:
        stored = json.load(f)
    assert stored["max_rel_diff"] == result["max_rel_diff"]
    assert np.isfinite([stored["jax_galaxies_per_s"], stored["torch_galaxies_per_s"]]).all()
    assert stored["jax_peak_mb"] > 0 and stored["torch_peak_mb"] > 0
