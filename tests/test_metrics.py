"""Metric writer round trip (JSON lines and the TensorBoard events, read back), the paper's
curves, and what the training-curve figure draws."""

import csv
import glob
import json
import math
import os
import struct

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.proto import event_pb2

from astroclip_jax.data import shipped_files
from astroclip_jax.training import metrics


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


def _tfrecords(path):
    """The records of a TFRecord file: u64 length, u32 masked CRC-32C of the length, the data,
    u32 masked CRC-32C of the data (little endian); the CRCs are checked."""
    with open(path, "rb") as f:
        raw = f.read()
    out, pos = [], 0
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        data = raw[pos + 12:pos + 12 + length]
        length_crc, data_crc = (struct.unpack("<I", raw[p:p + 4])[0]
                                for p in (pos + 8, pos + 12 + length))
        assert length_crc == masked_crc32c(header) and data_crc == masked_crc32c(data)
        out.append(data)
        pos += 16 + length
    return out


def _scalars_from_protobuf(logdir):
    """{tag: [(step, value), ...]} parsed from the event files with tensorboardX's protos."""
    found = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_tensorboard_events_hold_the_scalars(tmp_path):
    _write_run(str(tmp_path), epochs=2)
    logdir = str(tmp_path / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(logdir))
    want = {"epoch": [1, 2], "train/loss": [5.9, 5.8], "val/loss": [6.0, 5.9],
            "train/lr": [2.5e-4, 1.25e-4], "batch_size": [512, 512]}
    got = _scalars_from_protobuf(logdir)
    assert set(got) == set(want)  # "step" is the x axis, not a scalar of its own
    for tag, values in want.items():
        assert [s for s, _ in got[tag]] == [1, 2], tag
        # Event files store float32.
        np.testing.assert_array_equal([v for _, v in got[tag]], np.float32(values), err_msg=tag)
    # TensorBoard's own reader, where installed, reads the same.
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        return
    acc = event_accumulator.EventAccumulator(logdir)
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, pairs in got.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == pairs, tag


def _csv_curve(which):
    """The paper's loss curve read straight from the shipped wandb export: one row per epoch
    (80 epochs, in order), the loss in the column after "Step" (then its __MIN, __MAX)."""
    with open(shipped_files.paper_curve_path(which), newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header[0] == "Step" and header[2].endswith("__MIN") and header[3].endswith("__MAX")
    steps = np.array([float(r[0]) for r in rows])
    assert np.all(np.diff(steps) > 0)  # logged once per epoch, in order
    return np.arange(1, len(rows) + 1), np.array([float(r[1]) for r in rows])


def test_paper_curves_are_per_epoch():
    for which in ("train", "val"):
        epoch, loss = metrics.read_paper_curve(shipped_files.paper_curve_path(which))
        want_epoch, want_loss = _csv_curve(which)
        assert len(want_epoch) == 80
        np.testing.assert_array_equal(epoch, want_epoch)
        np.testing.assert_array_equal(loss, want_loss)
    assert metrics.read_paper_curve(shipped_files.paper_curve_path("train"))[1][0] == \
        5.832296371459961


@pytest.fixture
def drawn(monkeypatch):
    """The Figure objects `plot_training_curves` saves (to inspect what it drew)."""
    figures, save = [], matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return figures


def _lines(ax):
    return {line.get_label(): (np.asarray(line.get_xdata(), float),
                               np.asarray(line.get_ydata(), float)) for line in ax.get_lines()}


def test_plot_training_curves_png(tmp_path, drawn):
    _write_run(str(tmp_path))
    out = str(tmp_path / "figs" / "curves.png")
    assert metrics.plot_training_curves(str(tmp_path / "metrics.jsonl"), out) == out
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (700, 700)  # figsize 7x7 inches at 100 dpi
    assert image.std() > 0
    assert [p for p in os.listdir(tmp_path / "figs")] == ["curves.png"]  # no temp left

    ax_loss, ax_lr = drawn[-1].axes
    lines = _lines(ax_loss)
    epochs = np.arange(1, 6)
    np.testing.assert_array_equal(lines["train (this run)"][0], epochs)
    np.testing.assert_allclose(lines["train (this run)"][1], 6.0 - 0.1 * epochs, rtol=1e-12)
    np.testing.assert_allclose(lines["validation (this run)"][1], 6.1 - 0.1 * epochs, rtol=1e-6)
    # The paper's curves are the shipped CSVs, one point per epoch.
    for name, which in (("train", "train"), ("validation", "val")):
        (x, y), = [v for k, v in lines.items() if k.startswith(f"{name} (paper's run")]
        want_x, want_y = _csv_curve(which)
        np.testing.assert_array_equal(x, want_x)
        np.testing.assert_array_equal(y, want_y)
    # Chance level ln(B), with B from the records' batch_size field (512).
    (chance,) = [v for k, v in lines.items() if k.startswith("chance")]
    np.testing.assert_array_equal(chance[1], [math.log(512)] * 2)
    # The learning rate panel, on a log axis.
    (lr_line,) = ax_lr.get_lines()
    np.testing.assert_array_equal(lr_line.get_xdata(), epochs)
    np.testing.assert_allclose(lr_line.get_ydata(), 5e-4 * 0.5 ** epochs, rtol=1e-12)
    assert ax_lr.get_yscale() == "log"

    # Without the reference only this run's curves; an explicit batch size sets the chance line.
    metrics.plot_training_curves(str(tmp_path), out, reference=False, batch_size=32)
    assert os.path.getsize(out) > 0
    lines = _lines(drawn[-1].axes[0])
    assert not any("paper" in k for k in lines)
    (chance,) = [v for k, v in lines.items() if k.startswith("chance")]
    np.testing.assert_array_equal(chance[1], [math.log(32)] * 2)
