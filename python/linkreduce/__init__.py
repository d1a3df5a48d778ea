"""linkreduce: the all-reduce of tensor-parallel inference on one node of
NVIDIA GPUs, with kernels that read peers' memory directly over NVLink.

Two layers:

- ``linkreduce.torch.CustomAllreduce``: the PyTorch API (vLLM's custom
  all-reduce, set up over a ``torch.distributed`` group), with the
  all-reduce fused with residual add and RMSNorm, and reduce-scatter and
  all-gather in torch.distributed's argument order. Imported on first
  use; needs PyTorch.
- ``linkreduce.Communicator``: the plain API on raw device addresses and
  CUDA stream handles, for any framework (CuPy, JAX through DLPack). Needs
  no PyTorch.

Errors of the library raise ``LinkreduceError`` (a ``RuntimeError``) with
the library's message; bad arguments raise ``ValueError`` or ``TypeError``.
``python -m linkreduce.bench`` (under torchrun) times linkreduce beside NCCL
and torch's symmetric-memory all-reduces.
"""

from ._linkreduce import (
    ALGORITHMS,
    DTYPES,
    Communicator,
    LinkreduceError,
    validate_all_gather,
    validate_all_reduce,
    validate_all_reduce_add_rms_norm,
    validate_reduce_scatter,
    version,
)

__version__ = version()

__all__ = [
    "ALGORITHMS",
    "DTYPES",
    "Communicator",
    "LinkreduceError",
    "validate_all_gather",
    "validate_all_reduce",
    "validate_all_reduce_add_rms_norm",
    "validate_reduce_scatter",
    "version",
]


def __getattr__(name):
    # `linkreduce.torch` imports PyTorch, which takes seconds: only when asked.
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
