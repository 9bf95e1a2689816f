"""Survey-scale `--mode=embed`: galaxies/s and peak resident memory of the streaming, chunked
embed against the in-memory path it replaced, in the same run, as N grows, on 1 and 2
processes.

    python benchmarks/embed_scale.py                              # 10k, 100k, 1M
    python benchmarks/embed_scale.py --sizes=10000,100000 --in_memory_max=100000

Data: a generated image-only survey in the ssl-legacysurvey layout (`data/survey_files.py`: a
directory of HDF5 chunks of 100k galaxies, `images` (N, 3, 32, 32) channels first, `ra`, `dec`,
`z_phot_median`), stored as float16 to halve the disk (1M cutouts: 6 GB; the reader casts to
float32). Full 152x152 cutouts would be 277 GB at 1M, more than this machine's disk.
Model: the smoke config's test-size towers (32x32 images), trained for one epoch once
(`--workdir`, reused).

Each measurement is a fresh process (or 2, started by `astroclip_jax.launch`, each on one CPU
device) that reports its own peak RSS (VmHWM) at exit; the table shows the largest process:
- streaming: `main.py --mode=embed --config.eval.survey_file=... --config.eval.embed_inputs=False`
  (chunks of 4,096 rows written as they are computed; memory flat in N);
- in memory: what `--mode=embed` did before streaming: every batch's outputs, with the pooled
  model inputs, kept in memory, concatenated and written at the end as one table.
Reported: wall seconds (process start to exit, including JAX start-up and compilation),
galaxies/s over the wall time, peak RSS in MB. Results: benchmarks/results/embed_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE_ROWS = 100_000


def make_survey(folder: str, n: int, size: int = 32, seed: int = 0) -> str:
    """An image-only survey of n galaxies (reused when already there)."""
    from astroclip_jax.data.survey_files import write_survey_file

    done = os.path.join(folder, "COMPLETE")
    if os.path.exists(done):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, n, FILE_ROWS)):
        rows = min(FILE_ROWS, n - start)
        images = (0.05 * rng.standard_normal((rows, size, size, 3), np.float32)).astype(np.float16)
        write_survey_file(os.path.join(folder, f"images_{i:03d}.h5"), images,
                          ra=rng.uniform(0, 360, rows), dec=rng.uniform(-30, 80, rows),
                          z_phot_median=rng.uniform(0, 1, rows).astype(np.float32))
    open(done, "w").close()
    return folder


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    return env


# Runs main.py (argv after -c's) and, at exit, prints this process's peak resident memory
# (VmHWM: the high-water mark since exec). Not ru_maxrss: on Linux that keeps the parent's
# high-water mark across fork + exec, so a child of a big parent looks big.
_PEAK = ("import atexit, runpy, sys\n"
         "def _peak():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('VmHWM:'):\n"
         "            print('PEAK_RSS_KB', line.split()[1], file=sys.stderr, flush=True)\n"
         "atexit.register(_peak)\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def measure(cmd: list[str], log: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the largest process) of `cmd`, which must succeed; every
    Python process of it reports its own peak (`_PEAK`)."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    with open(log) as f:
        peaks = [int(line.split("PEAK_RSS_KB")[1]) for line in f if "PEAK_RSS_KB" in line]
    return wall, max(peaks) / 1024


def _main_py(mode: str, workdir: str, data_dir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-c", _PEAK, "main.py", "--config=configs/spender.py:smoke",
            f"--mode={mode}",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]


def in_memory(workdir: str, survey: str, out: str, batch_size: int) -> None:
    """The pre-streaming path on a survey: all outputs (with pooled inputs) in memory, then
    one write (run in its own process by `measure`)."""
    import tqdm

    from astroclip_jax import settings as settings_lib
    from astroclip_jax.evaluation import embed, embed_stream, restore
    from configs import spender

    trained = restore.restore_trained_model(workdir, "best")
    settings = settings_lib.resolve(spender.get_config("smoke"))
    data = embed.data_for_run(settings.data, trained.settings)
    rows = embed.survey_rows(data, survey, trained.settings.model.spectrum_length,
                             trained.model.image_size)
    arrays = embed_stream._ChunkEmbedder(trained, rows, batch_size, inputs=True).chunk(
        0, rows.n, tqdm.tqdm(disable=True))
    embed.write_embeddings(out, arrays, {"n": rows.n}, "in-memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--in_memory_max", type=int, default=1_000_000)
    parser.add_argument("--two_process_max", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--root", default="/tmp/embed_scale")
    parser.add_argument("--in_memory_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_memory_worker:
        in_memory(*args.in_memory_worker, batch_size=args.batch_size)
        return

    data_dir, workdir = os.path.join(args.root, "tfds"), os.path.join(args.root, "run")
    os.makedirs(args.root, exist_ok=True)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        print("training the smoke model once (one epoch) ...", flush=True)
        measure(_main_py("train", workdir, data_dir, "--config.train.epochs=1"),
                os.path.join(args.root, "train.log"))
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        survey = make_survey(os.path.join(args.root, f"survey_{n}"), n)
        variants = [("streaming", 1)]
        if n <= args.two_process_max:
            variants.append(("streaming", 2))
        if n <= args.in_memory_max:
            variants.append(("in_memory", 1))
        for kind, procs in variants:
            out = os.path.join(args.root, f"out_{kind}_{procs}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(out, "checkpoints"))
            if kind == "streaming":
                cmd = _main_py("embed", out, data_dir, f"--config.eval.survey_file={survey}",
                               "--config.eval.embed_inputs=False",
                               f"--config.eval.batch_size={args.batch_size}")
                if procs == 2:
                    cmd = [sys.executable, "-m", "astroclip_jax.launch", "--processes=2",
                           "--cpu_devices=1", "--", *cmd]
            else:
                cmd = [sys.executable, "-c", _PEAK, __file__, f"--batch_size={args.batch_size}",
                       "--in_memory_worker", workdir, survey, os.path.join(out, "table")]
            wall, rss = measure(cmd, os.path.join(args.root, f"{kind}_{procs}_{n}.log"))
            row = {"n": n, "path": kind, "processes": procs, "wall_s": round(wall, 1),
                   "galaxies_per_s": round(n / wall), "peak_rss_mb": round(rss)}
            results.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)

    print("\n| N | path | processes | wall s | galaxies/s | peak RSS MB (per process) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']:,} | {r['path']} | {r['processes']} | {r['wall_s']} | "
              f"{r['galaxies_per_s']:,} | {r['peak_rss_mb']:,} |")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "embed_scale.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
