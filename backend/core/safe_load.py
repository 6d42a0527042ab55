"""Refuse a weights file whose pickle would run code when ultralytics loads it.

ultralytics loads ``.pt`` files with ``torch.load(weights_only=False)``: a full unpickle, so a
checkpoint can name any importable function (``os.system``, ``subprocess.Popen``, ``builtins.eval``)
and have it called. Our registry's versions are written by our own trainings and trusted by where
they live; every other weights file (a tag's ``model_path`` under ``MODEL_ROOT``,
``LABELLOOP_BASE_MODEL``) is checked here first by ``check_weights``.

The check unpickles the checkpoint's pickles (``data.pkl`` of torch's zip format, or the pickles of
the legacy format) with an unpickler whose ``find_class`` hands out inert stand-ins, so nothing of
the checkpoint runs during the check. Each global the pickle names must be one of:

* **callable**: torch's own ``weights_only`` allow-list (tensor and storage rebuilders, dtypes,
  ``collections.OrderedDict``...) plus a few plain value types checkpoints hold (paths, numpy
  arrays, ultralytics' settings namespace). These may be called while loading.
* **construct-only**: model layer classes (``torch.nn.Module`` subclasses from ``torch.nn.modules``
  and ``ultralytics.nn``; ultralytics' loss and assigner classes; classification transforms). The
  pickle may create them the way ``torch.save`` does (``__new__`` then the saved state) but never call
  them: calling ``DetectionModel(cfg)`` would parse a model yaml, which can ``eval`` text.

A module prefix alone is not enough: ``torch.hub.load``, ``ultralytics.YOLO("https://...")`` or
``ultralytics.utils.checks.check_requirements`` live under the trusted prefixes and fetch or run
code. Anything else is refused with ``UnsafeWeightsError`` naming the global.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import io
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

from labelloop.core.labelconfig import LabelConfigError

# Plain value types a checkpoint may hold besides torch's list; calling them builds a value, nothing more.
_EXTRA_CALLABLE = frozenset({
    "builtins.frozenset", "builtins.slice", "builtins.range", "builtins.bytes", "builtins.dict", "builtins.list",
    "builtins.tuple", "builtins.int", "builtins.float", "builtins.str", "builtins.bool", "builtins.object",
    "collections.defaultdict", "collections.deque",
    "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
    "types.SimpleNamespace", "argparse.Namespace", "datetime.datetime", "datetime.date", "datetime.timedelta",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "ultralytics.utils.IterableSimpleNamespace", "ultralytics.yolo.utils.IterableSimpleNamespace",
    "torchvision.transforms.functional.InterpolationMode",
})
# Where layer classes come from (any depth below these modules), and old ultralytics module paths
# that ultralytics itself maps to the current ones when it loads a checkpoint (nn/tasks.py).
_LAYER_MODULES = ("torch.nn.modules", "ultralytics.nn")
_CLASS_MODULES = ("ultralytics.utils.loss", "ultralytics.utils.tal", "torchvision.transforms.transforms")
_RENAMED_MODULES = {"ultralytics.yolo.utils": "ultralytics.utils", "ultralytics.yolo.v8": "ultralytics.models.yolo",
                    "ultralytics.yolo.data": "ultralytics.data"}
_RENAMED = {"ultralytics.nn.modules.block.Silence": "torch.nn.Identity",
            "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
            "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss"}
# Export formats ultralytics loads without unpickling (TorchScript has its own restricted loader).
_NOT_PICKLED = frozenset({".yaml", ".yml", ".onnx", ".engine", ".tflite", ".pb", ".mlmodel", ".torchscript",
                          ".xml", ".bin", ".param"})
_MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl holds structure only (tensors are separate records)
_LEGACY_PICKLES = 5  # legacy torch.save: magic number, protocol, sys info, the object, storage keys


class UnsafeWeightsError(LabelConfigError):
    """A weights file that would run code (or cannot be read as a checkpoint) when loaded.

    A ``LabelConfigError``: like a missing ``model_path``, the service answers it as a 422 with this
    message and a training reports it as its reason."""

    kind = "unsafe_weights"


def check_weights(path: str | Path, trusted_roots: tuple[str | Path, ...] | None = None) -> None:
    """Raise ``UnsafeWeightsError`` unless loading ``path`` can only rebuild a model.

    Files under ``trusted_roots`` (default: the registry's ``MODEL_DIR/projects``, where only our
    own trainings write) are not checked. A file that passed is remembered by path, inode, size and
    mtime, so a model loaded again costs nothing; a replaced file is checked again.
    """
    path = Path(path)
    if path.suffix.lower() in _NOT_PICKLED:
        return
    resolved = path.resolve()
    if trusted_roots is None:
        from labelloop.config import settings

        trusted_roots = (settings().model_dir / "projects",)  # Registry.project_dir's parent
    if any(resolved.is_relative_to(Path(root).resolve()) for root in trusted_roots):
        return
    try:
        st = resolved.stat()
    except OSError as exc:
        raise UnsafeWeightsError(f"cannot read weights {path}: {exc.strerror or exc}") from None
    key = (str(resolved), st.st_ino, st.st_size, st.st_mtime_ns)
    with _passed_lock:
        if key in _passed:
            return
    checkpoint_globals(resolved)  # raises on the first refused global
    with _passed_lock:
        _passed.add(key)


_passed: set[tuple] = set()
_passed_lock = threading.Lock()


def checkpoint_globals(path: str | Path) -> list[str]:
    """Every global the checkpoint's pickles name, in order; raises on one that is not allowed."""
    path = Path(path)
    try:
        # Decide the format exactly as torch.load does, so the check reads what torch will read:
        # a zip only when the file starts with a zip local header, then the legacy tar, then pickles.
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                fh.seek(0)
                return _scan_zip(fh, path)
        if tarfile.is_tarfile(path):  # torch < 0.4's format: unpickled from tar members; nobody needs it
            raise UnsafeWeightsError(f"{path} is a legacy tar checkpoint, which is not supported; re-save it")
        with open(path, "rb") as fh:
            return _scan(fh, _LEGACY_PICKLES, str(path))
    except OSError as exc:
        raise UnsafeWeightsError(f"cannot read weights {path}: {exc.strerror or exc}") from None
    except zipfile.BadZipFile as exc:
        raise UnsafeWeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None


def _scan_zip(fh, path: Path) -> list[str]:
    with zipfile.ZipFile(fh) as archive:
        # torch.load reads <archive>/data.pkl; every pickle entry is read, duplicate names included
        # (a crafted zip can hold two entries of one name, and readers need not pick the same one)
        entries = [e for e in archive.infolist() if e.filename.endswith(".pkl")]
        if not any(e.filename.rsplit("/", 1)[-1] == "data.pkl" for e in entries):
            raise UnsafeWeightsError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl)")
        found: list[str] = []
        for entry in entries:
            if entry.file_size > _MAX_PICKLE_BYTES:  # the structure only: tensors are separate entries
                raise UnsafeWeightsError(f"{path}:{entry.filename} is larger than a checkpoint's pickle")
            found += _scan(io.BytesIO(archive.read(entry)), 1, f"{path}:{entry.filename}")
        return found


def _scan(stream, pickles: int, where: str) -> list[str]:
    unpickler = _InertUnpickler(stream, where)
    for index in range(pickles):
        try:
            unpickler.load()
        except UnsafeWeightsError:
            raise
        except EOFError:
            if index == 0:
                raise UnsafeWeightsError(f"{where} is empty, not a PyTorch checkpoint") from None
            break
        except Exception as exc:  # any other failure means torch.load would not read it either
            raise UnsafeWeightsError(f"{where} is not a readable PyTorch checkpoint "
                                     f"({type(exc).__name__}: {exc})") from None
    return unpickler.seen


@functools.lru_cache(maxsize=4096)
def _policy(full: str) -> str | None:
    """'call', 'construct' or None (refused) for a global named ``module.name``."""
    full = _RENAMED.get(full, full)
    for old, new in _RENAMED_MODULES.items():
        if full.startswith(old + "."):
            full = new + full[len(old):]
    if full in _EXTRA_CALLABLE or full in _torch_allowed():
        return "call"
    module, _, name = full.rpartition(".")
    layer = any(module == m or module.startswith(m + ".") for m in _LAYER_MODULES)
    if not (layer or module in _CLASS_MODULES) or name.startswith("_"):
        return None
    try:  # only modules of the trusted packages are imported, never one the pickle merely names
        obj = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    if not isinstance(obj, type):
        return None
    if layer:
        import torch

        return "construct" if issubclass(obj, torch.nn.Module) else None
    return "construct" if obj.__module__ == module else None


_allowed_cache: frozenset[str] | None = None


def _torch_allowed() -> frozenset[str]:
    """torch's own weights_only allow-list (what ``torch.load(weights_only=True)`` may call)."""
    global _allowed_cache
    if _allowed_cache is None:
        try:
            from torch import _weights_only_unpickler

            names = frozenset(_weights_only_unpickler._get_allowed_globals())
        except (ImportError, AttributeError):  # another torch: the essentials, by hand
            names = frozenset({"collections.OrderedDict", "builtins.set", "torch._utils._rebuild_tensor_v2",
                               "torch._utils._rebuild_parameter", "torch.Size", "torch.device",
                               "torch.storage.UntypedStorage", "torch.FloatStorage", "torch.HalfStorage",
                               "torch.float16", "torch.float32", "_codecs.encode"})
        _allowed_cache = names
    return _allowed_cache


class _Inert:
    """What an allowed global's call (or a storage reference) yields during the check: nothing runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass

    def __call__(self, *args, **kwargs):
        # the real load would call an object the pickle built (a module's forward, a bound method...)
        raise UnsafeWeightsError("the checkpoint calls an object it built while loading; refused")


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, stream, where: str):
        super().__init__(stream)
        self.where = where
        self.seen: list[str] = []

    def find_class(self, module: str, name: str):
        # protocol-2 pickles (torch.save's) name Python 2 modules (__builtin__.set); map them as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        policy = _policy(full)
        if policy is None:
            raise UnsafeWeightsError(
                f"{self.where} refers to {full}, which is not a model class or tensor type: loading it could run "
                f"arbitrary code, so it is refused (only load weights you trust; retrain or re-save them with "
                f"ultralytics)")
        self.seen.append(full)
        return _Inert if policy == "call" else _construct_only(full, self.where)

    def persistent_load(self, pid):
        return _Inert()  # a tensor's storage: its bytes are never read here


def _construct_only(full: str, where: str) -> type:
    """A stand-in class that ``__new__`` (how torch.save rebuilds a module) accepts but a call refuses."""

    class ConstructOnly(_Inert):
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

        def __init__(self, *args, **kwargs):
            raise UnsafeWeightsError(f"{where} calls {full}(...) while loading (runs its constructor, which can "
                                     f"parse and eval a model config); a checkpoint only restores its state")

    return ConstructOnly
