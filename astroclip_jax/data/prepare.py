"""Prepare the configured dataset (tfds -> ArrayRecord), never damaging an earlier preparation.

    python main.py --config=configs/spender.py --mode=prepare --workdir=runs/default
    python main.py --config=configs/spender.py:desi --mode=prepare --config.data.rebuild=True

tfds writes a new dataset into a temporary directory and renames it into place only on success,
so a failed first build leaves nothing behind. But its "overwrite" modes delete the old dataset
*before* building; a rebuild (`data.rebuild=True`, or `prepare(..., force=True)`) therefore
builds into a staging directory and swaps the finished version directory in, so a failed
rebuild leaves the previous one intact.

Writing takes the lock of the dataset's directory (`<data_dir>/<name>/<config>/.lock-prepare`):
a second prepare of the same dataset stops at once naming the holder, and the holder first
removes what a killed earlier prepare left there (tfds' `incomplete.*`, `.staging-*`, the old
copy a swap left half-deleted; a swap killed between its two renames is undone instead).

An already prepared dataset is checked against its recipe (`builders` records the identity of
its source files and the options that shape it): one made from another file, directory or
option than the config names now is refused with the differences and how to rebuild. A source
file deleted after preparing is not an error (the prepared dataset is what is read).
"""

import glob
import json
import logging
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from astroclip_jax import errors, files, locks, processes
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import builders
from astroclip_jax.settings import DataSettings

LOCK_NAME = "prepare"
STAGING_PREFIX = ".staging-"
_ROLES = {"astroclip": "AstroCLIP file", "provabgs": "PROVABGS catalogue"}


class SourceChanged(errors.DataError):
    """The prepared dataset was made from other source files or options than configured."""


def make_builder(data: DataSettings, data_dir: str | None = None):
    """The tfds builder the data settings name, writing ArrayRecord."""
    kwargs = {}
    if data.name == "astroclip_desi":
        kwargs = {"provabgs_path": data.provabgs_path, "nan_policy": data.nan_policy,
                  "provabgs_properties_path": data.provabgs_properties_path,
                  "duplicate_policy": data.duplicate_policy}
    elif data.name == "mmu_pairs":  # data/mmu_builder.py
        kwargs = {"desi_dir": data.mmu_desi_dir, "legacysurvey_dir": data.mmu_legacysurvey_dir,
                  "radius_arcsec": data.crossmatch_radius_arcsec,
                  "provabgs_path": data.provabgs_path,  # read by its "_provabgs" configs
                  "provabgs_properties_path": data.provabgs_properties_path}
    return builders.builder(data.name, data.builder_config, data_dir=data_dir or data.data_dir,
                            file_format="array_record", **kwargs)


def dataset_dir(builder) -> str:
    """<data_dir>/<name>/<config>: what the lock covers (the version directory inside it is
    replaced whole)."""
    return os.path.dirname(os.fspath(builder.data_dir))


def _downloads(builder) -> str:
    return os.path.join(os.fspath(builder.data_dir_root), "downloads")


def manual_dir(builder, data: DataSettings) -> str:
    """Where the source files are looked for: data.manual_dir, else tfds' default."""
    if data.manual_dir:
        return os.path.expanduser(os.fspath(data.manual_dir))
    return os.path.join(_downloads(builder), "manual")


def _download_and_prepare(builder, data: DataSettings, home) -> None:
    """Build `builder`; downloads and the manual dir are those of `home`, the builder of the
    real data dir (a staged rebuild must not download again into its staging directory)."""
    builders.spill_shuffle_buckets_without_tensorflow()
    builder.download_and_prepare(download_dir=_downloads(home), download_config=(
        tfds.download.DownloadConfig(
            manual_dir=manual_dir(home, data),
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)))


def prepare(data: DataSettings, *, force: bool = False):
    """Build the dataset unless it is already prepared (or rebuild with `force` or
    `data.rebuild`); the builder. A prepared dataset is checked against its recipe."""
    builder = make_builder(data)
    final = os.fspath(builder.data_dir)  # <data_dir>/<name>/<config>/<version>
    rebuild = force or data.rebuild
    if os.path.exists(final) and not rebuild:
        _tidy_if_free(builder)
        check_recipe(builder, data)
        logging.info("dataset %s already prepared in %s", builder.info.full_name, final)
        return builder
    with locks.DirectoryLock(dataset_dir(builder), f"prepare of {builder.info.full_name}",
                             LOCK_NAME):
        remove_leftovers(builder)
        if not os.path.exists(final):
            _download_and_prepare(builder, data, builder)
        elif not rebuild:  # a swap killed half way was undone: that dataset is back
            builder = make_builder(data)  # reads it from disk
            check_recipe(builder, data)
            return builder
        else:  # stage beside the final directory (same filesystem, so renames are atomic)
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dataset_dir(builder))
            try:
                staged = make_builder(data, data_dir=staging)
                _download_and_prepare(staged, data, builder)
                files.replace_directory(os.fspath(staged.data_dir), final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    builder = make_builder(data)
    _log_summary(builder)
    return builder


# ------------------------------------------------------------------------------- leftovers

def _is_leftover(name: str) -> bool:
    return (name.startswith(("incomplete.", STAGING_PREFIX, files.TMP_PREFIX))
            or ".incomplete" in name or ".old-" in name)


def remove_leftovers(builder) -> list[str]:
    """Clear what a killed prepare left in the dataset's directory (call it holding the
    lock); the paths removed. A version directory that a killed swap left only under its
    `<version>.old-*` name (the new one never arrived) is moved back instead."""
    home = dataset_dir(builder)
    final = os.fspath(builder.data_dir)
    olds = glob.glob(glob.escape(final) + ".old-*")
    if not os.path.exists(final) and len(olds) == 1 and os.path.isfile(
            os.path.join(olds[0], "dataset_info.json")):
        os.rename(olds[0], final)
        logging.warning("dataset %s: restored %s, which a killed rebuild had set aside",
                        builder.info.full_name, final)
    removed = []
    names = sorted(os.listdir(home)) if os.path.isdir(home) else []
    for name in filter(_is_leftover, names):
        removed.append(os.path.join(home, name))
    # Earlier versions of `prepare` staged in the data dir itself.
    root = os.fspath(builder.data_dir_root)
    relative = os.path.relpath(home, root)
    for name in sorted(os.listdir(root)):
        if name.startswith(STAGING_PREFIX) and os.path.isdir(os.path.join(root, name, relative)):
            removed.append(os.path.join(root, name))
    for path in removed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if removed:
        logging.warning("dataset %s: removed %d leftover(s) of a killed prepare: %s",
                        builder.info.full_name, len(removed), removed)
    return removed


def _tidy_if_free(builder) -> None:
    """Remove leftovers beside a prepared dataset, unless another process is preparing it."""
    lock = locks.DirectoryLock(dataset_dir(builder), f"check of {builder.info.full_name}",
                               LOCK_NAME)
    try:
        lock.acquire()
    except (errors.Busy, OSError) as err:  # being prepared, or a read-only data dir
        logging.info("dataset %s: leftovers not checked: %s", builder.info.full_name, err)
        return
    try:
        remove_leftovers(builder)
    finally:
        lock.release()


# ------------------------------------------------------------------------------- recipe check

def check_recipe(builder, data: DataSettings) -> None:
    """Refuse a prepared dataset whose recorded sources or options differ from what the
    config names now (SourceChanged: every difference, and how to rebuild)."""
    recorded = dict(builder.info.metadata or {}).get("recipe")
    name = builder.info.full_name
    if recorded is None:
        logging.warning("dataset %s in %s has no record of its sources (prepared by an earlier "
                        "version); not checked. --config.data.rebuild=True records them", name,
                        os.fspath(builder.data_dir))
        return
    now = builder.source_files(manual_dir(builder, data))
    changes = []
    for role, was in (recorded.get("sources") or {}).items():
        label = _ROLES.get(role, role)
        if was is None:
            continue
        downloads = os.path.realpath(_downloads(builder)) + os.sep
        if now.get(role) is None and was["path"].startswith(downloads) and os.path.isfile(
                was["path"]):
            now[role] = was["path"]  # downloaded, not placed by hand: a build reads it again
        if now.get(role) is None:
            logging.warning("dataset %s: its %s %s is not in the configured place any more; "
                            "using the prepared dataset unchecked", name, label, was["path"])
            continue
        differences = _identity_changes(was, builders.file_identity(now[role]))
        if differences:
            changes.append(f"{label} {', '.join(differences)}")
    options = builder.options()
    for key, was in (recorded.get("options") or {}).items():
        if options.get(key) != was:
            changes.append(f"{key} {was!r} -> {options.get(key)!r}")
    if changes:
        raise SourceChanged(
            f"dataset {name} in {os.fspath(builder.data_dir)} was prepared from other inputs "
            f"than the config gives now: {'; '.join(changes)}. Rebuild it with --mode=prepare "
            "--config.data.rebuild=True (the prepared dataset stays until the new one is "
            "complete), or point the config back at what it was made from")


def _identity_changes(was: dict, now: dict) -> list[str]:
    out = []
    if was["path"] != now["path"]:
        out.append(f"path {was['path']} -> {now['path']}")
    if was["size"] != now["size"]:
        out.append(f"size {was['size']} -> {now['size']} bytes")
    if "sha256" in was and "sha256" in now:  # the content decides; a touched file is the same
        if was["sha256"] != now["sha256"]:
            out.append(f"content sha256 {was['sha256'][:12]} -> {now['sha256'][:12]}")
    elif was["mtime_ns"] != now["mtime_ns"]:
        out.append(f"modified {was['modified']} -> {now['modified']}")
    return out


def summary(builder) -> dict:
    """What was prepared: where, examples per split, MB, and the builder's metadata (counts)."""
    splits = {name: {"examples": int(info.num_examples), "mb": info.num_bytes / 1e6}
              for name, info in builder.info.splits.items()}
    examples = sum(s["examples"] for s in splits.values())
    total_mb = sum(s["mb"] for s in splits.values())
    return {
        "dataset": builder.info.full_name,
        "data_dir": os.fspath(builder.data_dir),
        "splits": splits,
        "mb_per_1k_pairs": 1000 * total_mb / examples if examples else None,
        "metadata": dict(builder.info.metadata or {}),
    }


def _log_summary(builder) -> None:
    logging.info("prepared %s", json.dumps(summary(builder), default=str))


def run(settings: settings_lib.RunSettings, workdir: str) -> None:
    """`--mode=prepare`: prepare config.data and write <workdir>/prepare.json.

    Under several processes (`astroclip_jax.processes`) the first prepares and writes, the
    others wait for it and then only read what it wrote: nothing is written twice."""
    processes.initialize(settings.multihost)
    import jax

    first = jax.process_index() == 0
    builder = prepare(settings.data) if first else None
    processes.barrier("dataset prepared")
    if not first:
        return
    info = summary(builder)
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_path(os.path.join(workdir, "prepare.json")) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=2, default=str)
    print(json.dumps(info, indent=2, default=str))
