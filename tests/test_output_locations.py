"""Output locations never lose what a user had (issue 20).

A pretrainer's `tower_dir`, a converted tower, an export: each replaces a directory only if it
is an earlier output of the same kind, never the work directory, a folder holding it, a folder
of the user's, a file or a link, and says so in one line before any work. A writer killed
between the two renames of a replace leaves the old directory aside, and the next start puts
it back. Every refusal is checked against a hash of the whole tree taken before (os.walk and
hashlib here, not the project's helpers), and an export is searched byte by byte for this
machine's paths.
"""

import hashlib
import os
import subprocess

import numpy as np
import pytest

import cli_runs
from astroclip_jax import files
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import WouldOverwrite
from astroclip_jax.evaluation import export
from astroclip_jax.models import spender_autoencoder as ae
from astroclip_jax.models import tower_weights
from astroclip_jax.training import loop, moco, spender_pretrain
from configs import moco as moco_config
from configs import spender
from configs import spender_pretrain as spender_pretrain_config

PRETRAINERS = {  # name -> (module, config module, config field, tower kind)
    "moco": (moco, moco_config, "moco.tower_dir", "resnet"),
    "spender": (spender_pretrain, spender_pretrain_config, "spender_pretrain.tower_dir",
                "spender"),
}
OTHER_KIND = {"resnet": "spender", "spender": "resnet"}


def tree_hash(path):
    """sha256 over every entry under `path` (names, file bytes, link targets), links unfollowed."""
    digest = hashlib.sha256()
    if os.path.islink(path) or os.path.isfile(path):
        entries = [("", path)]
    else:
        entries = []
        for folder, dirs, names in os.walk(path):
            dirs.sort()
            entries += [(os.path.relpath(os.path.join(folder, n), path), os.path.join(folder, n))
                        for n in sorted(dirs + names)]
    for rel, full in entries:
        digest.update(rel.encode() + b"\0")
        if os.path.islink(full):
            digest.update(b"link:" + os.readlink(full).encode())
        elif os.path.isfile(full):
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _tower(path, kind, value=1.0, **kw):
    """A small tower directory of `kind` whose one kernel is filled with `value`."""
    return tower_weights.save_tower(path, kind, {"width": 2},
                                    {"params": {"dense": {"kernel": np.full((2, 2), value,
                                                                            np.float32)}}},
                                    **kw)


def _kernel(path):
    return float(tower_weights.load_tower(path).variables["params"]["dense"]["kernel"][0, 0])


@pytest.fixture
def places(tmp_path):
    """A user's home for runs: a weights/ folder of converted towers, a work directory that
    has run before, and an unrelated folder of notes."""
    weights = tmp_path / "weights"
    _tower(weights / "resnet50_stein", "resnet")
    _tower(weights / "spender_desi", "spender")
    workdir = tmp_path / "runs" / "moco"
    (workdir / "checkpoints" / "6").mkdir(parents=True)
    (workdir / "checkpoints" / "6" / "state").write_bytes(b"a checkpoint")
    (workdir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (workdir / ".lock-writer").write_text("")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("\\section{Results}")
    (tmp_path / "a_file.txt").write_text("keep me")
    os.symlink(weights, tmp_path / "link_to_weights")
    return {"weights": str(weights), "workdir": str(workdir), "parent": str(workdir.parent),
            "grandparent": str(tmp_path), "unrelated": str(notes),
            "file": str(tmp_path / "a_file.txt"), "symlink": str(tmp_path / "link_to_weights"),
            "a converted tower": str(weights / "resnet50_stein"),
            "repository": cli_runs.ROOT, "home": os.path.expanduser("~"), "root": "/"}


def _config(config_module, field, value):
    config = config_module.get_config("smoke")
    section, name = field.split(".")
    config[section][name] = value
    return config


@pytest.mark.parametrize("trainer", sorted(PRETRAINERS))
@pytest.mark.parametrize("target", ["weights", "workdir", "parent", "grandparent", "unrelated",
                                    "file", "symlink", "other kind", "repository", "home",
                                    "root"])
def test_tower_dir_refuses_what_is_not_an_earlier_tower(places, tmp_path, trainer, target):
    module, config_module, field, kind = PRETRAINERS[trainer]
    if target == "other kind":
        path = _tower(tmp_path / "other", OTHER_KIND[kind])
    else:
        path = places[target]
    hashed = target not in ("repository", "home", "root")  # too large to hash here
    before = tree_hash(path) if hashed else None
    with pytest.raises(WouldOverwrite) as err:
        module.run(settings_lib.resolve(_config(config_module, field, path)), places["workdir"])
    message = str(err.value)
    assert "\n" not in message and f"config field {field}" in message and path in message
    if hashed:
        assert tree_hash(path) == before


@pytest.mark.parametrize("trainer", sorted(PRETRAINERS))
def test_tower_dir_refuses_a_work_directory_not_made_yet(tmp_path, trainer):
    """The run would make the folder and then replace it by its tower: refused before any of
    it exists."""
    module, config_module, field, _ = PRETRAINERS[trainer]
    workdir = str(tmp_path / "new_run")
    for path in (workdir, str(tmp_path)):
        with pytest.raises(WouldOverwrite, match="work directory"):
            module.run(settings_lib.resolve(_config(config_module, field, path)), workdir)
        assert not os.path.exists(workdir)


def test_tower_dir_refusal_is_one_line_from_the_command_line(places):
    workdir = places["workdir"]
    before = {rel: tree_hash(os.path.join(workdir, rel)) for rel in ("checkpoints",
                                                                      "metrics.jsonl")}
    proc = subprocess.run(
        cli_runs.command("pretrain_moco", workdir, f"--config.moco.tower_dir={workdir}",
                         config_file="configs/moco.py"),
        cwd=cli_runs.ROOT, env=cli_runs.env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config field moco.tower_dir: ") and workdir in last, last
    assert {rel: tree_hash(os.path.join(workdir, rel)) for rel in before} == before


@pytest.mark.parametrize("kind", ["resnet", "spender"])
def test_an_earlier_tower_of_the_same_kind_is_replaced(tmp_path, kind):
    out = _tower(tmp_path / "tower", kind, value=1.0)
    field = {"resnet": "moco.tower_dir", "spender": "spender_pretrain.tower_dir"}[kind]
    assert loop.tower_output(out, field, kind, str(tmp_path / "run")) == out
    _tower(out, kind, value=2.0, overwrite=True)
    assert _kernel(out) == 2.0
    assert sorted(os.listdir(tmp_path)) == ["tower"]  # no temporary or old copy left


def _autoencoder(out, value, **kw):
    enc = ({"width": 2}, {"params": {"w": np.full(3, value, np.float32)}}, {"wave_obs": np.ones(4)})
    dec = ({"n_rest": 4}, {"params": {"w": np.full(3, value, np.float32)}},
           {"wave_rest": np.ones(4)})
    return ae.save_autoencoder(out, enc, dec, {"trained_by": "test"}, **kw)


def test_a_spender_tower_with_its_decoder_replaces_only_a_spender_tower(tmp_path):
    out = str(tmp_path / "tower")
    _autoencoder(out, 1.0)
    _autoencoder(out, 2.0)  # an earlier spender tower (with decoder/): replaced
    assert tower_weights.load_tower(out).variables["params"]["w"][0] == 2.0
    resnet = _tower(tmp_path / "resnet", "resnet")
    before = tree_hash(resnet)
    with pytest.raises(WouldOverwrite, match="kind 'resnet', not 'spender'"):
        _autoencoder(resnet, 3.0, what="config field spender_pretrain.tower_dir")
    assert tree_hash(resnet) == before
    (tmp_path / "tower" / "my_notes.txt").write_text("mine")  # a user's file inside
    before = tree_hash(out)
    with pytest.raises(WouldOverwrite, match="my_notes.txt"):
        _autoencoder(out, 4.0)
    assert tree_hash(out) == before


def test_a_converter_with_overwrite_replaces_only_a_tower_of_its_kind(places):
    """save_tower(overwrite=True), as the converters call it, on each place a user has."""
    for target in ("weights", "parent", "unrelated", "file", "symlink"):
        before = tree_hash(places[target])
        with pytest.raises(WouldOverwrite, match="OUTPUT_DIR"):
            _tower(places[target], "spender", overwrite=True, what="OUTPUT_DIR")
        assert tree_hash(places[target]) == before
    converted = places["a converted tower"]
    _tower(converted, "resnet", value=5.0, overwrite=True)  # re-converting the same kind
    assert _kernel(converted) == 5.0


# ------------------------------------------------------------------ a replace killed half way

class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (BaseException: no `except Exception`)."""


def _kill_replace_between_renames(monkeypatch, path, kind="resnet"):
    """Write a new tower over `path` and stop the process after the old one stepped aside:
    what a SIGKILL between `replace_directory`'s two renames leaves (the temporary new one
    included: a killed process runs no clean-up)."""
    renames = []
    real_rename = os.rename

    def rename(a, b):
        renames.append((a, b))
        if len(renames) == 2:
            raise Killed()
        real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Killed):
        _tower(path, kind, value=9.0, overwrite=True)
    monkeypatch.undo()
    return renames


def test_a_tower_set_aside_by_a_killed_replace_is_restored_on_the_next_start(tmp_path,
                                                                             monkeypatch):
    out = _tower(tmp_path / "weights" / "moco", "resnet", value=1.0)
    before = tree_hash(out)
    _kill_replace_between_renames(monkeypatch, out)
    assert not os.path.exists(out)  # the state a kill leaves: the old one is only aside
    left = sorted(os.listdir(tmp_path / "weights"))
    assert any(".old-" in n for n in left) and any(n.startswith(".tmp-") for n in left), left
    # The next start of the pretrainer checks its tower_dir first: the old tower is back.
    assert loop.tower_output(out, "moco.tower_dir", "resnet", str(tmp_path / "run")) == out
    assert tree_hash(out) == before
    _tower(out, "resnet", value=2.0, overwrite=True)  # and the next write clears the rest
    assert sorted(os.listdir(tmp_path / "weights")) == ["moco"] and _kernel(out) == 2.0


def test_the_work_directory_restores_what_a_killed_replace_set_aside(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    out = _tower(os.path.join(workdir, "tower"), "resnet", value=1.0)
    before = tree_hash(out)
    _kill_replace_between_renames(monkeypatch, out)
    settings = settings_lib.resolve(moco_config.get_config("smoke"))
    with loop.work_directory(workdir, settings, "test"):
        assert tree_hash(out) == before
        assert sorted(n for n in os.listdir(workdir) if not n.startswith(".lock-")) == ["tower"]


def test_a_replace_killed_after_the_swap_keeps_the_new_one(tmp_path, monkeypatch):
    out = _tower(tmp_path / "tower", "resnet", value=1.0)
    monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: None)  # killed before deleting
    _tower(out, "resnet", value=2.0, overwrite=True)
    monkeypatch.undo()
    assert any(".old-" in n for n in os.listdir(tmp_path))
    removed = files.remove_leftovers(str(tmp_path))
    assert len(removed) == 1 and ".old-" in removed[0]
    assert os.listdir(tmp_path) == ["tower"] and _kernel(out) == 2.0


def test_leftovers_leave_a_users_old_named_folder_alone(tmp_path):
    """Only the names `replace_directory` makes count as its leftovers."""
    (tmp_path / "draft.old-version").mkdir()
    (tmp_path / "draft.old-version" / "text").write_text("mine")
    before = tree_hash(str(tmp_path))
    assert files.remove_leftovers(str(tmp_path)) == []
    assert tree_hash(str(tmp_path)) == before


# ----------------------------------------------------------------------------------- exports

def test_export_names_no_path_of_this_machine_and_replaces_only_an_export(smoke_run, tmp_path):
    import shutil

    workdir = str(tmp_path / "machine_specific_run_folder")
    shutil.copytree(smoke_run, workdir, ignore=shutil.ignore_patterns("export", ".lock-*"))
    config = spender.get_config("smoke")
    config.data.data_dir = cli_runs.DATA_DIR
    config.eval.survey_file = str(tmp_path / "survey.fits")  # absolute paths of this machine
    config.feature_cache.dir = str(tmp_path / "cache")
    out = export.run(settings_lib.resolve(config), workdir)
    needles = {os.path.abspath(workdir), os.path.realpath(workdir), str(tmp_path),
               os.path.expanduser("~") + os.sep, cli_runs.DATA_DIR, cli_runs.ROOT}
    for folder, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            for needle in needles:
                assert needle.encode() not in data, (name, needle)
    # Another export replaces it (eval.overwrite) ...
    config.eval.overwrite = True
    assert export.run(settings_lib.resolve(config), workdir) == out
    # ... but a folder of the user's named `export` is never replaced.
    shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, "figures.txt"), "w") as f:
        f.write("mine")
    before = tree_hash(out)
    with pytest.raises(WouldOverwrite, match="export folder"):
        export.run(settings_lib.resolve(config), workdir)
    assert tree_hash(out) == before


# ------------------------------------------------------------------------ reading a tower back

@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "tower.json").write_text("{not json"), "tower.json"),
    (lambda d: (d / "tower.json").write_text("[1, 2]"), "tower.json"),
    (lambda d: (d / "tower.json").write_text('{"format_version": 1, "config": {}}'),
     "tower.json: field 'kind'"),
    (lambda d: (d / "tower.json").write_bytes(b"\xff\xfe\x00"), "tower.json"),
    (lambda d: (d / "variables.npz").write_bytes((d / "variables.npz").read_bytes()[:100]),
     "variables.npz"),
    (lambda d: np.savez(d / "variables.npz", bad=np.array([{"a": 1}], dtype=object)),
     "variables.npz"),
])
def test_a_damaged_tower_is_named_in_one_line(tmp_path, damage, needle):
    """What `load_tower` cannot read is a DataError naming the file, never a traceback (and
    an object array, which only pickle could read, is never unpickled)."""
    from astroclip_jax.errors import DataError

    out = tmp_path / "tower"
    _tower(out, "resnet")
    damage(out)
    with pytest.raises(DataError, match=needle) as err:
        tower_weights.load_tower(out)
    assert str(out) in str(err.value) and "\n" not in str(err.value)
