"""embedding_ext: a drop-in ``torch.nn.Embedding`` whose lookup, gradients and renorm run in
our own C++ and CUDA kernels (registered as ``torch.ops.embedding_ext.*``).

    import embedding_ext as ee
    emb = ee.Embedding(50257, 768, padding_idx=0)   # same constructor as nn.Embedding
    out = ee.embedding(ids, weight)                  # same signature as F.embedding
"""
import importlib
import os

import torch

from ._version import __version__

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "embedding_ext: the compiled module embedding_ext._C is missing or does not load "
        f"({exc}). Build it with `pip install --no-build-isolation -e .` (or `make build`) "
        "in the repository, against the torch you import (docs/install.md)."
    ) from exc

try:
    _C_cuda = importlib.import_module("._C_cuda", __name__)  # registers the CUDA kernels
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}._C_cuda":
        raise
    _C_cuda = None  # a build without the CUDA kernels

for _binary in filter(None, (_C, _C_cuda)):
    if _binary.torch_version != torch.__version__:
        raise ImportError(
            f"embedding_ext: the compiled kernels ({_binary.__name__}) were built against "
            f"torch {_binary.torch_version}, but torch {torch.__version__} is imported. "
            "Rebuild with `pip install --no-build-isolation -e .` against this torch."
        )

from .errors import EmbeddingIndexError  # noqa: E402

for _binary in filter(None, (_C, _C_cuda)):
    _binary._set_index_error_class(EmbeddingIndexError)  # the class the kernels raise

from . import ops  # noqa: E402  (registers fake kernels)
from . import optim  # noqa: E402
from .autograd import EmbeddingBagFunction, EmbeddingFunction  # noqa: E402
from .collection import EmbeddingBagCollection, EmbeddingBagConfig  # noqa: E402
from .embedding_collection import EmbeddingCollection, EmbeddingConfig  # noqa: E402
from .functional import embedding, embedding_bag  # noqa: E402
from .fused import FusedOptimizer, fuse_optimizer  # noqa: E402
from .module import Embedding, EmbeddingBag  # noqa: E402
from .quantized import (QuantizedEmbedding, QuantizedEmbeddingBag,  # noqa: E402
                        quantize_embeddings)
from .swap import replace_embeddings, restore_embeddings  # noqa: E402


def build_info() -> dict[str, object]:
    """How the loaded binary was built: backends, CUDA arch list, torch version."""
    return {
        "torch_version": _C.torch_version,
        "backends": ["cpu"] + (["cuda"] if _C_cuda else []),
        "cuda_arch_list": _C_cuda.cuda_arch_list if _C_cuda else None,
        "openmp": _C.with_openmp,
    }


# ---------------------------------------------------------------------------------------
# Runtime controls (csrc/python_module.cpp, csrc/cuda/python_module.cpp). Each environment variable below only sets the
# initial value of a control that these functions change at any time.

def check_cuda_index_errors() -> None:
    """Wait for the GPU and raise :class:`EmbeddingIndexError` (an ``IndexError`` and a
    ``RuntimeError``) if any embedding_ext CUDA kernel met an out-of-range index since the
    last check (see docs/cuda-bad-indices.md)."""
    if _C_cuda and torch.cuda.is_available():
        message = _C_cuda.take_cuda_index_error()
        if message:
            raise EmbeddingIndexError(message)


_sync_checks_without_cuda = False


def set_synchronous_index_checks(enabled: bool) -> None:
    """With ``True``, every CUDA call waits for its kernels and raises
    :class:`EmbeddingIndexError` from the call that met a bad index (costs a host synchronisation per call). Initially off, or
    on with ``EMBEDDING_EXT_SYNC_INDEX_CHECKS=1``. The CPU always raises from the call."""
    global _sync_checks_without_cuda
    if _C_cuda:
        _C_cuda.set_synchronous_index_checks(bool(enabled))
    else:
        _sync_checks_without_cuda = bool(enabled)


def synchronous_index_checks() -> bool:
    """Whether synchronous CUDA index checks are on (see :func:`set_synchronous_index_checks`)."""
    return _C_cuda.synchronous_index_checks() if _C_cuda else _sync_checks_without_cuda


def set_cpu_output_cache_limit(megabytes: float) -> None:
    """Keep at most this many MiB of freed large CPU outputs for reuse (0: keep none).

    Large CPU outputs (>= 1 MiB: gathered rows, dense gradients) are taken from a cache of
    recently freed buffers, which avoids the page faults of fresh memory (docs/lookup.md,
    "CPU memory"). Initially ``EMBEDDING_EXT_CPU_CACHE_MB`` (default 1024)."""
    if not megabytes >= 0:
        raise ValueError(f"set_cpu_output_cache_limit: 'megabytes' must be >= 0, got {megabytes}")
    _C.set_cpu_output_cache_limit(int(megabytes * 2**20))


def release_cpu_output_cache() -> None:
    """Return every freed CPU output buffer that the cache holds to the OS."""
    _C.release_cpu_output_cache()


def cpu_output_cache_bytes() -> int:
    """Bytes of freed CPU output buffers the cache currently holds."""
    return _C.cpu_output_cache_bytes()


set_synchronous_index_checks(os.environ.get("EMBEDDING_EXT_SYNC_INDEX_CHECKS", "0") == "1")

__all__ = [
    "__version__",
    "Embedding",
    "EmbeddingBag",
    "EmbeddingFunction",
    "EmbeddingBagFunction",
    "EmbeddingBagCollection",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "EmbeddingIndexError",
    "embedding",
    "embedding_bag",
    "optim",
    "fuse_optimizer",
    "FusedOptimizer",
    "replace_embeddings",
    "restore_embeddings",
    "QuantizedEmbedding",
    "QuantizedEmbeddingBag",
    "quantize_embeddings",
    "build_info",
    "check_cuda_index_errors",
    "set_synchronous_index_checks",
    "synchronous_index_checks",
    "set_cpu_output_cache_limit",
    "release_cpu_output_cache",
    "cpu_output_cache_bytes",
]
