"""The evaluator runner: what every evaluation mode does around its own computation (refuse to
overwrite before any work, load the embeddings, hand them over, write figures and the report
atomically, print the summary), checked with a stand-in evaluator and stand-in embeddings."""

import json
import math
import os

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import ConfigError
from astroclip_jax.evaluation import embed_rows, embeddings, runner
from configs import spender

META = {"split": "test", "n": 3, "checkpoint": {"step": 6, "directory": "/run/checkpoints"},
        "synthetic": True, "image_size": 32}


@pytest.fixture
def loads(monkeypatch):
    """Stand-in embeddings: records each load (the expensive part a refusal must skip)."""
    calls = []
    arrays = {"image_embedding": np.eye(3, dtype=np.float32), "targetid": np.arange(3) + 10}

    def load(settings, workdir):
        calls.append((settings, workdir))
        return arrays, META, "the data settings"

    monkeypatch.setattr(embeddings, "load_or_compute_embeddings", load)
    return calls


def _evaluator(seen, figures=None):
    def evaluate(inputs):
        seen.append(inputs)
        fig, ax = plt.subplots(figsize=(2, 2))
        if figures is not None:
            figures.append(fig.number)
        ax.plot([0, 1], [1, 0])
        return runner.EvalResult(report={"score": np.float32(0.25), "per_row": np.arange(3),
                                         "undefined": float("nan")},
                                 figures={"curve.png": fig}, lines=["score 0.25"])
    return evaluate


def _config(overwrite=False):
    config = spender.get_config("smoke")
    config.eval.overwrite = overwrite
    return config


SETTINGS = settings_lib.resolve(_config())


def test_report_figures_and_summary(tmp_path, loads, capsys):
    workdir, seen, numbers = str(tmp_path), [], []
    report = runner.run_evaluator(SETTINGS, workdir, "eval_test",
                                  _evaluator(seen, numbers))
    (settings, loaded_from), = loads
    assert loaded_from == workdir
    (inputs,) = seen
    assert inputs.settings == settings.eval and inputs.meta == META
    np.testing.assert_array_equal(inputs.arrays["targetid"], [10, 11, 12])

    out = tmp_path / "eval_test"
    assert sorted(os.listdir(out)) == ["curve.png", "results.json"]  # no temporary left
    with open(out / "results.json") as f:
        written = json.load(f)
    figure = str(out / "curve.png")
    assert math.isnan(written.pop("undefined"))
    assert written == {"score": 0.25, "per_row": [0, 1, 2], "split": "test",
                       "checkpoint": META["checkpoint"], "synthetic": True, "figures": [figure]}
    assert report["figures"] == [figure] and report["split"] == "test"
    assert matplotlib.image.imread(figure).shape[2] in (3, 4)  # a real PNG
    assert not plt.fignum_exists(numbers[0])  # the figure was closed after saving
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["score 0.25", f"eval_test: wrote {out / 'results.json'}"]


def test_refuses_to_overwrite_before_loading_anything(tmp_path, loads):
    workdir, seen = str(tmp_path), []
    runner.run_evaluator(SETTINGS, workdir, "eval_test", _evaluator(seen))
    with pytest.raises(runner.ResultExists, match="overwrite"):
        runner.run_evaluator(SETTINGS, workdir, "eval_test", _evaluator(seen))
    assert len(loads) == len(seen) == 1  # refused before the embeddings were loaded
    assert isinstance(runner.ResultExists("x"), FileExistsError)  # main.py's one-line error
    runner.run_evaluator(settings_lib.resolve(_config(overwrite=True)), workdir, "eval_test",
                         _evaluator(seen))
    assert len(loads) == len(seen) == 2
    # Another mode has its own results.
    runner.run_evaluator(SETTINGS, workdir, "other_mode", _evaluator(seen))
    assert os.path.exists(tmp_path / "other_mode" / "results.json")


def test_a_failing_evaluator_leaves_no_result_folder(tmp_path, loads):
    def broken(inputs):
        raise RuntimeError("evaluator bug")

    with pytest.raises(RuntimeError, match="evaluator bug"):
        runner.run_evaluator(SETTINGS, str(tmp_path), "eval_test", broken)
    assert not os.path.exists(tmp_path / "eval_test")


def test_examples_are_read_as_the_embeddings_were(tmp_path, loads, monkeypatch):
    """`EvalInputs.examples(rows)` reads those rows of the embedded split and dataset, at the
    image size the towers saw, keyed by row."""
    asked = []

    def read_examples(data, split, rows, image_size):
        asked.append((data, split, list(rows), image_size))
        return {"image": np.stack([np.full((2, 2, 3), r, np.float32) for r in rows]),
                "spectrum": np.stack([np.full(5, r, np.float32) for r in rows]),
                "wave": np.linspace(3600, 9824, 5)}

    monkeypatch.setattr(embed_rows, "read_examples", read_examples)
    got = []

    def evaluate(inputs):
        got.append(inputs.examples(np.array([2, 0])))
        return runner.EvalResult(report={})

    runner.run_evaluator(SETTINGS, str(tmp_path), "eval_test", evaluate)
    assert asked == [("the data settings", "test", [2, 0], 32)]
    (ex,) = got
    assert sorted(ex["image"]) == sorted(ex["spectrum"]) == [0, 2]
    assert ex["image"][2].max() == ex["spectrum"][2].max() == 2 and ex["image"][0].max() == 0
    assert ex["wave"].shape == (5,)


def test_an_evaluation_of_a_survey_is_refused_in_one_line_before_embedding(tmp_path, loads):
    """An evaluator reads image-spectrum pairs and their catalogue; a one-modality survey has
    neither (before: a KeyError traceback after embedding the whole survey)."""
    config = _config()
    config.eval.survey_file = "/data/legacysurvey/south"
    with pytest.raises(ConfigError, match=r"^config field eval.survey_file is "
                                          r"'/data/legacysurvey/south': --mode=eval_test reads "
                                          r"the image-spectrum pairs"):
        runner.run_evaluator(settings_lib.resolve(config), str(tmp_path), "eval_test",
                             _evaluator([]))
    assert loads == [] and not os.path.exists(tmp_path / "eval_test")
