"""The table `benchmarks/gpu.sh` ends with: one row per part (the train step: online and cached)
from the JSON each part wrote, and the part's status and wall seconds.

    python benchmarks/gpu_table.py PARTS_FILE [--out TABLE.txt] [--merged ALL.json]

PARTS_FILE has a line per part: name, status (done / FAILED / SKIPPED), seconds, JSON path
(tab-separated). A part whose JSON is missing or unreadable still gets its row, with '-'.
Columns: ours and PyTorch (the same work on the same device), ratio ours/PyTorch (> 1: ours is
faster), peak device memory (ours / PyTorch, MiB; host peak where no device peak was recorded,
marked 'host'), compile (ours: the first call or warm-up, which holds the compile), wall, status.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

Row = dict[str, str]


def _num(x: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mem(ours: Any, torch: Any, host: bool = False) -> str:
    if ours is None and torch is None:
        return "-"
    return f"{_num(ours, '{:,.0f}')} / {_num(torch, '{:,.0f}')}" + (" host" if host else "")


def _row(part: str, ours: str, torch: str = "-", ratio: Any = None, mem: str = "-",
         compile_s: Any = None) -> Row:
    return {"part": part, "ours": ours, "torch": torch,
            "ratio": "-" if ratio is None else f"{ratio:.2f}x", "mem": mem,
            "compile": _num(compile_s)}


def _train_step(name: str, d: dict) -> list[Row]:
    b = str(d["batches"][0])
    s, raw = d["summary"][b], d["raw"][b]
    if d.get("image_dtype", "float32") != "float32":  # ours' ResNet in bfloat16, torch float32
        b += f" (image tower {d['image_dtype']}, torch {d.get('torch_dtype', 'float32')})"
    device = s.get("jax_device_peak_mib") is not None
    mem = (_mem(s.get("jax_device_peak_mib"), s.get("torch_device_peak_mib")) if device
           else _mem(s.get("jax_maxrss_mib"), s.get("torch_maxrss_mib"), host=True))
    return [
        _row(f"{name} online b{b}", f"{s['jax_online_pairs_s']:,.1f} pairs/s",
             f"{s['torch_online_pairs_s']:,.1f}", s["online_speedup"], mem,
             raw["jax"]["online"]["warmup_s"]),
        _row(f"{name} cached b{b}", f"{s['jax_cached_device_pairs_s']:,.0f} pairs/s",
             f"{s['torch_cached_pairs_s']:,.0f}", s["cached_vs_torch_cached"], mem,
             raw["jax"]["cached_device"]["warmup_s"]),
    ]


def _moco(name: str, d: dict) -> list[Row]:
    rows = d["rows"]
    size = rows[-1]["size"]  # the largest size asked for
    by_fw = {r["framework"]: r for r in rows if r["size"] == size}
    ours, torch = by_fw.get("jax+augment", by_fw.get("jax")), by_fw.get("torch")
    device = "device_peak_mb" in ours
    mem = _mem(ours.get("device_peak_mb", ours.get("peak_mb")),
               torch.get("device_peak_mb", torch.get("peak_mb")) if torch else None, not device)
    return [_row(f"{name} {size} b{ours['batch']}", f"{ours['pairs_per_s']:,.1f} pairs/s",
                 _num(torch and torch["pairs_per_s"]),
                 ours["pairs_per_s"] / torch["pairs_per_s"] if torch else None, mem)]


def _embed(name: str, d: dict) -> list[Row]:
    e, meta = d["embedding"], d["meta"]
    cache = d.get("cache")
    extra = f"; cache {cache['extrapolated_train_build_s']:,.0f} s/158k" if cache else ""
    return [_row(name, f"{e['streamed_pairs_s']:,.0f} pairs/s{extra}",
                 mem=(_mem(meta["device_peak_mib"], None) if meta.get("device_peak_mib")
                      else _mem(meta.get("maxrss_mib"), None, host=True)),
                 compile_s=e.get("compile_and_first_batch_s"))]


def _vit(name: str, d: dict) -> list[Row]:
    device = "jax_device_peak_mb" in d
    mem = (_mem(d.get("jax_device_peak_mb"), d.get("torch_device_peak_mb")) if device
           else _mem(d.get("jax_peak_mb"), d.get("torch_peak_mb"), host=True))
    return [_row(name, f"{d['jax_images_per_s']:,.1f} img/s", _num(d["torch_images_per_s"]),
                 d["jax_over_torch"], mem, d.get("jax_compile_and_first_s"))]


def _specformer(name: str, d: dict) -> list[Row]:
    size = d["rows"][-1]["size"]
    by_fw = {r["framework"]: r for r in d["rows"] if r["size"] == size}
    j, t = by_fw["jax"], by_fw["torch"]
    device = "device_peak_mb" in j
    mem = _mem(j.get("device_peak_mb", j.get("peak_mb")), t.get("device_peak_mb", t.get("peak_mb")),
               not device)
    return [_row(name, f"{j['spectra_per_s']:,.1f} spectra/s", _num(t["spectra_per_s"]),
                 j["spectra_per_s"] / t["spectra_per_s"], mem, j.get("compile_s"))]


def _spender_ae(name: str, d: dict) -> list[Row]:
    row = d["rows"][-1]  # the largest size asked for
    device = "jax_device_peak_mb" in row
    mem = (_mem(row.get("jax_device_peak_mb"), row.get("torch_device_peak_mb")) if device
           else _mem(row.get("jax_peak_mb"), row.get("torch_peak_mb"), host=True))
    return [_row(f"{name} {row['label']} b{row['batch']}", f"{row['jax_spectra_per_s']:,.1f} spectra/s",
                 _num(row["torch_spectra_per_s"]), row["jax_over_torch"], mem,
                 row.get("jax_compile_and_first_s"))]


def _seed_scale(name: str, d: dict) -> list[Row]:
    c = d["cache"]
    done = "" if d["complete"] else f" (est. from {d['epochs_done']}/{d['epochs']} epochs)"
    return [_row(f"{name} {d['epochs']} ep x {c['train_rows'] // 1000}k",
                 f"{d['train_run_s']:,.0f} s train{done} + {c['extrapolated_build_s']:,.0f} s "
                 f"cache (est.)", mem=_mem(d.get("device_peak_mib"), None),
                 compile_s=d.get("cache_compile_s", 0) + max(d.get("first_epoch_extra_s", 0), 0))]


READERS: dict[str, Callable[[str, dict], list[Row]]] = {
    "train_step": _train_step, "moco_step": _moco, "embed_throughput": _embed,
    "vit_forward": _vit, "specformer_forward": _specformer, "seed_scale": _seed_scale,
    "spender_autoencoder_step": _spender_ae,
}


def _kind(path: str, d: dict) -> str:
    if d.get("benchmark") in READERS:
        return d["benchmark"]
    base = os.path.basename(path)
    return next(k for k in READERS if base.startswith(k))


def rows_of(parts_file: str) -> tuple[list[Row], dict[str, Any]]:
    rows, merged = [], {}
    with open(parts_file) as f:
        lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for name, status, seconds, path in lines:
        extra = {"wall": f"{int(seconds)}", "status": status}
        try:
            with open(path) as f:
                d = json.load(f)
            merged[os.path.basename(path)] = d
            got = READERS[_kind(path, d)](name, d)
        except FileNotFoundError:
            got = [_row(name, "-")]
        except (KeyError, StopIteration, TypeError, ValueError, ZeroDivisionError) as e:
            got = [_row(name, f"? ({type(e).__name__}: {e})")]
        rows += [{**r, **extra} for r in got]
    return rows, merged


COLUMNS = (("part", "part"), ("ours", "ours (JAX)"), ("torch", "PyTorch"), ("ratio", "ratio"),
           ("mem", "peak MiB ours / torch"), ("compile", "compile s"), ("wall", "wall s"),
           ("status", "status"))


def render(rows: list[Row]) -> str:
    widths = {k: max([len(h)] + [len(r[k]) for r in rows]) for k, h in COLUMNS}
    line = lambda cells: "| " + " | ".join(c.ljust(widths[k]) for (k, _), c in zip(COLUMNS, cells)) + " |"  # noqa: E731
    out = [line([h for _, h in COLUMNS]), "|" + "|".join("-" * (widths[k] + 2) for k, _ in COLUMNS) + "|"]
    out += [line([r[k] for k, _ in COLUMNS]) for r in rows]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts")
    p.add_argument("--out", default=None, help="also write the table here")
    p.add_argument("--merged", default=None, help="write every part's JSON into one file here")
    args = p.parse_args(argv)
    rows, merged = rows_of(args.parts)
    table = render(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.merged:
        with open(args.merged, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    main()
