"""`--mode=export`: a trained model as one self-contained folder that travels.

    python main.py --config=configs/spender.py --mode=export --workdir=runs/default
    # then, on any machine with this package (and nothing else of the run):
    from astroclip_jax.evaluation.restore import load_embedder
    emb = load_embedder("runs/default/export")

Writes `workdir/export/` (atomically; an existing export is replaced only with
`eval.overwrite`):

    export.json        format version, the run's config (tower paths relative to the folder,
                       no data paths), the host preprocessing, the checkpoint step, the
                       embedding sizes, where it came from
    image_tower/       the frozen towers as converted-weight directories (tower.json +
    spectrum_tower/    variables.npz, `models/tower_weights.py`), random or converted alike
    heads.npz          the trained heads (flattened names), and the logit scale when learned
    initial_heads.npz  the heads before training (the "untrained heads" baseline)
    checksums.json     size and sha256 of every file above, verified by `restore.load_export`

Plain JSON and NumPy files: the folder opens without the work directory, the tower folders
the run named, the dataset or Orbax, on one CPU or GPU.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from astroclip_jax import files, flat_tree
from astroclip_jax import settings as settings_lib
from astroclip_jax.errors import WouldOverwrite
from astroclip_jax.evaluation import restore, runner
from astroclip_jax.models import tower_weights, towers

EXPORT_DIR = "export"
FORMAT_VERSION = 1
TOWERS = ("image_tower", "spectrum_tower")
# An export as an output: only an earlier export (export.json, nothing it does not write) is
# ever replaced by a new one.
KIND = files.OutputKind("export", restore.EXPORT_FILE, entries=frozenset(
    {restore.EXPORT_FILE, restore.CHECKSUMS_FILE, "heads.npz", "initial_heads.npz", *TOWERS}))


def _tower_config_and_extras(trained: restore.TrainedModel, name: str):
    """(module config, extras) of a tower as the model runs it (the MoCo head and Spender's
    MLP are not part of the frozen towers)."""
    setting = getattr(trained.settings.model, name)
    if setting.weights:
        weights = tower_weights.load_tower(setting.weights, kind=setting.kind)
        config, extras = dict(weights.config), dict(weights.extras)
    else:
        config, extras = towers.tower_config(setting.kind, setting.size), {}
    if setting.kind == "resnet":
        config["head_hidden"] = None
    return config, extras


def portable_config(config: ml_collections.ConfigDict) -> dict:
    """The run's config as JSON with the towers inside the folder and no paths of this machine."""
    out = settings_lib.config_json(config)
    for name in TOWERS:
        out["model"][name]["weights"] = name  # relative to the export folder
    out["model"]["image_head"]["init_from_tower"] = False  # the heads are stored as trained
    out["model"]["heads_weights"] = None
    for field in out["data"]:  # where this machine keeps the data: every *_dir, *_path field
        if field.endswith(("_dir", "_path")):
            out["data"][field] = None
    if "feature_cache" in out:
        out["feature_cache"]["dir"] = None
    out = _without_machine_paths(out)
    if "survey_file" in out.get("eval", {}) and out["eval"]["survey_file"] is None:
        out["eval"]["survey_file"] = ""  # its "none" (a str field)
    return out


def _without_machine_paths(tree):
    """`tree` with every absolute or home-relative path (of any other field: a survey file,
    a pretrainer's folders) replaced by None: it would name a place on this machine only."""
    if isinstance(tree, dict):
        return {k: _without_machine_paths(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_without_machine_paths(v) for v in tree]
    if isinstance(tree, str) and (os.path.isabs(tree) or tree.startswith("~")):
        return None
    return tree


def write_export(trained: restore.TrainedModel, out: str, source: dict | None = None) -> str:
    """Write the export folder of `trained` to `out` (replacing it atomically); its path."""
    with files.atomic_directory(out, KIND, "the export folder") as tmp:
        for name in TOWERS:
            config, extras = _tower_config_and_extras(trained, name)
            kind = getattr(trained.settings.model, name).kind
            tower_weights.save_tower(os.path.join(tmp, name), kind, config,
                                     _numpy(trained.params[name]), extras=extras,
                                     source={"exported_from": "checkpoint",
                                             "step": trained.step})
        heads = {k: v for k, v in trained.params.items() if k not in TOWERS}
        initial = {k: trained.initial_params[k] for k in ("image_head", "spectrum_head")}
        for filename, tree in (("heads.npz", heads), ("initial_heads.npz", initial)):
            np.savez(os.path.join(tmp, filename), **flat_tree.flatten(_numpy(tree)))
        model = trained.settings.model
        meta = {"format_version": FORMAT_VERSION, "config": portable_config(trained.config),
                "preprocessing": {**trained.settings.data.preprocessing_key(),
                                  "image_size": model.image_size,
                                  "spectrum_length": model.spectrum_length},
                "embedding_dim": {"image": model.image_head.out,
                                  "spectrum": model.spectrum_head.out},
                "step": trained.step, "source": source or {}}
        with open(os.path.join(tmp, restore.EXPORT_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        files.seal(tmp, restore.CHECKSUMS_FILE)
    return out


def _numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run(settings: settings_lib.RunSettings, workdir: str) -> str:
    """``--mode=export``: `workdir/export/` from the `eval.checkpoint` checkpoint."""
    workdir = os.path.abspath(workdir)
    out = os.path.join(workdir, EXPORT_DIR)
    # First, so that an export set aside by a killed replace is back before it is judged.
    files.check_output_location(out, KIND, "the export folder")
    if os.path.lexists(out) and not settings.eval.overwrite:
        raise WouldOverwrite(f"{out} exists; set config.eval.overwrite=True "
                             "(--config.eval.overwrite) to replace it")
    trained = restore.run_model(settings, workdir)
    with runner.evaluation_directory(workdir, "export"):  # one at a time; clears a killed one's
        files.remove_leftovers(workdir, (EXPORT_DIR,))
        # Where it came from, without this machine's paths: the folder travels.
        write_export(trained, out, source={
            "workdir": os.path.basename(workdir),
            "checkpoint": (trained.checkpoint_dir if trained.checkpoint_dir == restore.INITIAL
                           else os.path.relpath(trained.checkpoint_dir, workdir))})
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files.files_under(out))
    print(f"export: wrote {out} (checkpoint step {trained.step}, {size / 2**20:.1f} MiB); "
          f"open it with astroclip_jax.evaluation.restore.load_embedder({out!r})")
    return out
