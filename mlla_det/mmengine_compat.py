"""Let torch >= 2.6 load the checkpoints mmengine 0.10 writes, without turning off weights_only.

torch >= 2.6 calls ``torch.load`` with ``weights_only=True`` by default, and mmengine 0.10.7 never
says otherwise. Its runner checkpoints hold more than tensors: the ``message_hub`` state keeps
``HistoryBuffer`` objects (numpy arrays inside, plus their statistics methods pickled as
``getattr(HistoryBuffer, 'mean')``) and numpy scalars (eta, best_score, metrics), so ``--resume``
and ``tools/test.py`` on such a checkpoint stop with an UnpicklingError.

Rather than loading every file with ``weights_only=False`` (arbitrary code execution for a
malicious file), this allowlists exactly the globals the runner writes. They were found by saving
a checkpoint with a real Runner (AdamW, LinearLR + MultiStepLR, validation with save_best, EMA)
and loading it with ``weights_only=True`` until it loaded; tests/test_mmengine_compat.py repeats
that round trip.
"""
import importlib
import pickle

import numpy as np
import torch

__all__ = ["allow_mmengine_checkpoints", "mmengine_safe_globals"]

# numpy 2 moved numpy.core to numpy._core, and checkpoints name the module their writer had.
# Registering the same objects under both names lets either kind of checkpoint load.
_NUMPY_CORE_NAMES = ("numpy._core.multiarray", "numpy.core.multiarray")

# The numeric dtypes a runner's logs and metrics hold (float64 history buffers, int64 counts,
# float32/integer metric values). ``np.dtype(...)`` pickles as numpy.dtype plus a BUILD of the
# concrete dtype class, which weights_only only allows for listed classes.
_NUMERIC_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                   "uint64", "float16", "float32", "float64")

# HistoryBuffer's own statistics (mmengine/logging/history_buffer.py _set_default_statistics).
_HISTORY_BUFFER_STATISTICS = ("min", "max", "current", "mean")

_installed = False


def _numpy_multiarray():
    for name in _NUMPY_CORE_NAMES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {_NUMPY_CORE_NAMES} can be imported from numpy {np.__version__}")


def history_buffer_statistics_getattr(owner, name):
    """Stands in for ``builtins.getattr`` while unpickling, limited to what mmengine writes.

    A HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
    Allowing the real getattr would let a crafted file walk from any allowed object to arbitrary
    callables, so only HistoryBuffer's statistics methods resolve here."""
    from mmengine.logging import HistoryBuffer

    allowed = set(_HISTORY_BUFFER_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in allowed:
        # UnpicklingError, so torch.load reports it like any other weights_only refusal.
        raise pickle.UnpicklingError(
            f"checkpoint asks for getattr({owner!r}, {name!r}); with weights_only=True mlla_det "
            f"only allows HistoryBuffer's statistics methods {sorted(allowed)} there. Load the "
            f"file with weights_only=False only if you trust where it came from.")
    return getattr(HistoryBuffer, name)


def mmengine_safe_globals():
    """The globals mmengine 0.10's runner checkpoints need, as ``add_safe_globals`` entries
    (objects, or (object, pickled name) pairs where the pickled name differs from the object's)."""
    from mmengine.logging import HistoryBuffer

    multiarray = _numpy_multiarray()
    entries = [HistoryBuffer, np.ndarray, np.dtype]
    entries += sorted({type(np.dtype(name)) for name in _NUMERIC_DTYPES}, key=lambda cls: cls.__name__)
    for module_name in _NUMPY_CORE_NAMES:
        entries.append((multiarray._reconstruct, f"{module_name}._reconstruct"))
        entries.append((multiarray.scalar, f"{module_name}.scalar"))
    entries.append((history_buffer_statistics_getattr, "builtins.getattr"))
    return entries


def _torch_loads_weights_only_by_default():
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 6)


def allow_mmengine_checkpoints():
    """Allowlist the mmengine/numpy globals of runner checkpoints for ``weights_only`` loading.
    Idempotent; a no-op on torch < 2.6, which loads with weights_only=False by default."""
    global _installed
    if _installed or not _torch_loads_weights_only_by_default():
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _installed = True
