"""Opening a PyTorch checkpoint without torch and without running anything it names.

A torch checkpoint is a zip archive: `<archive>/data.pkl` (a pickle), `<archive>/data/<key>`
(raw storage bytes) and `<archive>/byteorder`. A pickle is a program: every global it names
(GLOBAL / STACK_GLOBAL / INST) is looked up and may be called. Released checkpoints such as
AstroCLIP's `astroclip.ckpt` pickle whole upstream modules in their hyper-parameters, so
`torch.load(weights_only=True)` refuses them and a plain load imports upstream's packages and
runs their code. Here, instead:

1. Every pickle in the archive is scanned opcode by opcode (`pickletools.genops`) and every
   global it names is checked against the allow-list below BEFORE any unpickling starts; the
   first global not allowed is refused with one line naming it and the file. A STACK_GLOBAL
   whose module and name are not the two strings pushed just before it (directly or from the
   memo) is refused too: what cannot be read cannot be vetted.
2. The pickle is then loaded by an Unpickler whose `find_class` hands out only
   * NumPy implementations of torch's tensor rebuild functions and storage types (tensors
     become NumPy arrays read from the zip, honouring offset, size, stride and byte order;
     bfloat16 via ml_dtypes),
   * plain containers (OrderedDict, set, frozenset, slice, complex, bytes via _codecs.encode)
     and NumPy's own array/scalar reconstructors,
   * for classes and functions of upstream packages (astroclip, dinov2, lightning, torch.nn,
     torch.optim, omegaconf, ...): inert records (`Inert`) that keep their arguments and
     state and have no behaviour, so a REDUCE / NEWOBJ / BUILD on them calls no user code.
   Anything else raises, so even a global the scan missed cannot run.

Only the zip format (torch >= 1.6) is read; the legacy formats get one line saying so.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import os
import pickle
import pickletools
import sys
import types
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

from converters.common import ConversionError


class UnsafeCheckpoint(ConversionError):
    """The checkpoint names a global that could run code; nothing was executed."""


# Storage classes -> element dtype (little-endian; the archive's `byteorder` may say otherwise).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128, "UntypedStorage": np.uint8,
}

# Modules whose classes and functions become inert records (what upstream checkpoints pickle
# in hyper-parameters: the encoder modules, Lightning's AttributeDict and CLI instantiator,
# optimiser/scheduler classes, OmegaConf containers).
INERT_PACKAGES = ("astroclip", "dinov2", "lightning", "lightning_fabric", "pytorch_lightning",
                  "torch.nn", "torch.optim", "omegaconf", "jsonargparse", "torchmetrics", "typing")
# Single names that become inert records (torch.float32 as a module attribute, devices, ...).
INERT_NAMES = {"functools.partial", "argparse.Namespace", "torch.device", "torch.dtype",
               "torch.Tensor", "torch.memory_format", "torch.layout",
               # Lightning < 2.2 on torch < 2.1 (upstream pins torch 2.0) registers these as
               # state-dict hooks of every LightningModule, so SpecFormer's pickle names them.
               "torch.distributed._shard.sharded_tensor.state_dict_hook",
               "torch.distributed._shard.sharded_tensor.pre_load_state_dict_hook",
               # Lightning callbacks' state may hold paths.
               "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
               "pathlib.PureWindowsPath"} | {
    f"torch.{t}" for t in ("float64", "float32", "float16", "bfloat16", "int64", "int32",
                           "int16", "int8", "uint8", "bool", "complex64", "complex128",
                           "double", "float", "half", "long", "int", "short", "contiguous_format",
                           "preserve_format", "channels_last", "strided")}


class Inert:
    """Stands in for an upstream class or function: it records how the pickle built it and
    does nothing else (no __call__, no behaviour; `qualname` says what it stood for)."""

    qualname = "Inert"

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items: dict[Any, Any] = {}  # SETITEM(S) of a dict subclass (AttributeDict)
        self.list_items: list[Any] = []  # APPEND(S) of a list subclass
        return self

    def __init__(self, *args, **kwargs):  # REDUCE: record the call, run nothing
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


def _inert_class(full_name: str) -> type:
    return type(full_name.rpartition(".")[2], (Inert,), {"qualname": full_name,
                                                         "__module__": __name__})


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a safe load found: the inert stand-ins it made and the tensors it read."""

    archive: str  # the top folder of the zip ("archive" or the file's stem)
    byteorder: str
    inert: tuple[str, ...]  # fully qualified names replaced by inert records, sorted
    tensors: int


class _Storage:
    """One storage of the archive as a 1-D NumPy array of its element type."""

    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = array, key


class _StorageType:
    """What a storage class (torch.FloatStorage, ...) stands for: its element type."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])

    def __setstate__(self, state):  # BUILD must not swap the dtype
        raise pickle.UnpicklingError(f"BUILD on torch.{self.name} refused")


def _codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles write bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) refused")
    return text.encode(encoding)


def _allowed_numpy() -> dict[str, Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct
    scalar = np.float64(0).__reduce__()[0]  # multiarray.scalar

    def safe_reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:  # an ndarray subclass could run its own code
            raise pickle.UnpicklingError(f"numpy _reconstruct of {subtype!r} refused")
        return reconstruct(subtype, shape, dtype)

    table = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[f"{module}._reconstruct"] = safe_reconstruct
        table[f"{module}.scalar"] = scalar
    for t in set(np.sctypeDict.values()):  # NumPy 2 pickles dtypes as numpy.dtypes.Float32DType
        cls = type(np.dtype(t))
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return table


_CONTAINERS = {
    "collections.OrderedDict": collections.OrderedDict, "collections.Counter": collections.Counter,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice,
    "builtins.complex": complex, "builtins.bytearray": bytearray, "_codecs.encode": _codecs_encode,
}
# Protocol-2 pickles (torch.save's default) write Python 2's module names, which pickle maps back
# (`fix_imports`); names are checked after the same mapping.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_REBUILD = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
            "torch._tensor._rebuild_from_type_v2", "torch.Size")


def is_allowed(module: str, name: str) -> bool:
    """Whether a global may appear in a checkpoint (see the module docstring)."""
    full = f"{module}.{name}"
    if full in _CONTAINERS or full in _REBUILD or full in INERT_NAMES:
        return True
    if module == "torch" and name in _STORAGE_DTYPES:
        return True
    if module == "torch.storage" and name == "UntypedStorage":
        return True
    if full in _allowed_numpy_names():
        return True
    return any(module == p or module.startswith(p + ".") for p in INERT_PACKAGES)


@functools.cache
def _allowed_numpy_names() -> frozenset[str]:
    return frozenset(_allowed_numpy())


class _Callable:
    """A function handed to the unpickler, sealed: a BUILD opcode aimed at it (which would
    set attributes such as __defaults__ on a plain function) is refused."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on {self.fn.__name__} refused")


# ------------------------------------------------------------------------------ scanning

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def scan_globals(data: bytes, where: str) -> list[tuple[str, str, int]]:
    """Every (module, name, byte position) a pickle names, read from its opcodes without
    executing it. Raises UnsafeCheckpoint for an extension-registry opcode or a STACK_GLOBAL
    whose operands are not the strings pushed just before it."""
    found = []
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # the values of the latest stack pushes (None: not a string)
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                found.append((_PY2_MODULES.get(module, module), attr, pos))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                if len(pushed) < 2 or not all(isinstance(v, str) for v in pushed[-2:]):
                    raise UnsafeCheckpoint(
                        f"{where}: refusing to load: a STACK_GLOBAL at byte {pos} takes its name "
                        "from values that are not plain strings pushed before it, so it cannot be "
                        "checked before running; a torch.save file never does this")
                found.append((_PY2_MODULES.get(pushed[-2], pushed[-2]), pushed[-1], pos))
                pushed[-2:] = [None]
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafeCheckpoint(f"{where}: refusing to load: opcode {name} at byte {pos} "
                                       "names a global through the copyreg extension registry")
            elif name in _STRING_OPS:
                pushed.append(arg.decode("latin1") if isinstance(arg, bytes) else arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _MEMO_PUT:
                memo[arg] = pushed[-1] if pushed else None
            elif name in _MEMO_GET:
                pushed.append(memo.get(arg))
            elif name in ("PROTO", "FRAME"):
                continue
            else:  # anything else changes the stack in ways not tracked: no string on top
                pushed.append(None)
            del pushed[:-2]  # only the two latest pushes matter
    except UnsafeCheckpoint:
        raise
    except (ValueError, pickle.UnpicklingError) as e:  # genops on a damaged stream
        raise ConversionError(f"{where}: not a readable pickle ({e})") from None
    return found


def check_globals(data: bytes, where: str) -> None:
    """Refuse (UnsafeCheckpoint, one line) the first global that is not allowed."""
    for module, name, pos in scan_globals(data, where):
        if not is_allowed(module, name):
            raise UnsafeCheckpoint(
                f"{where}: refusing to load: the pickle names the global '{module}.{name}' "
                f"(byte {pos}), which could run code; only tensors, plain containers and inert "
                f"records of upstream classes ({', '.join(INERT_PACKAGES)}) are allowed")


# ----------------------------------------------------------------------------- loading

class _Unpickler(pickle.Unpickler):
    """Builds tensors as NumPy arrays and everything upstream as inert records."""

    def __init__(self, data: bytes, where: str, read_storage: Callable[[str], bytes],
                 byteorder: str):
        super().__init__(io.BytesIO(data))
        self.where, self.read_storage, self.byteorder = where, read_storage, byteorder
        self.storages: dict[str, _Storage] = {}
        self.inert: dict[str, type] = {}
        self.tensors = 0
        self.numpy = _allowed_numpy()

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if not is_allowed(module, name):  # the scan refused it already; a second lock
            raise UnsafeCheckpoint(f"{self.where}: refusing to load the global '{full}'")
        if full in _CONTAINERS:
            return _seal(_CONTAINERS[full])
        if full in self.numpy:
            return _seal(self.numpy[full])
        if (module == "torch" and name in _STORAGE_DTYPES) or full == "torch.storage.UntypedStorage":
            return _StorageType(name)
        rebuild = {"torch._utils._rebuild_tensor": self._rebuild_tensor,
                   "torch._utils._rebuild_tensor_v2": self._rebuild_tensor,
                   "torch._utils._rebuild_parameter": _rebuild_parameter,
                   "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
                   "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type,
                   "torch.Size": _torch_size}
        if full in rebuild:
            return _seal(rebuild[full])
        if full not in self.inert:
            self.inert[full] = _inert_class(full)
        return self.inert[full]

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ConversionError(f"{self.where}: unexpected persistent id {pid!r:.80} "
                                  "(expected a torch storage)")
        _, storage_type, key, _location, numel = pid  # the device is ignored: all on the CPU
        key = str(key)
        if key not in self.storages:
            raw = self.read_storage(key)
            dtype = storage_type.dtype
            if len(raw) != int(numel) * dtype.itemsize:
                raise ConversionError(f"{self.where}: storage data/{key} holds {len(raw)} bytes, "
                                      f"expected {numel} x {dtype.itemsize}")
            array = np.frombuffer(raw, dtype=dtype)
            if self.byteorder != sys.byteorder and dtype.itemsize > 1:
                array = array.byteswap()  # complex: each half swapped, as torch does
            self.storages[key] = _Storage(array, key)
        storage = self.storages[key]
        if storage.array.dtype != storage_type.dtype:
            raise ConversionError(f"{self.where}: storage data/{key} is read both as "
                                  f"{storage.array.dtype} and as {storage_type.dtype}")
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False,
                        backward_hooks=None, metadata=None) -> np.ndarray:
        del requires_grad, backward_hooks, metadata  # autograd state: nothing to convert
        if not isinstance(storage, _Storage):
            raise ConversionError(f"{self.where}: a tensor rebuilt from {type(storage).__name__}, "
                                  "expected a storage")
        size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
        data = storage.array
        if len(size) != len(stride) or offset < 0 or any(s < 0 for s in (*size, *stride)):
            raise ConversionError(f"{self.where}: tensor of size {size}, stride {stride}, "
                                  f"offset {offset} on storage {storage.key}: not a valid view")
        self.tensors += 1
        if 0 in size:
            return np.zeros(size, data.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= data.size:  # as_strided would read past the buffer
            raise ConversionError(f"{self.where}: tensor of size {size}, stride {stride}, "
                                  f"offset {offset} reaches element {last} of storage "
                                  f"{storage.key}, which has {data.size}")
        view = np.lib.stride_tricks.as_strided(
            data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride),
            writeable=False)
        return np.array(view)  # a copy: own memory, C order, no aliasing between tensors

    def _rebuild_from_type(self, func, new_type, args, state):
        del new_type, state  # Parameter or Tensor subclass: the values are what matter
        if getattr(func, "fn", func) not in (self._rebuild_tensor, _rebuild_parameter):
            raise ConversionError(f"{self.where}: _rebuild_from_type_v2 of {func!r:.60}, "
                                  "expected a tensor rebuild")
        return func(*args)


def _seal(obj: Any) -> Any:
    return _Callable(obj) if isinstance(obj, types.FunctionType) else obj


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    return data


def _torch_size(dims=()) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickle of torch's legacy magic


def load_checkpoint(path: str | os.PathLike) -> tuple[Any, LoadReport]:
    """(the checkpoint's object with tensors as NumPy arrays, LoadReport) without torch.

    Raises UnsafeCheckpoint (one line, nothing executed) for a global that is not allowed and
    ConversionError for a file that is not a readable torch zip checkpoint.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC or head[:1] == b"\x80":
            raise ConversionError(
                f"{name}: a legacy (non-zip, torch < 1.6) checkpoint, which is not supported; "
                "re-save it with torch.save from torch >= 1.6 where you trust the file")
        raise ConversionError(f"{name}: not a PyTorch checkpoint (expected a zip archive "
                              "written by torch.save)")
    try:
        with zipfile.ZipFile(path) as zf:
            return _load_zip(zf, name)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ConversionError(f"{name}: damaged checkpoint archive ({e})") from None


def _load_zip(zf: zipfile.ZipFile, name: str) -> tuple[Any, LoadReport]:
    names = zf.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ConversionError(f"{name}: expected one <archive>/data.pkl in the zip, "
                              f"found {pickles or 'none'}")
    archive = pickles[0].split("/")[0]
    if any(n.startswith(f"{archive}/code/") for n in names):
        raise ConversionError(f"{name}: a TorchScript archive, not a checkpoint")
    for other in (n for n in names if n.endswith(".pkl")):  # every pickle is vetted first
        check_globals(zf.read(other), f"{name}:{other}")
    byteorder = "little"
    if f"{archive}/byteorder" in names:
        byteorder = zf.read(f"{archive}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise ConversionError(f"{name}: byteorder record {byteorder!r}, expected little or big")

    def read_storage(key: str) -> bytes:
        entry = f"{archive}/data/{key}"
        if entry not in names:
            raise ConversionError(f"{name}: the pickle refers to storage {entry}, which the "
                                  "archive lacks (truncated?)")
        return zf.read(entry)

    unpickler = _Unpickler(zf.read(pickles[0]), name, read_storage, byteorder)
    try:
        obj = unpickler.load()
    except (pickle.UnpicklingError, EOFError, TypeError, IndexError, KeyError,
            AttributeError) as e:
        raise ConversionError(f"{name}: not a readable checkpoint pickle "
                              f"({type(e).__name__}: {e})") from None
    return obj, LoadReport(archive=archive, byteorder=byteorder,
                           inert=tuple(sorted(unpickler.inert)), tensors=unpickler.tensors)
