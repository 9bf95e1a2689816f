"""Several processes for real: `jax.distributed` with 2 local processes x 4 CPU devices (gloo
collectives, started by `astroclip_jax.launch`) against 1 process x 8 devices.

The runs are shared by the assertions (module fixture), each one a real `main.py --mode=train`:

    A  2x4, cached step, epoch 1, on a fresh data directory (prepared by process 0 only)
    B  1x8, cached step, epoch 1, reusing A's feature cache
    C  A's work directory (a checkpoint written by 2 processes) resumed on 1x8, online step, epoch 2
    D  B's work directory (written by 1 process) resumed on 2x4, online step, towards epoch 20;
       process 1 is SIGKILLed once epoch 2's checkpoint is sealed

Tolerance: both layouts put 4 rows on each of 8 devices, so every kernel sees the same shapes;
what differs is the order in which the cross-device sums (the gradients of the replicated
heads) are reduced: gloo over two processes, XLA's in-process collective over one. That moves
the last bit of a float32 sum (1.2e-7 relative); measured after 6 and 12 Adam steps, losses
agree to 1.6e-7 relative (mostly bitwise) and parameters and Adam moments to 1.3e-6 of
the tensor's largest entry. The test allows
`test_sharding`'s 1e-6 relative for losses and 16e-6 of the largest entry for parameters. A
sharding bug (a process training on its own half of the batch, a per-process loss with half
the negatives: ln 16 instead of ln 32 at init) misses these by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import cli_runs

LAUNCH = [sys.executable, "-m", "astroclip_jax.launch", "--processes=2", "--cpu_devices=4",
          "--grace_s=5", "--"]
SPE = 6  # steps per epoch: 204 tiny training pairs, batch 32
KILL_BOUND_S = 60  # the launcher stops the survivor in --grace_s; JAX's heartbeat takes 30 s


def _train(workdir, data_dir, cache_dir, *overrides):
    cmd = cli_runs.command("train", workdir, f"--config.feature_cache.dir={cache_dir}",
                           "--config.feature_cache.spectrum_draws=1", *overrides)
    return [a if not a.startswith("--config.data.data_dir=") else
            f"--config.data.data_dir={data_dir}" for a in cmd]


def _run(cmd, processes: int):
    cmd = LAUNCH + cmd if processes == 2 else cmd
    proc = subprocess.run(cmd, cwd=cli_runs.ROOT, env=cli_runs.env(devices=8),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _kill_process_1_at(launcher: subprocess.Popen, marker: str, timeout: float = 600) -> float:
    """SIGKILL the launched process with JAX_PROCESS_ID=1 once `marker` exists; the time."""
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        assert launcher.poll() is None, launcher.stdout.read()[-4000:]
        assert time.time() < deadline, f"{marker} never appeared"
        time.sleep(0.05)
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("JAX_PROCESS_ID") == "1":
            child.kill()
            return time.time()
    raise AssertionError("process 1 not found")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    data, cache = str(root / "tfds"), str(root / "cache")
    out = {"root": root}
    a, b = str(root / "a"), str(root / "b")
    out["A"] = _run(_train(a, data, cache, "--config.train.epochs=1"), 2)
    out["B"] = _run(_train(b, data, cache, "--config.train.epochs=1"), 1)
    c, d = str(root / "c"), str(root / "d")
    shutil.copytree(a, c)
    shutil.copytree(b, d)
    online = "--config.feature_cache.enabled=False"
    out["C"] = _run(_train(c, data, cache, online, "--config.train.epochs=2"), 1)
    launcher = subprocess.Popen(LAUNCH + _train(d, data, cache, online, "--config.train.epochs=20"),
                                cwd=cli_runs.ROOT, env=cli_runs.env(devices=8),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = _kill_process_1_at(launcher, os.path.join(d, "checkpoints", str(2 * SPE),
                                                       "checksums.json"))
    out["D"], _ = launcher.communicate(timeout=KILL_BOUND_S + 60)
    out["D_rc"], out["D_stop_s"] = launcher.returncode, time.time() - killed
    out.update(a=a, b=b, c=c, d=d, data=data, cache=cache)
    return out


def _epoch_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["epoch"]: (r["train/loss"], r["val/loss"]) for r in records}


def _state(workdir, step):
    """Every array of the saved TrainState (params, Adam moments, step, rng), by path."""
    import jax

    from astroclip_jax.training import checkpoint

    state, meta = checkpoint.Checkpointer(workdir, read_only=True).restore(step)
    assert meta["step"] == step
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def _assert_same_run(one, two, epoch):
    np.testing.assert_allclose(_epoch_losses(two)[epoch], _epoch_losses(one)[epoch], rtol=1e-6)
    s1, s2 = _state(one, epoch * SPE), _state(two, epoch * SPE)
    assert s1.keys() == s2.keys()
    for name, v1 in s1.items():
        scale = max(float(np.abs(v1).max(initial=0)), 1e-30)
        np.testing.assert_allclose(s2[name], v1, rtol=1e-6, atol=16e-6 * scale, err_msg=name)


def test_cached_training_on_2x4_equals_1x8(runs):
    losses = _epoch_losses(runs["a"])
    assert abs(losses[1][0] - np.log(32)) < 1.0  # a real loss near chance, not ln 16
    _assert_same_run(runs["b"], runs["a"], epoch=1)


def test_checkpoints_cross_process_counts_and_online_2x4_equals_1x8(runs):
    # C resumed a 2-process checkpoint on 1 process; D a 1-process one on 2: both continued
    # from epoch 1 to the same epoch-2 state.
    assert "resumed from" in runs["C"] and "[p1]" in runs["D"]
    _assert_same_run(runs["c"], runs["d"], epoch=2)


def test_prepare_and_feature_cache_are_written_once(runs):
    a, b = runs["A"], runs["B"]
    prepared = [line for line in a.splitlines() if " prepared {" in line]
    assert len(prepared) == 1 and prepared[0].startswith("[p0]"), prepared  # process 0 only
    # The cache: whichever process takes its lock first builds it, the other waits and reads.
    wrote = [line[:4] for line in a.splitlines() if "feature cache: wrote" in line]
    reused = [line[:4] for line in a.splitlines() if "feature cache: reusing" in line]
    assert len(wrote) == len(reused) == 1 and {wrote[0], reused[0]} == {"[p0]", "[p1]"}
    assert "feature cache: reusing" in b
    assert "feature cache: wrote" not in b
    assert len(os.listdir(runs["cache"])) == 2  # the cache directory and its lock file


def test_a_killed_process_stops_the_others_with_one_line(runs):
    assert runs["D_rc"] == 128 + 9, runs["D"][-3000:]
    last = runs["D"].strip().splitlines()[-1]
    assert last == "launch: process 1 of 2 was killed by signal 9; stopped processes 0", last
    assert runs["D_stop_s"] < KILL_BOUND_S


_SPLIT_SCRIPT = r"""
import json, sys
import jax, numpy as np
from astroclip_jax import processes, settings as settings_lib
from astroclip_jax.data import pipeline
from configs import spender

processes.initialize(False)
config = spender.get_config("smoke")
config.data.data_dir = sys.argv[1]
data = settings_lib.resolve(config).data
p, n = jax.process_index(), jax.process_count()
from astroclip_jax.data import prepare
prepare.run(settings_lib.resolve(config), sys.argv[2] + "-prepare")  # --mode=prepare: process 0 writes, 1 waits
out = {}
with pipeline.TrainLoader(data, "train", 32, seed=0, start_step=4, process_index=p,
                          process_count=n) as loader:
    for step in (4, 5, 6):  # across the epoch boundary (6 steps per epoch)
        out[f"train{step}"] = next(loader)["targetid"]
for i, batch in enumerate(pipeline.EvalLoader(data, "test", 32, p, n)):
    out[f"eval{i}"] = np.where(batch["mask"], batch["targetid"], -1)
# Printed, not gathered: a JAX gather would cut the int64 target ids to int32.
print("RESULT " + json.dumps({k: v.tolist() for k, v in out.items()}), flush=True)

# --mode=embed's work on 2 processes: each embeds its own chunks of 8 rows, process 0 seals.
from astroclip_jax.evaluation import embed
config.eval.embed_chunk_rows = 8
embed.ensure_embeddings(settings_lib.resolve(config), sys.argv[2])
"""


def test_each_process_reads_its_part_of_every_batch_and_embeds_its_own_chunks(runs):
    from astroclip_jax import settings as settings_lib
    from astroclip_jax.data import pipeline
    from astroclip_jax.evaluation import embed, embedding_files, restore
    from configs import spender

    workdir = str(runs["root"] / "embedded")
    shutil.copytree(runs["a"], workdir)
    proc = subprocess.run(LAUNCH + [sys.executable, "-c", _SPLIT_SCRIPT, runs["data"], workdir],
                          cwd=cli_runs.ROOT, env=cli_runs.env(devices=8), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    per_process = [json.loads(next(x for x in proc.stdout.splitlines()
                                   if x.startswith(f"[p{p}] RESULT ")).split("RESULT ", 1)[1])
                   for p in (0, 1)]
    got = {k: np.stack([np.asarray(r[k]) for r in per_process]) for k in per_process[0]}
    config = spender.get_config("smoke")
    config.data.data_dir = runs["data"]
    data = settings_lib.resolve(config).data
    source = pipeline.data_source(data, "train")
    ids = np.asarray([source[i]["targetid"] for i in range(len(source))])
    for step in (4, 5, 6):
        two = got[f"train{step}"]  # (process, local rows)
        assert two.shape == (2, 16) and not set(two[0]) & set(two[1])
        expected = ids[pipeline.step_indices(len(source), 0, step, 32)]
        np.testing.assert_array_equal(two.reshape(-1), expected)
    test = pipeline.data_source(data, "test")
    test_ids = [test[i]["targetid"] for i in range(len(test))]
    rows = np.concatenate([got[f"eval{i}"].reshape(-1) for i in range(2)])
    np.testing.assert_array_equal(rows[rows >= 0], test_ids)  # each test galaxy once, in order

    assert os.path.isfile(workdir + "-prepare/prepare.json")
    assert '[p0]   "dataset": "synthetic_desi/tiny' in proc.stdout
    assert '[p1]   "dataset"' not in proc.stdout

    table = embed.embeddings_path(workdir, "test")
    writers = {c: embedding_files.chunk_meta(p)["process"]
               for c, p in embedding_files.existing_chunks(table).items()}
    assert writers == {c: c % 2 for c in range(7)}  # 52 rows in 7 chunks, round robin
    arrays, meta, _ = embed.read_embeddings(table)
    assert meta["processes"] == 2
    np.testing.assert_array_equal(arrays["targetid"], test_ids)
    raw = pipeline.read_records(test, np.arange(len(test)))
    embedder = restore.load_embedder(workdir, "best")
    # float32 on differently batched calls (8 rows a device vs one padded call), as test_embed.
    np.testing.assert_allclose(arrays["image_embedding"], embedder.embed_images(raw["image"]),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(arrays["spectrum_embedding"],
                               embedder.embed_spectra(raw["spectrum"]), rtol=0, atol=1e-5)
