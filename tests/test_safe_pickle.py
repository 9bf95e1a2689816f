"""converters.safe_pickle: torch checkpoints read without torch and without running their code.

Values are compared with torch.load(weights_only=True) of the same file (the reference reader);
refusals with files that WOULD run a command: each test also shows, in a subprocess, that an
ordinary load of the same file creates the marker file, so a loader that executed anything would
fail the `not marker.exists()` check.
"""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from converters import common, safe_pickle
from converters.common import ConversionError


def _same(ours: np.ndarray, ref: torch.Tensor) -> bool:
    ref = ref.detach()
    if ref.dtype == torch.bfloat16:  # NumPy has no bfloat16: compare both widened (exact)
        ref, ours = ref.float(), np.asarray(ours, np.float32)
    return ours.shape == tuple(ref.shape) and ours.dtype == ref.numpy().dtype and np.array_equal(
        ours, ref.numpy())


def test_tensors_equal_torch_load(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen)
    shared = torch.randn(12, generator=gen)
    obj = {
        "contiguous": base, "transposed": base.t(), "offset_slice": base[2:, 3:7],
        "strided": base[::2, 1::3], "expanded": shared[:3].unsqueeze(0).expand(4, 3),
        "shared_a": shared[:6].view(2, 3), "shared_b": shared[4:], "bf16": torch.randn(4, 3).bfloat16(),
        "fp16": torch.randn(5, generator=gen).half(), "int64": torch.arange(-3, 7),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3), "float64": torch.randn(3, generator=gen, dtype=torch.float64),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "nested": collections.OrderedDict(w=[base[1], (shared[2:5],)]),
    }
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    ours, report = safe_pickle.load_checkpoint(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in ref.items():
        if key != "nested":
            assert _same(ours[key], value), key
    assert _same(ours["nested"]["w"][0], ref["nested"]["w"][0])
    assert _same(ours["nested"]["w"][1][0], ref["nested"]["w"][1][0])
    assert isinstance(ours["nested"], collections.OrderedDict)
    # Views of one storage are separate arrays: writing one leaves the other alone.
    ours["shared_a"][1, 1] = 1e9  # the element shared_b[0] also views
    assert ours["shared_b"][0] == ref["shared_b"][0].item()
    assert report.tensors == 17 and report.inert == () and report.byteorder == "little"


def test_plain_containers_and_numpy(tmp_path):
    obj = {"set": {1, 2}, "frozen": frozenset("ab"), "slice": slice(1, 5, 2), "complex": 1 + 2j,
           "bytes": b"\x00\xffabc", "np_array": np.arange(6.0).reshape(2, 3),
           "np_scalar": np.float32(2.5), "size": torch.Size([2, 3])}
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    ours, _ = safe_pickle.load_checkpoint(path)
    ref = common.torch_load(str(path), safe_globals=[frozenset, slice])  # weights_only=True
    for key in obj:
        if key == "np_array":
            np.testing.assert_array_equal(ours[key], ref[key])
        else:
            assert ours[key] == ref[key] and type(ours[key]) is (tuple if key == "size" else type(ref[key])), key


def _rewrite_zip(src, dst, change):
    """Copies a torch zip, passing each entry through change(name, data) -> data."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, change(info.filename, zin.read(info.filename)))


def test_big_endian_byteorder_record(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "i64": torch.arange(5), "f16": torch.randn(3).half()}
    little = tmp_path / "little.pt"
    torch.save(tensors, little)
    # torch.save numbers storages "0", "1", ... in pickling order (here: dict order)
    dtypes = {str(i): t.numpy().dtype for i, t in enumerate(tensors.values())}
    ours_little, _ = safe_pickle.load_checkpoint(little)

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            key = name.rsplit("/", 1)[1]
            dtype = dtypes[key]
            return np.frombuffer(data, dtype).byteswap().tobytes()
        return data

    ref = torch.load(little, weights_only=True)
    big = tmp_path / "big.pt"
    _rewrite_zip(little, big, to_big)
    ours_big, report = safe_pickle.load_checkpoint(big)
    assert report.byteorder == "big"
    for name in tensors:
        assert _same(ours_big[name], ref[name]), name
        assert _same(ours_little[name], ref[name]), name


# ----------------------------------------------------------------------- refusals

def _torch_zip(path, pickle_bytes: bytes) -> None:
    """A torch zip archive around a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")


class _Command:
    """Pickles to os.system(cmd) (os.system is posix.system)."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class _Eval:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


def _harmful(kind: str, marker: str) -> tuple[object | bytes, str]:
    """(an object for torch.save or raw pickle bytes, the global the refusal must name)."""
    cmd = f"touch {marker}"
    touch = f"open({marker!r}, 'w').close()"
    if kind == "state_dict":
        return {"state_dict": collections.OrderedDict(w=torch.zeros(2), evil=_Command(cmd))}, "posix.system"
    if kind == "hyper_parameters":  # inside a pickled module, as upstream's hyper-parameters are
        module = torch.nn.Linear(2, 2)
        module.note = [_Command(cmd)]
        return {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"encoder": module}}, "posix.system"
    if kind == "eval":
        return {"hyper_parameters": {"x": _Eval(touch)}}, "builtins.eval"
    if kind == "getattr_chain":  # getattr(__import__("os"), "system")(cmd), protocol 0
        return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
                + cmd.encode() + b"\ntR."), "builtins.getattr"
    if kind == "posix_system":
        return b"cposix\nsystem\n(V" + cmd.encode() + b"\ntR.", "posix.system"
    if kind == "stack_global_memo":  # protocol 4, module and name strings reused from the memo
        body = (b"\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93\x94" + b"\x8c" + bytes([len(cmd)])
                + cmd.encode() + b"\x85R.")
        return b"\x80\x04" + body, "os.system"
    if kind == "subprocess":
        return (b"csubprocess\ncheck_call\n((Vtouch\nV" + marker.encode() + b"\nltR."), "subprocess.check_call"
    raise ValueError(kind)


def _would_run(path, marker, raw: bool) -> None:
    """Shows the file is really harmful: an ordinary load creates the marker."""
    code = ("import pickle, sys, zipfile; pickle.loads(zipfile.ZipFile(sys.argv[1]).read('archive/data.pkl'))"
            if raw else "import sys, torch; torch.load(sys.argv[1], weights_only=False)")
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    assert os.path.exists(marker), "the crafted file does not do what the test assumes"
    os.remove(marker)


KINDS = ["state_dict", "hyper_parameters", "eval", "getattr_chain", "posix_system",
         "stack_global_memo", "subprocess"]


@pytest.mark.parametrize("kind", KINDS)
def test_harmful_global_refused_before_anything_runs(tmp_path, kind):
    marker = str(tmp_path / "MARKER")
    obj, global_name = _harmful(kind, marker)
    path = tmp_path / "evil.ckpt"
    if isinstance(obj, bytes):
        _torch_zip(path, obj)
    else:
        torch.save(obj, path)
    with pytest.raises(safe_pickle.UnsafeCheckpoint) as err:
        safe_pickle.load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and "evil.ckpt" in message and f"'{global_name}'" in message
    assert not os.path.exists(marker)
    if kind in ("state_dict", "getattr_chain", "stack_global_memo"):  # one of each writer is enough
        _would_run(path, marker, raw=isinstance(obj, bytes))


def test_unresolvable_stack_global_refused(tmp_path):
    # The module name comes out of a tuple via a memo trick, not a plain string push: the scan
    # cannot tell what it names, so it refuses (a torch.save file never does this).
    body = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x86\x94" b"h\x00h\x01\x93)R.")
    crafted = body.replace(b"h\x00h\x01\x93", b"0h\x00\x8c\x01x\x94h\x02\x93")
    path = tmp_path / "odd.ckpt"
    _torch_zip(path, crafted)
    with pytest.raises(safe_pickle.UnsafeCheckpoint, match="STACK_GLOBAL"):
        safe_pickle.load_checkpoint(path)


def test_scan_reads_every_global_torch_writes(tmp_path):
    # The opcode scan finds the same globals torch's own scanner reports for a real file.
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GELU())
    path = tmp_path / "m.pt"
    torch.save({"m": module, "t": torch.zeros(2).bfloat16()}, path)
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    ours = {f"{m}.{n}" for m, n, _ in safe_pickle.scan_globals(data, "m.pt")}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= ours
    assert "torch._utils._rebuild_tensor_v2" in ours and "torch.BFloat16Storage" in ours


def test_inert_records_run_nothing(tmp_path):
    module = torch.nn.Linear(3, 2)
    path = tmp_path / "m.pt"
    torch.save({"hyper_parameters": {"enc": module}}, path)
    obj, report = safe_pickle.load_checkpoint(path)
    enc = obj["hyper_parameters"]["enc"]
    assert isinstance(enc, safe_pickle.Inert) and not callable(enc)
    assert enc.qualname == "torch.nn.modules.linear.Linear"
    assert "torch.nn.modules.linear.Linear" in report.inert
    np.testing.assert_array_equal(enc.state["_parameters"]["weight"], module.weight.detach().numpy())
    assert enc.state["in_features"] == 3


def test_lightning_state_dict_hooks_are_inert(tmp_path):
    # Lightning on torch 2.0 (upstream's pin) registers sharded-tensor hooks on every
    # LightningModule: a pickled SpecFormer names them. They load as records, uncalled.
    from torch.distributed._shard.sharded_tensor import pre_load_state_dict_hook, state_dict_hook

    module = torch.nn.Linear(2, 2)
    module._register_state_dict_hook(state_dict_hook)
    module._register_load_state_dict_pre_hook(pre_load_state_dict_hook, True)
    path = tmp_path / "m.pt"
    torch.save({"hyper_parameters": {"backbone": module}}, path)
    obj, report = safe_pickle.load_checkpoint(path)
    assert "torch.distributed._shard.sharded_tensor.state_dict_hook" in report.inert
    assert "torch.distributed._shard.sharded_tensor.pre_load_state_dict_hook" in report.inert
    assert isinstance(obj["hyper_parameters"]["backbone"], safe_pickle.Inert)


def test_legacy_and_foreign_files_are_one_line(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="legacy") as err:
        safe_pickle.load_checkpoint(legacy)
    assert "\n" not in str(err.value) and "legacy.pt" in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConversionError, match="not a PyTorch checkpoint"):
        safe_pickle.load_checkpoint(text)


def test_truncated_storage_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.randn(4, 4)}, path)
    cut = tmp_path / "cut.pt"
    _rewrite_zip(path, cut, lambda name, data: data[:-8] if "/data/" in name else data)
    with pytest.raises(ConversionError, match="holds 56 bytes, expected 16 x 4") as err:
        safe_pickle.load_checkpoint(cut)
    assert "\n" not in str(err.value)


def test_view_past_its_storage_refused(tmp_path):
    # A pickle claiming a (4, 4) view of a 12-element storage must not read past the buffer.
    path = tmp_path / "x.pt"
    torch.save({"w": torch.randn(3, 4)}, path)

    def grow(name, data):
        return data.replace(b"K\x03K\x04\x86", b"K\x04K\x04\x86") if name.endswith("data.pkl") else data

    bad = tmp_path / "bad.pt"
    _rewrite_zip(path, bad, grow)
    with pytest.raises(ConversionError, match="reaches element 15"):
        safe_pickle.load_checkpoint(bad)


def test_upstream_formats_load_without_upstream_packages(tmp_path):
    from upstream_checkpoints import write_checkpoints

    paths = write_checkpoints(str(tmp_path), "test", seed=1)
    for name, path in paths.items():
        obj, report = safe_pickle.load_checkpoint(path)
        state = obj["teacher"] if name == "astrodino.ckpt" else obj["state_dict"]
        with np.load(path + ".reference.npz") as ref:
            assert list(state) == list(ref.files)
            for key in ref.files:
                assert np.array_equal(state[key], ref[key]) and state[key].dtype == ref[key].dtype, key
        if name == "astroclip.ckpt":
            assert {"astroclip.models.astroclip.ImageHead", "astroclip.models.specformer.SpecFormer",
                    "dinov2.models.vision_transformer.DinoVisionTransformer",
                    "lightning.pytorch.cli.instantiate_module"} <= set(report.inert)
            # torch itself refuses this file without running upstream's code
            with pytest.raises(pickle.UnpicklingError):
                torch.load(path, weights_only=True)
    # Loading needs neither torch nor upstream's packages (a fresh interpreter shows it).
    code = ("import sys; from converters import astroclip, safe_pickle; "
            "obj, report = safe_pickle.load_checkpoint(sys.argv[1]); "
            "print(sorted({'torch', 'astroclip', 'dinov2', 'lightning'} & set(sys.modules)))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, paths["astroclip.ckpt"]], capture_output=True,
                         text=True, cwd=repo, env={**os.environ, "PYTHONPATH": repo}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
