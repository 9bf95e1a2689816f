"""`--mode=export`: the exported folder of a smoke run restores in a fresh process that can
touch neither the work directory (deleted), nor the dataset, nor any tower folder, and embeds
raw galaxies exactly as the run's own embeddings table; a damaged file is refused; the example
notebook runs end to end on it."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cli_runs
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import pipeline
from astroclip_jax.errors import DamagedCheckpoint
from astroclip_jax.evaluation import embed, restore
from configs import spender

NOTEBOOK = os.path.join(cli_runs.ROOT, "examples", "quickstart.ipynb")

# Runs in the fresh process: any open() or directory listing under a forbidden path fails.
_FRESH = r"""
import os, sys
import numpy as np
forbidden = [os.path.abspath(p) for p in sys.argv[4:]]

def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], str):
        path = os.path.abspath(args[0])
        if any(path == f or path.startswith(f + os.sep) for f in forbidden):
            raise PermissionError(f"the restore touched {path}")

sys.addaudithook(hook)
from astroclip_jax.evaluation.restore import load_embedder
emb = load_embedder(sys.argv[1])
raw = np.load(sys.argv[2])
np.savez(sys.argv[3], image=emb.embed_images(raw["image"]),
         spectrum=emb.embed_spectra(raw["spectrum"]))
"""


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """(export folder, the run's embeddings table, raw inputs of its rows) with the run gone."""
    base = tmp_path_factory.mktemp("export")
    workdir = str(base / "run")
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns("export", "embeddings"))
    cli_runs.run("export", workdir)
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    settings = settings_lib.resolve(config)
    arrays, meta, data = embed.load_or_compute_embeddings(settings, workdir)
    raw = pipeline.read_records(pipeline.data_source(data, meta["split"]),
                                np.asarray(arrays["index"]), ("image", "spectrum"))
    np.savez(base / "raw.npz", image=raw["image"], spectrum=raw["spectrum"])
    moved = str(base / "elsewhere" / "model")
    shutil.move(os.path.join(workdir, "export"), moved)
    shutil.rmtree(workdir)  # no work directory, checkpoints or feature cache any more
    return moved, arrays, str(base / "raw.npz")


def test_export_restores_alone_and_embeds_as_the_run(exported, tmp_path):
    folder, arrays, raw = exported
    out = str(tmp_path / "fresh.npz")
    forbidden = [cli_runs.DATA_DIR, os.path.expanduser("~/tensorflow_datasets")]
    proc = subprocess.run([sys.executable, "-c", _FRESH, folder, raw, out, *forbidden],
                          cwd=str(tmp_path), env=cli_runs.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = np.load(out)
    np.testing.assert_allclose(fresh["image"], arrays["image_embedding"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fresh["spectrum"], arrays["spectrum_embedding"], rtol=0, atol=1e-6)


def test_a_damaged_export_is_refused(exported, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(exported[0], folder)
    path = os.path.join(folder, "heads.npz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="heads.npz"):
        restore.load_embedder(folder)


def test_notebook_runs_on_the_export(exported, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    figure = str(tmp_path / "notebook.png")
    for name, value in (("ASTROCLIP_EXPORT", exported[0]), ("ASTROCLIP_NOTEBOOK_FIGURE", figure),
                        ("JAX_PLATFORMS", "cpu"), ("PYTHONPATH", cli_runs.ROOT)):
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "rank of each image's own spectrum" in printed
    assert os.path.getsize(figure) > 10_000
