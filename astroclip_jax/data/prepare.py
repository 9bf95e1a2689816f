"""Prepare the configured dataset (tfds -> ArrayRecord), never damaging an earlier preparation.

    python main.py --config=configs/spender.py --mode=prepare --workdir=runs/default

tfds writes a new dataset into a temporary directory and renames it into place only on success,
so a failed first build leaves nothing behind. But its "overwrite" modes delete the old dataset
*before* building; `prepare(..., force=True)` therefore builds into a staging data dir and swaps
the finished version directory in, so a failed rebuild leaves the previous one intact.
"""

import json
import logging
import os
import shutil
import tempfile

import tensorflow_datasets as tfds

from astroclip_jax import files
from astroclip_jax import settings as settings_lib
from astroclip_jax.data import builders
from astroclip_jax.settings import DataSettings


def make_builder(data: DataSettings, data_dir: str | None = None):
    """The tfds builder the data settings name, writing ArrayRecord."""
    kwargs = {}
    if data.name == "astroclip_desi":
        kwargs = {"provabgs_path": data.provabgs_path, "nan_policy": data.nan_policy}
    return builders.builder(data.name, data.builder_config, data_dir=data_dir or data.data_dir,
                            file_format="array_record", **kwargs)


def _download_and_prepare(builder, data: DataSettings) -> None:
    builders.spill_shuffle_buckets_without_tensorflow()
    builder.download_and_prepare(download_config=_download_config(data))


def _download_config(data: DataSettings):
    manual_dir = data.manual_dir
    return tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir else None,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)


def prepare(data: DataSettings, *, force: bool = False):
    """Build the dataset unless it is already prepared (or rebuild with `force`); the builder."""
    builder = make_builder(data)
    final = os.fspath(builder.data_dir)  # <data_dir>/<name>/<config>/<version>
    if os.path.exists(final) and not force:
        logging.info("dataset %s already prepared in %s", builder.info.full_name, final)
        return builder
    if not os.path.exists(final):
        _download_and_prepare(builder, data)
        _log_summary(builder)
        return builder
    # Rebuild: stage beside the final directory (same filesystem, so renames are atomic).
    root = os.path.dirname(os.path.dirname(os.path.dirname(final)))
    staging = tempfile.mkdtemp(prefix=".staging-", dir=root)
    try:
        staged = make_builder(data, data_dir=staging)
        _download_and_prepare(staged, data)
        files.replace_directory(os.fspath(staged.data_dir), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    builder = make_builder(data)
    _log_summary(builder)
    return builder


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


def run(config, workdir: str) -> None:
    """`--mode=prepare`: prepare config.data and write <workdir>/prepare.json."""
    builder = prepare(settings_lib.resolve(config).data)
    info = summary(builder)
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_path(os.path.join(workdir, "prepare.json")) as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=2, default=str)
    print(json.dumps(info, indent=2, default=str))
