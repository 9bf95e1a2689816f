"""What the search page serves, without the web framework: one run's index, dataset and model.

    service = Service.open(settings, workdir)   # builds the index on first use
    service.search("image_to_spectrum", k=8, targetid=39627586855682279)

Everything per galaxy is read by record from the prepared dataset (random access through its
ArrayRecord data source) or from the index's memory-mapped catalogue columns; nothing loads the
dataset or the embeddings table into memory. Uploaded cutouts and spectra are embedded with the
run's own model and host preprocessing (`evaluation.restore.Embedder`).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import threading
from typing import Any

import numpy as np

from astroclip_jax import settings as settings_lib
from astroclip_jax import wavelength_grids
from astroclip_jax.data import pipeline, preprocess
from astroclip_jax.evaluation import embed, plots, restore, search
from astroclip_jax.evaluation import index as index_lib
from astroclip_jax.serving import queries, render

DIRECTIONS = {name: (a.split("_")[0], b.split("_")[0])
              for name, (a, b) in search.DIRECTIONS.items()}  # name -> (query, searched)


class NotFound(queries.BadRequest):
    def __init__(self, message: str):
        super().__init__(message, status=404)


@dataclasses.dataclass(eq=False)  # hashed by identity: its pictures are cached per galaxy
class Service:
    settings: settings_lib.RunSettings  # the command line's (serve, index, eval, data)
    index: index_lib.RunIndex
    data: settings_lib.DataSettings  # the dataset as embedded (the run's preprocessing)
    split: str
    embedder: restore.Embedder
    source: Any  # the split's data source: records by index

    def __post_init__(self):
        self._source_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self.wave = wavelength_grids.wave(self.data.grid)
        self.image_size = self.embedder.trained.settings.model.image_size
        self.min_cutout = max(self.data.image_crop, self.image_size)
        cols = self.index.columns
        self.has_sky = "ra" in cols and "dec" in cols
        self.max_values = queries.max_values(self.settings.serve.max_upload_bytes)

    @classmethod
    def open(cls, settings: settings_lib.RunSettings, workdir: str, log=print) -> "Service":
        table, manifest, data = embed.ensure_embeddings(settings, workdir)
        run_index = index_lib.open_or_build(table, manifest, settings, log)
        embedder = restore.Embedder(restore.run_model(settings, workdir))
        split = manifest["meta"]["split"]
        return cls(settings=settings, index=run_index, data=data, split=split,
                   embedder=embedder, source=pipeline.data_source(data, split))

    # ---------------------------------------------------------------- galaxies
    def row(self, targetid: int) -> int:
        row = self.index.row_of(targetid)
        if row is None:
            raise NotFound(f"no galaxy with target id {targetid} in the {self.split} split of "
                           f"{self.data.name}/{self.data.builder_config}")
        return row

    def _record(self, row: int, fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The record of index row `row`: every field, or only `fields` decoded."""
        record = int(self.index.columns["index"][row])
        with self._source_lock:
            if fields is None:
                return self.source[record]
            one = pipeline.read_records(self.source, [record], fields)
        return {k: v[0] for k, v in one.items()}

    def galaxy(self, targetid: int) -> dict[str, Any]:
        """The catalogue of one galaxy: every scalar field of its record, and its pictures."""
        row = self.row(targetid)
        record = self._record(row)
        fields = {name: _scalar(value) for name, value in record.items()
                  if np.ndim(value) == 0}
        return {**fields, "row": row, "image": f"/api/galaxy/{targetid}/image.png",
                "spectrum": f"/api/galaxy/{targetid}/spectrum.svg"}

    @functools.lru_cache(maxsize=2048)
    def image_png(self, targetid: int) -> bytes:
        raw = self._record(self.row(targetid), ("image",))["image"]
        return render.png(plots.display_cutouts(raw, self.data.image_crop, self.image_size))

    @functools.lru_cache(maxsize=2048)
    def spectrum_svg(self, targetid: int) -> str:
        raw = np.asarray(self._record(self.row(targetid), ("spectrum",))["spectrum"], np.float32)
        flux, _ = preprocess.preprocess_spectra(raw[None], self.data)
        return render.spectrum_svg(self.wave, flux[0])

    # ---------------------------------------------------------------- searching
    def search(self, direction: str, k: int, targetid: int | None = None,
               random_seed: int | None = None, upload: bytes | None = None) -> dict[str, Any]:
        """The query (a target id, a random galaxy, or an uploaded cutout or spectrum of the
        direction's query modality) and its ``k`` nearest distinct neighbours."""
        if direction not in DIRECTIONS:
            raise queries.BadRequest(f"unknown direction {direction[:60]!r}; expected one of "
                                     f"{list(DIRECTIONS)}")
        max_k = self.settings.serve.max_k
        if not 1 <= k <= max_k:
            raise queries.BadRequest(f"k is {k}; it must be in [1, {max_k}]")
        query_modality, searched = DIRECTIONS[direction]
        if upload is not None:
            vector, query = self._embed_upload(query_modality, upload)
            row = None
        else:
            if targetid is None:
                seed = secrets.randbits(63) if random_seed is None else random_seed
                row = int(np.random.default_rng(seed).integers(self.index.n))
                targetid = int(self.index.columns["targetid"][row])
            row = self.row(targetid)
            vector = self.index.vectors(query_modality, [row])
            query = {"source": "targetid", **self._entry(row)}
        neighbours, dropped = self._distinct_neighbours(searched, vector, k, row)
        return {"direction": direction, "k": k, "query": query, "neighbours": neighbours,
                "dropped_near_duplicates": dropped,
                "index": self.index.meta["modalities"][searched]["factory"]}

    def _entry(self, row: int, similarity: float | None = None, rank: int | None = None):
        cols = self.index.columns
        tid = int(cols["targetid"][row])
        # targetid_str: JavaScript numbers hold 53 bits; DESI target ids need up to 64.
        out = {"rank": rank, "targetid": tid, "targetid_str": str(tid),
               "similarity": None if similarity is None else round(float(similarity), 6),
               "redshift": _column(cols, "redshift", row),
               "log_mstar": _column(cols, "log_mstar", row),
               "ra": _column(cols, "ra", row), "dec": _column(cols, "dec", row),
               "image": f"/api/galaxy/{tid}/image.png",
               "spectrum": f"/api/galaxy/{tid}/spectrum.svg"}
        return {key: value for key, value in out.items() if value is not None or key in
                ("redshift", "log_mstar")}

    def _distinct_neighbours(self, searched: str, vector: np.ndarray, k: int, row: int | None):
        """Top-``k`` rows after dropping near-duplicates (`queries.keep_distinct`), searching
        deeper until ``k`` remain or the table is exhausted."""
        cols, n = self.index.columns, self.index.n
        query_tid = None if row is None else int(cols["targetid"][row])
        query_pos = (float(cols["ra"][row]), float(cols["dec"][row])) \
            if self.has_sky and row is not None else None
        fetch = min(n, 2 * k + 2)
        while True:
            rows, sims = self.index.search(searched, vector, fetch)
            rows, sims = rows[0], sims[0]
            radec = np.stack([cols["ra"][rows], cols["dec"][rows]], 1) if self.has_sky else None
            keep = queries.keep_distinct(cols["targetid"][rows], radec, query_tid, query_pos,
                                         self.settings.serve.duplicate_arcsec)
            if keep.sum() >= k or fetch >= n:
                break
            fetch = min(n, 2 * fetch)
        chosen = np.flatnonzero(keep)[:k]
        dropped = int(np.sum(~keep[:chosen[-1] + 1])) if len(chosen) else int(np.sum(~keep))
        return [self._entry(int(rows[i]), sims[i], rank) for rank, i in
                enumerate(chosen, start=1)], dropped

    def _embed_upload(self, modality: str, content: bytes):
        array = queries.read_array(content, self.max_values)
        if modality == "image":
            image = queries.cutout(array, self.min_cutout)
            with self._model_lock:
                vector = self.embedder.embed_images(image[None])
            rgb = plots.display_cutouts(image, self.data.image_crop, self.image_size)
            return vector, {"source": "upload", "kind": "image",
                            "image": render.data_uri(render.png(rgb), "image/png")}
        length = self.embedder.trained.settings.model.spectrum_length
        flux = queries.spectrum(array, length, self.data.grid)
        with self._model_lock:
            vector = self.embedder.embed_spectra(flux[None])
        normalised, _ = preprocess.preprocess_spectra(flux[None], self.data)
        svg = render.spectrum_svg(self.wave, normalised[0])
        return vector, {"source": "upload", "kind": "spectrum",
                        "spectrum": render.data_uri(svg.encode(), "image/svg+xml")}

    def warm_up(self) -> None:
        """Compile the model once for each upload kind, so the first upload answers quickly."""
        size, length = self.min_cutout, self.embedder.trained.settings.model.spectrum_length
        with self._model_lock:
            self.embedder.embed_images(np.ones((1, size, size, 3), np.float32))
            self.embedder.embed_spectra(np.ones((1, length), np.float32))

    def info(self) -> dict[str, Any]:
        serve = self.settings.serve
        return {"split": self.split, "dataset": f"{self.data.name}/{self.data.builder_config}",
                "n": self.index.n, "directions": list(DIRECTIONS), "k": serve.k,
                "max_k": serve.max_k, "max_upload_bytes": serve.max_upload_bytes,
                "cutout_min_size": self.min_cutout, "spectrum_length": len(self.wave),
                "grid": self.data.grid, "sky_positions": self.has_sky,
                "duplicate_arcsec": serve.duplicate_arcsec,
                "checkpoint_step": self.embedder.step,
                "index": {m: {k: e[k] for k in ("factory", "recall_at_10")}
                          for m, e in self.index.meta["modalities"].items()}}


def _scalar(value):
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float):
        return queries.json_number(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _column(columns, name: str, row: int):
    return queries.json_number(columns[name][row]) if name in columns else None
