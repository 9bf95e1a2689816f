"""Data throughput: synthetic generation, tfds preparation, and batches delivered by the pipeline.

    .venv/bin/python benchmarks/data_pipeline.py [--pairs 1280] [--batch 512] [--batches 6]

Measures, in pairs per second:
  generate       astroclip_jax.data.synthetic.generate at 152 px on the DESI grid;
  prepare_write  tfds preparation (serialise + ArrayRecord write + tfds shuffle) of `--pairs`
                 pairs, fed by a cache of generated galaxies so that only the writing is timed;
  read_records   raw record reads from the data source (decode only);
  pipeline       preprocessed batches of `--batch` (crop 96, Stein RGB, z-score) from
                 pipeline.TrainLoader, for each `--workers` setting (0 = threads in-process);
plus the stored size in MB per 1k pairs. Prints and writes benchmarks/results/data_pipeline.json.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from astroclip_jax import settings as settings_lib  # noqa: E402
from astroclip_jax.data import builders, pipeline, prepare, preprocess, synthetic  # noqa: E402
from configs import spender as spender_config  # noqa: E402


def _rate(n, seconds):
    return round(n / seconds, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--generate", type=int, default=32, help="galaxies to generate")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args()
    results = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "pairs": args.pairs, "batch": args.batch}

    t = time.perf_counter()
    cache = synthetic.generate(args.generate, seed=0)
    results["generate_pairs_per_s"] = _rate(args.generate, time.perf_counter() - t)
    print(f"generate: {results['generate_pairs_per_s']} pairs/s")

    def cached(n, seed=0, *, start=0, grid="desi", image_size=152):
        # Galaxy i is cached galaxy i mod cache size, with its own targetid.
        idx = np.arange(start, start + n) % args.generate
        out = {k: v[idx] for k, v in cache.items()}
        out["targetid"] = np.arange(start, start + n, dtype=np.int64)
        return out

    tmp = tempfile.mkdtemp(prefix="bench_data_")
    try:
        # A set of `--pairs` pairs: tfds takes a BuilderConfig object wherever it takes a
        # registered config's name, so the settings carry one instead of a name.
        cfg = builders.SyntheticDesiConfig(name="bench", num_pairs=args.pairs, block_size=256)
        data = dataclasses.replace(
            settings_lib.resolve(spender_config.get_config("")).data, name="synthetic_desi",
            builder_config=cfg, data_dir=tmp, grid="desi", image_crop=96,
            image_transform="stein_rgb", spectrum_norm="zscore")
        real_generate, synthetic.generate = synthetic.generate, cached
        try:
            t = time.perf_counter()
            builder = prepare.prepare(data)
            results["prepare_write_pairs_per_s"] = _rate(args.pairs, time.perf_counter() - t)
        finally:
            synthetic.generate = real_generate
        info = prepare.summary(builder)
        results["mb_per_1k_pairs"] = round(info["mb_per_1k_pairs"], 1)
        print(f"prepare (write only): {results['prepare_write_pairs_per_s']} pairs/s, "
              f"{results['mb_per_1k_pairs']} MB per 1k pairs")

        source = pipeline.data_source(data, "train")
        n = min(len(source), 512)
        t = time.perf_counter()
        records = [source[i] for i in range(n)]
        results["read_records_pairs_per_s"] = _rate(n, time.perf_counter() - t)
        images = np.stack([r["image"] for r in records[:256]])
        spectra = np.stack([r["spectrum"] for r in records[:256]])
        t = time.perf_counter()
        crops = preprocess.center_crop(images, 96)
        rgb = preprocess.stein_rgb(crops)
        results["stein_rgb_pairs_per_s"] = _rate(256, time.perf_counter() - t)
        t = time.perf_counter()
        preprocess.zscore_spectra(spectra)
        results["zscore_pairs_per_s"] = _rate(256, time.perf_counter() - t)
        del rgb
        print(f"read records: {results['read_records_pairs_per_s']} pairs/s; stein_rgb "
              f"{results['stein_rgb_pairs_per_s']}, zscore {results['zscore_pairs_per_s']} pairs/s")

        results["pipeline_pairs_per_s"] = {}
        for workers in args.workers:
            with pipeline.TrainLoader(dataclasses.replace(data, num_workers=workers), "train",
                                      args.batch, seed=0) as loader:
                next(loader)  # start-up (worker processes, first prefetch) not counted
                t = time.perf_counter()
                for _ in range(args.batches):
                    batch = next(loader)
                rate = _rate(args.batches * args.batch, time.perf_counter() - t)
            assert batch["image"].shape == (args.batch, 96, 96, 3)
            results["pipeline_pairs_per_s"][f"workers={workers}"] = rate
            print(f"pipeline, batch {args.batch}, num_workers={workers}: {rate} pairs/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
