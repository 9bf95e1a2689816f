"""Computing an embeddings table chunk by chunk, straight to disk (`embedding_files`).

Rows are cut into chunks of ``chunk_rows`` row numbers; each chunk is embedded batch by batch
(the next batch read on a thread while the devices compute) and written as one file the moment
it is complete, so memory is one chunk's outputs plus a batch's inputs whatever N is. Process p
of P embeds chunks p, p + P, ... on its own devices; the processes meet once at the end and
process 0 seals the table. An unfinished table is resumed from the chunks that match their
checksum record, this key and these rows; any other chunk is computed again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm import tqdm

from astroclip_jax import files, processes
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.evaluation import embedding_files, restore
from astroclip_jax.evaluation.embed_rows import RowsToEmbed
from astroclip_jax.models import towers
from astroclip_jax.errors import DataError
from astroclip_jax.training import sharding

IMAGE_POOL = 4  # pooled input images for the PCA baseline: 96 px -> 24 px
SPECTRUM_BIN = 8  # binned input spectra: 7781 px -> 972 bins


def pool_images(images, factor=IMAGE_POOL):
    """(N, H, W, C) -> (N, H//f, W//f, C) block means (edge pixels beyond a full block dropped)."""
    n, h, w, c = images.shape
    h2, w2 = h // factor, w // factor
    x = np.asarray(images[:, :h2 * factor, :w2 * factor], np.float32)
    return x.reshape(n, h2, factor, w2, factor, c).mean(axis=(2, 4))


def bin_spectra(spectra, factor=SPECTRUM_BIN):
    """(N, L) -> (N, L//f) bin means (the last L % f pixels dropped)."""
    n, length = spectra.shape
    m = length // factor
    return np.asarray(spectra[:, :m * factor], np.float32).reshape(n, m, factor).mean(axis=2)


def _embed_fn(model, modalities: tuple[str, ...]):
    """jit(params, untrained, inputs) -> {column: device array} for the modalities there."""

    def fn(params, untrained, inputs):
        out = {}
        for kind in modalities:
            features = (model.image_features(params, inputs["image"]) if kind == "image"
                        else model.spectrum_features(params, inputs["spectrum"]))
            head = model.image_embedding if kind == "image" else model.spectrum_embedding
            out[f"{kind}_embedding"] = head(params, features)
            out[f"{kind}_features"] = towers.pooled(features)  # tokens: their mean
            out[f"untrained_{kind}_embedding"] = head(untrained, features)
        return out

    return jax.jit(fn)


def _host_inputs(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """The pooled model inputs of a batch (float16), for the PCA baseline."""
    out = {}
    if "image" in batch:
        images = preprocess.center_crop(batch["image"], image_size)
        out["image_inputs"] = pool_images(images).astype(np.float16)
    if "spectrum" in batch:
        out["spectrum_inputs"] = bin_spectra(batch["spectrum"]).astype(np.float16)
    return out


class _ChunkEmbedder:
    """Embeds row ranges on this process's devices: a batch per call, padded to one shape."""

    def __init__(self, trained: restore.TrainedModel, rows: RowsToEmbed, batch_size: int,
                 inputs: bool):
        self.mesh = sharding.make_mesh(jax.local_devices())
        n_dev = self.mesh.devices.size
        self.batch_size = -(-batch_size // n_dev) * n_dev  # whole rows per device
        self.params = sharding.replicate(trained.params, self.mesh)
        # The same frozen towers with the heads as they were before training: a baseline for
        # what training added.
        self.untrained = sharding.replicate(
            {**trained.params, "image_head": trained.initial_params["image_head"],
             "spectrum_head": trained.initial_params["spectrum_head"]}, self.mesh)
        self.fn = _embed_fn(trained.model, rows.modalities)
        self.rows, self.inputs, self.image_size = rows, inputs, trained.model.image_size

    def batches(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        """(row numbers covered, host batch) of [start, stop), each read on a thread while the
        previous one is being embedded."""
        bounds = [(s, min(s + self.batch_size, stop)) for s in range(start, stop,
                                                                     self.batch_size)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.rows.read, *bounds[0]) if bounds else None
            for i, (s, e) in enumerate(bounds):
                batch = pending.result()
                pending = pool.submit(self.rows.read, *bounds[i + 1]) if i + 1 < len(bounds) \
                    else None
                yield e - s, batch

    def chunk(self, start: int, stop: int, bar) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for covered, batch in self.batches(start, stop):
            count = len(batch["index"])  # fewer than covered where a survey leaves rows out
            model_inputs = {
                k: sharding.shard_batch({k: pipeline.pad_rows(batch[k], self.batch_size)},
                                        self.mesh)[k]
                for k in self.rows.modalities}
            out = {k: np.asarray(v)[:count].astype(np.float32)
                   for k, v in self.fn(self.params, self.untrained, model_inputs).items()}
            if self.inputs:
                out.update(_host_inputs(batch, self.image_size))
            # Host columns stay on the host (int64 target ids would not survive a 32-bit device).
            out.update({k: v for k, v in batch.items() if k not in ("image", "spectrum",
                                                                       "spectrum_scale")})
            for name, value in out.items():
                parts.setdefault(name, []).append(value)
            bar.update(covered)
        return {name: np.concatenate(values) for name, values in parts.items()}


def _my_chunks(n: int, chunk_rows: int) -> list[int]:
    chunks = range(-(-n // chunk_rows))
    return [c for c in chunks if c % jax.process_count() == jax.process_index()]


def _reusable_chunk(directory: str, chunk: int, key: str, start: int, stop: int,
                    log: Callable[[str], None]) -> bool:
    """Whether chunk `chunk` of rows [start, stop), made with `key`, is on disk whole: it
    matches its checksum record and its metadata (key, rows, columns). A chunk there that
    does not is said in one line (it is then computed again)."""
    path = embedding_files.chunk_path(directory, chunk)
    if not os.path.exists(path):
        return False
    problem = embedding_files.chunk_problem(path)
    if problem is None:
        meta = embedding_files.chunk_meta(path)
        if (meta.get("embeddings_key"), meta.get("start"), meta.get("stop")) != (key, start,
                                                                                 stop):
            problem = "was made by another embed (another key or other rows)"
    if problem is not None:
        log(f"embed: chunk {path} {problem}; computing it again")
    return problem is None


def _seal_meta(rows: RowsToEmbed, trained: restore.TrainedModel, n: int, inputs: bool,
               chunk_rows: int) -> dict[str, Any]:
    meta = {**rows.meta, "n": n, "checkpoint": {"step": trained.step,
                                                "directory": trained.checkpoint_dir},
            "image_transform": trained.settings.data.image_transform,
            "grid": trained.settings.data.grid, "image_size": trained.model.image_size,
            "image_pool": IMAGE_POOL, "spectrum_bin": SPECTRUM_BIN,
            "inputs": inputs, "chunk_rows": chunk_rows, "processes": jax.process_count(),
            "towers": {"image": dataclasses.asdict(trained.settings.model.image_tower),
                       "spectrum": dataclasses.asdict(trained.settings.model.spectrum_tower)}}
    if "dropped" in rows.meta:  # the rows read but left out under data.nan_policy
        left_out = rows.n - n - sum(rows.meta["dropped"].values())
        meta["dropped"] = {**rows.meta["dropped"], "nan_policy": left_out}
    return meta


@contextlib.contextmanager
def _no_empty_folder_left(directory: str):
    """Removes `directory` (and its parent) if the block made it and fails before writing
    anything into it: a failed embed leaves no empty table behind."""
    made = [d for d in (os.path.dirname(directory), directory) if not os.path.exists(d)]
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise


def embed_to_directory(trained: restore.TrainedModel, rows: RowsToEmbed, directory: str, key: str,
                       batch_size: int, chunk_rows: int, inputs: bool,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Embed `rows` into the table `directory` (resuming at the chunks already there with
    `key`), every process its share of the chunks; process 0 seals it. The manifest."""
    n_chunks = -(-rows.n // chunk_rows)
    first = jax.process_index() == 0
    with _no_empty_folder_left(directory) if first else contextlib.nullcontext():
        if first:
            os.makedirs(directory, exist_ok=True)
            for path in files.remove_leftovers(directory):
                log(f"embed: removed {path}, left by an interrupted embed")
        processes.barrier("embeddings directory ready")
        mine = _my_chunks(rows.n, chunk_rows)
        todo = [c for c in mine if not _reusable_chunk(
            directory, c, key, c * chunk_rows, min((c + 1) * chunk_rows, rows.n), log)]
        if len(todo) < len(mine):
            log(f"embed: {len(mine) - len(todo)} of this process's {len(mine)} chunks in "
                f"{directory} are done; computing the other {len(todo)}")
        if todo:
            embedder = _ChunkEmbedder(trained, rows, batch_size, inputs)
            total = sum(min(chunk_rows, rows.n - c * chunk_rows) for c in todo)
            with tqdm(total=total, unit="galaxy", desc=f"embed {rows.name}",
                      disable=not first) as bar:
                for c in todo:
                    start, stop = c * chunk_rows, min((c + 1) * chunk_rows, rows.n)
                    columns = embedder.chunk(start, stop, bar)
                    embedding_files.write_chunk(directory, c, columns, {
                        "embeddings_key": key, "start": start, "stop": stop,
                        "rows": len(columns["index"]), "process": jax.process_index()})
    processes.barrier("embedding chunks written")
    manifest = None
    if first:
        for c, path in embedding_files.existing_chunks(directory).items():
            if c >= n_chunks:  # of an earlier embed with other chunk sizes
                embedding_files.remove_chunk(path)
        # (a chunk missing here is write_manifest's one-line error below)
        n = sum((embedding_files.chunk_meta(embedding_files.chunk_path(directory, c)) or {})
                .get("rows", 0) for c in range(n_chunks))
        if n == 0 and "dropped" in rows.meta:
            raise DataError(f"embed: every row of {rows.meta.get('survey', rows.name)} was left "
                            f"out ({rows.meta.get('dropped')} and data.nan_policy='mask' for "
                            "non-finite rows): nothing to embed")
        meta = _seal_meta(rows, trained, n, inputs, chunk_rows)
        if meta.get("dropped", {}).get("nan_policy"):
            log(f"embed: left out {meta['dropped']['nan_policy']} row(s) with non-finite flux "
                "or model inputs (data.nan_policy='mask')")
        manifest = embedding_files.write_manifest(directory, key, meta, range(n_chunks))
    processes.barrier("embeddings sealed")
    return manifest or embedding_files.read_manifest(directory)
