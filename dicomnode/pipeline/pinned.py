"""Page-locked (pinned) host memory for batches bound for a GPU.

The CUDA driver copies pinned host memory to the device by DMA, several times faster than
pageable memory, which it first stages through a pinned bounce buffer of its own. The
runtime joins a GPU model's batches in one reused buffer per dispatcher thread; pinning
that buffer once (``cudaHostRegister``) makes every later upload of a batch from it fast.
onnxruntime's Python API offers no pinned host allocation of its own, so the CUDA runtime
library that onnxruntime-gpu loads (``onnxruntime.preload_dlls``, or the system's) is
called directly. Without it (a CPU-only install) nothing is pinned and nothing fails.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np

log = logging.getLogger("dicomnode.runtime")

# The CUDA runtime's sonames, newest first (onnxruntime-gpu 1.2x-1.3x: CUDA 12 or 13).
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
CUDA_SUCCESS = 0
HOST_REGISTER_DEFAULT = 0


@functools.cache
def cuda_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library, when one can be loaded; None otherwise."""
    for name in CUDART_NAMES:
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        library.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        library.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        return library
    log.info("CUDA runtime library not found (%s): batches are not pinned", ", ".join(CUDART_NAMES))
    return None


def pin(array: np.ndarray) -> bool:
    """Page-lock ``array``'s memory for fast uploads to the GPU; False if that is not
    possible here (no CUDA runtime, or the driver refuses). Undo with :func:`unpin` before
    the array is freed."""
    library = cuda_runtime()
    if library is None or array.nbytes == 0:
        return False
    status = library.cudaHostRegister(array.ctypes.data, array.nbytes, HOST_REGISTER_DEFAULT)
    if status != CUDA_SUCCESS:
        log.warning(
            "cudaHostRegister of a %d-byte batch buffer failed (CUDA error %d)",
            array.nbytes,
            status,
        )
        return False
    return True


def unpin(array: np.ndarray) -> None:
    """Release what :func:`pin` locked."""
    library = cuda_runtime()
    if library is not None:
        library.cudaHostUnregister(array.ctypes.data)
