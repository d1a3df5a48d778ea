"""linkreduce for PyTorch: ``CustomAllreduce``, in the manner of vLLM's
custom all-reduce.

    ca = CustomAllreduce(group)             # collective, on every rank
    y = ca.all_reduce(x)                    # sum over the group's ranks
    ca.all_reduce(x, out=x)                 # in place
    with ca.capture():                      # CUDA graphs: zero-copy replays
        with torch.cuda.graph(graph):
            y = ca.all_reduce(x)
    ca.close()                              # collective; or `with CustomAllreduce(...) as ca:`

Calls go on ``torch.cuda.current_stream()``. Contiguous f32, f16 and bf16
CUDA tensors (at any storage offset, of any length) up to ``max_size``
bytes take the custom path; every other tensor goes through
``torch.distributed.all_reduce`` on the same group, so a call always works.

PyTorch is imported when a ``CustomAllreduce`` is built, not when this
module is: ``import linkreduce.torch`` works without it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

from ._linkreduce import Communicator, LinkreduceError, validate_all_reduce

__all__ = ["CustomAllreduce", "GroupAllGather", "DEFAULT_MAX_SIZE"]

#: Largest message (bytes) of the custom path by default, as in vLLM: larger
#: ones go through torch.distributed (NCCL), which is faster there today.
DEFAULT_MAX_SIZE = 8 * 1024 * 1024


def _import_torch():
    try:
        import torch
        import torch.distributed
    except ImportError as error:
        raise ImportError(
            "linkreduce.torch needs PyTorch (pip install torch); the plain API, "
            "linkreduce.Communicator, works without it"
        ) from error
    return torch


def _error(message, kind):
    error = LinkreduceError(message)
    error.kind = kind
    return error


class GroupAllGather:
    """``all_gather(bytes) -> list of bytes`` over a ``torch.distributed``
    group, in group-rank order: how ``CustomAllreduce`` meets its peers.

    It all-gathers byte tensors (first their lengths, then the bytes padded
    to the longest), not pickled objects (``all_gather_object``): nothing
    received is unpickled, and the same code serves every backend. A group
    with a CPU backend (gloo, or a combined one such as
    ``"cpu:gloo,cuda:nccl"``) exchanges CPU tensors; an NCCL-only group
    exchanges CUDA tensors on ``device`` (NCCL has no CPU path), which also
    works, since linkreduce calls this only outside graph capture. A gloo
    group notices a dead peer at once; NCCL waits for its own timeout.
    """

    def __init__(self, group, device):
        torch = _import_torch()
        dist = torch.distributed
        self.group = group
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        cpu_capable = any(name in backend for name in ("gloo", "mpi", "ucc"))
        self.device = torch.device("cpu") if cpu_capable else torch.device(device)

    def __call__(self, data):
        torch = _import_torch()
        dist = torch.distributed
        guard = (
            torch.cuda.device(self.device)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with guard:
            length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            lengths = [torch.empty_like(length) for _ in range(self.world_size)]
            dist.all_gather(lengths, length, group=self.group)
            lengths = [int(n.item()) for n in lengths]
            longest = max(lengths + [1])
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            mine = mine.to(self.device)
            gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(gathered, mine, group=self.group)
            return [bytes(t[:n].cpu().tolist()) for t, n in zip(gathered, lengths)]


def _cuda_device(torch, device):
    """The CUDA device `device` names (None: the current one)."""
    if not torch.cuda.is_available():
        raise _error(
            "CustomAllreduce needs an NVIDIA GPU, and torch.cuda.is_available() is False "
            "(no GPU, no driver, or a PyTorch built without CUDA)",
            "NoDevice",
        )
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"CustomAllreduce runs on a CUDA device, not {device}")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tcp_port(port):
    """The port of the TCP rendezvous without a group: `port`, else
    LINKREDUCE_PORT, else MASTER_PORT + 1 (torchrun's agent listens on
    MASTER_PORT itself), else None (the library then asks for MASTER_PORT).
    """
    if port is not None:
        return port
    if "LINKREDUCE_PORT" in os.environ:
        return int(os.environ["LINKREDUCE_PORT"])
    if "MASTER_PORT" in os.environ:
        return int(os.environ["MASTER_PORT"]) + 1
    return None


class CustomAllreduce:
    """All-reduce (sum) over the GPUs of one node, with linkreduce's kernels
    for the tensors they take and ``torch.distributed.all_reduce`` for the
    rest.

    ``group``: the ``torch.distributed`` process group to reduce over (all
    its ranks on this node, one GPU each); None means the default group
    when ``torch.distributed`` is initialized. Set-up exchanges a few bytes
    over it (``GroupAllGather``); a gloo group (vLLM's ``cpu_group``) or a
    ``"cpu:gloo,cuda:nccl"`` one is best, an NCCL group works too. Without
    an initialized ``torch.distributed`` and without a group, the ranks meet
    over linkreduce's TCP rendezvous from torchrun's variables (RANK,
    WORLD_SIZE, MASTER_ADDR; port ``port``, LINKREDUCE_PORT or MASTER_PORT +
    1), and there is no group to fall back to.

    ``device``: this rank's GPU (int, "cuda:N" or torch.device; None: the
    current device, or LOCAL_RANK's with the TCP rendezvous). ``max_size``: the largest message in bytes of the
    custom path. ``algorithm``: "auto", "one-stage", "two-stage" or "push".
    ``timeout_s``: how long a kernel waits for a dead or hung peer before the
    call fails naming it (default 5 s). Building it is collective.

    A group of one rank, or of more than 8, disables the custom path
    (``disabled`` is True): every call goes through torch.distributed.
    """

    def __init__(
        self,
        group=None,
        device=None,
        max_size=DEFAULT_MAX_SIZE,
        *,
        algorithm="auto",
        timeout_s=None,
        port=None,
    ):
        torch = _import_torch()
        dist = torch.distributed
        self._torch = torch
        self._comm = None
        self._capturing = False
        self._nccl_sizes = {}
        self._nccl_only = None
        self.disabled = True
        self.max_size = int(max_size)
        if self.max_size < 0:
            raise ValueError(f"max_size must be a non-negative number of bytes, got {max_size}")
        validate_all_reduce("f32", 0, 0, 0, algorithm)  # raises ValueError if unknown
        self.algorithm = algorithm
        self._names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
        initialized = dist.is_available() and dist.is_initialized()
        if group is not None and not initialized:
            raise ValueError("a group was given but torch.distributed is not initialized")
        self.group = group if group is not None else (dist.group.WORLD if initialized else None)
        named = device
        self.device = _cuda_device(torch, device)
        if self.group is not None:
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
            if not 2 <= self.world_size <= 8:
                if self.world_size > 8:
                    warnings.warn(
                        f"CustomAllreduce: linkreduce's kernels cover 2 to 8 ranks, the group "
                        f"has {self.world_size}; every call goes through torch.distributed",
                        stacklevel=2,
                    )
                return
            gather = GroupAllGather(self.group, self.device)
            with torch.cuda.device(self.device):
                self._comm = Communicator.with_all_gather(
                    self.rank, self.world_size, self.device.index, gather, timeout_s=timeout_s
                )
        else:
            # Like torchrun's ranks, the TCP rendezvous picks the GPU from
            # LOCAL_RANK unless a device is named.
            index = None if named is None else self.device.index
            self._comm = Communicator.from_env(index, port=_tcp_port(port), timeout_s=timeout_s)
            self.device = torch.device("cuda", self._comm.device)
            self.rank = self._comm.rank
            self.world_size = self._comm.world_size
        self.disabled = False

    def should_custom_ar(self, tensor):
        """Whether ``all_reduce(tensor)`` goes through linkreduce (else
        torch.distributed): an open communicator, f32 / f16 / bf16, on this
        rank's GPU, contiguous (any storage offset, any length), at most
        ``max_size`` bytes, and, with a group to fall back to, a size that
        takes linkreduce's kernels (``path_for``): sizes that its automatic
        choice sends to NCCL go to the group's NCCL instead."""
        nbytes = tensor.numel() * tensor.element_size()
        return (
            self._comm is not None
            and tensor.dtype in self._names
            and tensor.device == self.device
            and tensor.is_contiguous()
            and nbytes <= self.max_size
            and not (self.group is not None and self._takes_nccl(nbytes))
        )

    def _takes_nccl(self, nbytes):
        """Whether a call of ``nbytes`` would take linkreduce's NCCL path
        (the same on every rank; remembered per size). A forced algorithm
        takes the kernels, unless they cannot serve the group at all."""
        if self.algorithm != "auto":
            if self._nccl_only is None:
                self._nccl_only = self._comm.nccl_only()
            return self._nccl_only
        known = self._nccl_sizes.get(nbytes)
        if known is None:
            known = self._nccl_sizes[nbytes] = self._comm.algorithm_for(nbytes) == "nccl"
        return known

    def all_reduce(self, tensor, out=None):
        """The sum of ``tensor`` over the group's ranks, into ``out`` (a new
        tensor when None; ``out=tensor`` for in place). Returns ``out``.

        Enqueued on ``torch.cuda.current_stream()``, with no host wait; every
        rank must make the same calls in the same order. A peer that died or
        hangs makes this or a later call (or ``synchronize()``) raise
        LinkreduceError naming it, within ``timeout_s``.
        """
        if out is not None and (
            out.shape != tensor.shape or out.dtype != tensor.dtype or out.device != tensor.device
        ):
            raise ValueError(
                f"out ({out.dtype}, {tuple(out.shape)}, {out.device}) must match the input "
                f"({tensor.dtype}, {tuple(tensor.shape)}, {tensor.device})"
            )
        if self.should_custom_ar(tensor) and (out is None or out.is_contiguous()):
            if out is None:
                out = self._torch.empty_like(tensor, memory_format=self._torch.contiguous_format)
            self._custom(tensor, out)
            return out
        return self._fallback(tensor, out)

    def _custom(self, tensor, out):
        torch = self._torch
        if not self._capturing and torch.cuda.is_current_stream_capturing():
            raise _error(
                "CustomAllreduce.all_reduce is being captured into a CUDA graph outside "
                "CustomAllreduce.capture(); capture inside `with ca.capture():` so that the "
                "graph's buffers are registered when the capture ends",
                "InvalidConfig",
            )
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._comm.all_reduce(
            self._names[tensor.dtype],
            tensor.data_ptr(),
            out.data_ptr(),
            tensor.numel(),
            stream=stream,
            algorithm=self.algorithm,
        )

    def _fallback(self, tensor, out):
        dist = self._torch.distributed
        if self.group is None:
            raise _error(
                f"this tensor ({tensor.dtype}, {tensor.numel()} elements on {tensor.device}, "
                f"contiguous: {tensor.is_contiguous()}) cannot take linkreduce's path and there "
                "is no torch.distributed group to fall back to; initialize torch.distributed "
                "or pass a group",
                "InvalidConfig",
            )
        if out is tensor and tensor.is_contiguous():
            dist.all_reduce(tensor, group=self.group)
            return tensor
        reduced = tensor.clone(memory_format=self._torch.contiguous_format)
        dist.all_reduce(reduced, group=self.group)
        if out is None:
            return reduced
        out.copy_(reduced)
        return out

    @contextlib.contextmanager
    def capture(self):
        """Wraps the capture of CUDA graphs that contain ``all_reduce``
        calls (``with ca.capture(): with torch.cuda.graph(g): ...``). On exit
        it registers the buffers the captured calls read, so that replays
        read them in place (collective). ``release_graph_buffers()`` lets
        peers free them once the graphs are gone."""
        if self._capturing:
            raise RuntimeError("CustomAllreduce.capture() does not nest")
        self._capturing = True
        try:
            yield self
        except BaseException:
            self._capturing = False
            # The other ranks register on leaving their capture: join them,
            # so that none waits for this rank, then raise what happened.
            if self._comm is not None:
                with contextlib.suppress(Exception):
                    self._comm.register_graph_buffers()
            raise
        self._capturing = False
        if self._comm is not None:
            self._comm.register_graph_buffers()

    def register_graph_buffers(self):
        """What ``capture()`` does on exit, for captures made without it."""
        return 0 if self._comm is None else self._comm.register_graph_buffers()

    def release_graph_buffers(self):
        """Once every graph captured so far is destroyed: unmaps peers'
        buffers so that they may be freed. Collective."""
        if self._comm is not None:
            self._comm.release_graph_buffers()

    def synchronize(self):
        """Waits for the calls enqueued so far; raises LinkreduceError
        naming a peer that timed out in them."""
        if self._comm is not None:
            self._comm.synchronize()

    def algorithm_for(self, nbytes):
        """The path an automatic call of ``nbytes`` bytes takes in
        linkreduce: a kernel's algorithm or "nccl" (None when linkreduce is
        off)."""
        return None if self._comm is None else self._comm.algorithm_for(nbytes)

    def close(self):
        """Ends the custom path (collective: every rank closes at the same
        point; a dead peer does not make it wait). Later calls go through
        torch.distributed, or fail without a group. Closing again does
        nothing."""
        comm, self._comm = self._comm, None
        self.disabled = True
        if comm is not None:
            comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __repr__(self):
        state = "disabled" if self._comm is None else f"device={self.device}"
        return (
            f"CustomAllreduce(rank={getattr(self, 'rank', None)}, "
            f"world_size={getattr(self, 'world_size', None)}, {state}, max_size={self.max_size})"
        )
