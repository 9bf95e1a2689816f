"""Metric writer round trip, the paper's curves, and the training-curve figure."""

import json
import math
import os

import matplotlib.image
import numpy as np

from astroclip_jax import metrics


def _write_run(workdir, epochs=5):
    with metrics.MetricWriter(workdir) as writer:
        for epoch in range(1, epochs + 1):
            writer.write(epoch, {"epoch": epoch, "train/loss": 6.0 - 0.1 * epoch,
                                 "val/loss": np.float32(6.1 - 0.1 * epoch),
                                 "train/lr": 5e-4 * 0.5 ** epoch, "batch_size": 512})


def test_writer_round_trip_and_append(tmp_path):
    _write_run(str(tmp_path), epochs=3)
    records = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["train/loss"] == 5.8
    assert abs(records[2]["val/loss"] - 5.8) < 1e-6
    # a second writer (a resumed run) appends; a torn last line is ignored
    with metrics.MetricWriter(str(tmp_path), tensorboard=False) as writer:
        writer.write(4, {"train/loss": 5.6})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tra')
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["batch_size"] == 512


def test_writer_flushes_each_write(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(0, {"loss": 1.5})
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 0, "loss": 1.5}]
    writer.close()


def test_tensorboard_events_written_when_available(tmp_path):
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return
    _write_run(str(tmp_path), epochs=2)
    events = os.listdir(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_paper_curves_are_per_epoch():
    epoch, loss = metrics.read_paper_curve(metrics.PAPER_CURVES["train"])
    assert len(epoch) == len(loss) == 80
    np.testing.assert_array_equal(epoch, np.arange(1, 81))
    assert loss[0] == 5.832296371459961
    epoch, _ = metrics.read_paper_curve(metrics.PAPER_CURVES["val"])
    np.testing.assert_array_equal(epoch, np.arange(1, 81))


def test_plot_training_curves_png(tmp_path):
    _write_run(str(tmp_path))
    out = str(tmp_path / "figs" / "curves.png")
    assert metrics.plot_training_curves(str(tmp_path / "metrics.jsonl"), out) == out
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (700, 700)  # figsize 7x7 inches at 100 dpi
    assert image.std() > 0
    assert [p for p in os.listdir(tmp_path / "figs")] == ["curves.png"]  # no temp left
    metrics.plot_training_curves(str(tmp_path), out, reference=False)
    assert os.path.getsize(out) > 0
    assert math.isclose(math.log(512), 6.238, abs_tol=1e-3)
