"""linkreduce for PyTorch: ``CustomAllreduce``, in the manner of vLLM's
custom all-reduce.

    ca = CustomAllreduce(group)             # collective, on every rank
    y = ca.all_reduce(x)                    # sum over the group's ranks
    ca.all_reduce(x, out=x)                 # in place
    h = ca.all_reduce_add_rms_norm(x, residual, weight, 1e-6)
                                            # residual += sum; h = rmsnorm(residual) * weight
    ca.reduce_scatter_tensor(out, x)        # torch.distributed's argument order
    ca.all_gather_into_tensor(out, x)
    with ca.capture():                      # CUDA graphs: zero-copy replays
        with torch.cuda.graph(graph):
            y = ca.all_reduce(x)
    ca.close()                              # collective; or `with CustomAllreduce(...) as ca:`

Calls go on ``torch.cuda.current_stream()``. Contiguous f32, f16 and bf16
CUDA tensors (at any storage offset, of any length) up to ``max_size``
bytes take the custom path (the fused norm: f16 and bf16); every other
call goes through ``torch.distributed`` on the same group, so a call
always works.

PyTorch is imported when a ``CustomAllreduce`` is built, not when this
module is: ``import linkreduce.torch`` works without it.
"""

from __future__ import annotations

import contextlib
import math
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


def _extent(tensor):
    """The bytes ``[start, end)`` that ``tensor`` may touch: its whole span,
    for strided views too (conservative, never too small)."""
    if tensor.numel() == 0:
        return 0, 0
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + span * tensor.element_size()


def _overlap(a, b):
    (a_start, a_end), (b_start, b_end) = _extent(a), _extent(b)
    return a.device == b.device and a_start < b_end and b_start < a_end


def _same_view(a, b):
    """Whether ``a`` and ``b`` are the same elements in the same order."""
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _describe(tensor):
    return f"{tensor.dtype}, {tuple(tensor.shape)}, {tensor.device}"


class CustomAllreduce:
    """All-reduce (sum) over the GPUs of one node, with linkreduce's kernels
    for the tensors they take and ``torch.distributed.all_reduce`` for the
    rest; also the all-reduce fused with residual add and RMSNorm
    (``all_reduce_add_rms_norm``), and ``reduce_scatter_tensor`` and
    ``all_gather_into_tensor`` with torch.distributed's arguments.

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
    current device, or LOCAL_RANK's with the TCP rendezvous). ``max_size``:
    the largest message in bytes of the custom path (for reduce-scatter and
    all-gather, the larger buffer). ``algorithm``: "auto", "one-stage",
    "two-stage", "push" or "chunked-push" (reduce-scatter and all-gather have one kernel,
    which any forced name takes).
    ``timeout_s``: how long a kernel waits for a dead or hung peer before the
    call fails naming it (default 5 s). Building it is collective.

    A group of one rank, or of more than 8, disables the custom path
    (``disabled`` is True): every call goes through torch.distributed. The
    fallbacks of ``reduce_scatter_tensor`` and ``all_gather_into_tensor``
    need a group whose backend has them for CUDA tensors (NCCL, or
    ``"cpu:gloo,cuda:nccl"``).
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
        self._nccl_paths = {}
        self._nccl_only = None
        self.disabled = True
        self.max_size = int(max_size)
        if self.max_size < 0:
            raise ValueError(f"max_size must be a non-negative number of bytes, got {max_size}")
        validate_all_reduce("f32", 0, 0, 0, algorithm)  # raises ValueError if unknown
        self.algorithm = algorithm
        self._names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
        self._norm_names = {torch.float16: "f16", torch.bfloat16: "bf16"}
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
        return self._takes_custom((tensor,), self._names, "all_reduce", nbytes)

    def should_custom_norm(self, tensor, residual, weight, out=None):
        """Whether ``all_reduce_add_rms_norm`` with these tensors goes
        through linkreduce: as ``should_custom_ar(tensor)``, for f16 and
        bf16 only, with residual, weight and ``out`` (unless it is
        ``tensor``) contiguous on this rank's GPU too."""
        tensors = (tensor, residual, weight)
        if out is not None and not _same_view(out, tensor):
            tensors += (out,)
        nbytes = tensor.numel() * tensor.element_size()
        return self._takes_custom(tensors, self._norm_names, "all_reduce", nbytes)

    def should_custom_scatter_gather(self, output, input):
        """Whether ``reduce_scatter_tensor(output, input)`` or
        ``all_gather_into_tensor(output, input)`` goes through linkreduce:
        as ``should_custom_ar``, for both tensors, with ``max_size`` going by
        the larger one (the path is the same at every size)."""
        nbytes = max(output.numel(), input.numel()) * input.element_size()
        return self._takes_custom((output, input), self._names, "scatter_gather", nbytes)

    def _takes_custom(self, tensors, dtypes, kind, nbytes):
        return (
            self._comm is not None
            and all(
                t.dtype in dtypes and t.device == self.device and t.is_contiguous()
                for t in tensors
            )
            and nbytes <= self.max_size
            and not (self.group is not None and self._takes_nccl(kind, nbytes))
        )

    def _takes_nccl(self, kind, nbytes):
        """Whether a call of ``nbytes`` would take linkreduce's NCCL path
        (the same on every rank; remembered): ``kind`` is "all_reduce" (the
        fused norm follows the all-reduce's path, which depends on the
        size) or "scatter_gather" (one path at every size). A forced
        algorithm takes the kernels, unless they cannot serve the group at
        all."""
        if self.algorithm != "auto":
            if self._nccl_only is None:
                self._nccl_only = self._comm.nccl_only()
            return self._nccl_only
        key = (kind, nbytes if kind == "all_reduce" else None)
        known = self._nccl_paths.get(key)
        if known is None:
            if kind == "all_reduce":
                path = self._comm.algorithm_for(nbytes)
            else:
                path = self._comm.scatter_gather_algorithm()
            known = self._nccl_paths[key] = path == "nccl"
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
                f"out ({_describe(out)}) must match the input ({_describe(tensor)})"
            )
        if self.should_custom_ar(tensor) and (out is None or out.is_contiguous()):
            if out is None:
                out = self._torch.empty_like(tensor, memory_format=self._torch.contiguous_format)
            self._comm.all_reduce(
                self._names[tensor.dtype],
                tensor.data_ptr(),
                out.data_ptr(),
                tensor.numel(),
                stream=self._stream("all_reduce"),
                algorithm=self.algorithm,
            )
            return out
        return self._fallback(tensor, out)

    def _stream(self, method):
        """The handle of ``torch.cuda.current_stream()``, for a call of
        ``method``; refuses a capture outside ``capture()``, whose graph
        would replay with peers' buffers never registered."""
        torch = self._torch
        if not self._capturing and torch.cuda.is_current_stream_capturing():
            raise _error(
                f"CustomAllreduce.{method} is being captured into a CUDA graph outside "
                "CustomAllreduce.capture(); capture inside `with ca.capture():` so that the "
                "graph's buffers are registered when the capture ends",
                "InvalidConfig",
            )
        return torch.cuda.current_stream(self.device).cuda_stream

    def _need_group(self, tensor):
        if self.group is None:
            raise _error(
                f"this call ({_describe(tensor)}, contiguous: {tensor.is_contiguous()}) cannot "
                "take linkreduce's path and there is no torch.distributed group to fall back "
                "to; initialize torch.distributed or pass a group",
                "InvalidConfig",
            )

    def _fallback(self, tensor, out):
        dist = self._torch.distributed
        self._need_group(tensor)
        if out is tensor and tensor.is_contiguous():
            dist.all_reduce(tensor, group=self.group)
            return tensor
        reduced = tensor.clone(memory_format=self._torch.contiguous_format)
        dist.all_reduce(reduced, group=self.group)
        if out is None:
            return reduced
        out.copy_(reduced)
        return out

    def all_reduce_add_rms_norm(self, tensor, residual, weight, eps, out=None):
        """The all-reduce fused with a residual add and RMSNorm over the
        last dimension: ``residual += all_reduce(tensor)`` in place, then
        ``out = residual / sqrt(mean(residual**2, -1) + eps) * weight``.
        Returns ``out`` (a new tensor when None; ``out=tensor`` writes the
        result over the input, as vLLM's ``fused_add_rms_norm`` does).

        ``tensor``, ``residual`` and ``out``: one shape ``[..., hidden]``,
        dtype and device; ``weight``: ``[hidden]`` of that dtype; ``eps``:
        a finite, non-negative float. Tensors ``should_custom_norm`` takes
        (f16 or bf16, contiguous, at most ``max_size`` bytes) run
        linkreduce's kernels as one fused kernel, whichever algorithm the
        size takes; they round alike (docs/fused.md), so every rank and
        algorithm gets the same bits. Other calls (f32, non-contiguous
        tensors, larger messages, sizes or groups linkreduce leaves to
        NCCL) run
        ``torch.distributed.all_reduce`` and then the same arithmetic in
        torch, which is not bit-identical to the kernels: the residual add
        rounds alike, but torch sums the squares in another order and uses
        its own rsqrt, so ``out`` may differ in the last bit. Enqueued and
        collective as ``all_reduce`` (graphs included, inside ``capture()``).
        """
        self._check_norm(tensor, residual, weight, eps, out)
        eps = float(eps)
        if not self.should_custom_norm(tensor, residual, weight, out):
            return self._fallback_norm(tensor, residual, weight, eps, out)
        torch = self._torch
        # The kernels never write over the input they read (peers read it
        # too): a result meant for the input goes through a temporary.
        over_input = out is not None and _same_view(out, tensor)
        target = out
        if out is None or over_input:
            target = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        self._comm.all_reduce_add_rms_norm(
            self._norm_names[tensor.dtype],
            tensor.data_ptr(),
            residual.data_ptr(),
            target.data_ptr(),
            tensor.numel(),
            weight.data_ptr(),
            weight.numel(),
            eps,
            stream=self._stream("all_reduce_add_rms_norm"),
            algorithm=self.algorithm,
        )
        if over_input:
            return out.copy_(target)
        return target

    def _check_norm(self, tensor, residual, weight, eps, out):
        """What neither path of the fused norm takes: ValueError before any
        work, the same on both."""
        torch = self._torch
        if not tensor.is_floating_point():
            raise ValueError(f"RMSNorm needs floating-point tensors, not {tensor.dtype}")
        if tensor.dim() == 0 or tensor.shape[-1] == 0:
            raise ValueError(
                f"the input ({_describe(tensor)}) must be [..., hidden] with hidden > 0: RMSNorm "
                "normalises the last dimension"
            )
        for name, other in (("residual", residual), ("out", out)):
            if other is not None and (
                other.shape != tensor.shape
                or other.dtype != tensor.dtype
                or other.device != tensor.device
            ):
                raise ValueError(f"{name} ({_describe(other)}) must match the input "
                                 f"({_describe(tensor)})")
        hidden = tensor.shape[-1]
        if (
            tuple(weight.shape) != (hidden,)
            or weight.dtype != tensor.dtype
            or weight.device != tensor.device
        ):
            raise ValueError(
                f"weight ({_describe(weight)}) must be [{hidden}] (the input's last dimension), "
                f"of the input's dtype, on its device"
            )
        eps = float(eps)
        if not (math.isfinite(eps) and 0 <= eps <= torch.finfo(torch.float32).max):
            raise ValueError(f"eps is {eps}; RMSNorm needs a finite, non-negative eps (an f32)")
        pairs = [("residual", residual, "input", tensor), ("residual", residual, "weight", weight)]
        if out is not None:
            pairs += [("out", out, "residual", residual), ("out", out, "weight", weight)]
            if not _same_view(out, tensor):
                pairs.append(("out", out, "input", tensor))
        for first, a, second, b in pairs:
            if _overlap(a, b):
                raise ValueError(
                    f"the {first} and the {second} overlap; they must be separate tensors (out "
                    "may be the input itself)"
                )

    def _fallback_norm(self, tensor, residual, weight, eps, out):
        torch = self._torch
        residual.add_(self._fallback(tensor, None))
        # Statistics in f32 (or wider), one rounding at the end, as the
        # kernels do; not their summation order (see the docstring).
        wide = residual.to(torch.promote_types(residual.dtype, torch.float32))
        inv_rms = torch.rsqrt(wide.square().mean(dim=-1, keepdim=True) + eps)
        normed = (wide * inv_rms * weight.to(wide.dtype)).to(tensor.dtype)
        if out is None:
            return normed
        return out.copy_(normed)

    def reduce_scatter_tensor(self, output, input):
        """Like ``torch.distributed.reduce_scatter_tensor(output, input)``
        (sum) on the group: ``input`` holds world_size x ``output.numel()``
        elements, in memory order (``[world_size * n, ...]`` or
        ``[world_size, n, ...]``), and rank r's ``output`` receives the sum
        over ranks of block r of every rank's input. In place in NCCL's
        layout: ``output`` is this rank's block of ``input``
        (``input.chunk(world_size)[rank]`` of a contiguous input). Returns
        ``output``.

        linkreduce's kernels take f32, f16 and bf16 tensors that
        ``should_custom_scatter_gather`` takes; they sum in rank order in
        f32 and round once, as the all-reduce does (on two ranks the same
        bits as NCCL). Other calls go through torch.distributed. Enqueued
        and collective as ``all_reduce`` (graphs included).
        """
        return self._scatter_gather("reduce_scatter_tensor", output, input)

    def all_gather_into_tensor(self, output, input):
        """Like ``torch.distributed.all_gather_into_tensor(output, input)``
        on the group: ``output`` holds world_size x ``input.numel()``
        elements, and block r of it receives rank r's ``input``, bit for
        bit. In place in NCCL's layout: ``input`` is this rank's block of
        ``output``. Returns ``output``; otherwise as
        ``reduce_scatter_tensor``.
        """
        return self._scatter_gather("all_gather_into_tensor", output, input)

    def _scatter_gather(self, method, output, input):
        """``method`` (torch.distributed's name) on linkreduce's kernels or
        through torch.distributed."""
        reduce = method == "reduce_scatter_tensor"
        larger, smaller = (input, output) if reduce else (output, input)
        if output.dtype != input.dtype or output.device != input.device:
            raise ValueError(f"{method}: output ({_describe(output)}) and input "
                             f"({_describe(input)}) must have one dtype and device")
        if larger.numel() != smaller.numel() * self.world_size:
            raise ValueError(
                f"{method}: the {'input' if reduce else 'output'} has {larger.numel()} elements; "
                f"it must hold world_size ({self.world_size}) x the "
                f"{'output' if reduce else 'input'}'s {smaller.numel()}"
            )
        if _overlap(larger, smaller) and not self._own_block(smaller, larger):
            raise ValueError(
                f"{method}: output and input overlap; they must be separate, or in NCCL's "
                f"in-place layout ({'output' if reduce else 'input'} = this rank's block of "
                f"the {'input' if reduce else 'output'}, both contiguous)"
            )
        if not self.should_custom_scatter_gather(output, input):
            return self._fallback_scatter_gather(method, output, input)
        call = self._comm.reduce_scatter if reduce else self._comm.all_gather
        call(
            self._names[input.dtype],
            input.data_ptr(),
            output.data_ptr(),
            smaller.numel(),
            stream=self._stream(method),
            algorithm=self.algorithm,
        )
        return output

    def _own_block(self, smaller, larger):
        """Whether ``smaller`` is this rank's block of ``larger``: NCCL's
        in-place layout."""
        offset = self.rank * smaller.numel() * smaller.element_size()
        return (
            smaller.is_contiguous()
            and larger.is_contiguous()
            and smaller.data_ptr() == larger.data_ptr() + offset
        )

    def _fallback_scatter_gather(self, method, output, input):
        """torch.distributed's ``method`` on flat views, so that it takes
        the shapes the kernels take (any, by element count) on every
        backend (gloo, unlike NCCL, compares shapes)."""
        torch = self._torch
        self._need_group(input)
        source = input.reshape(-1)
        if output.is_contiguous():
            target = output.view(-1)
        else:
            target = torch.empty(output.numel(), dtype=output.dtype, device=output.device)
        getattr(torch.distributed, method)(target, source, group=self.group)
        if not output.is_contiguous():
            output.copy_(target.view(output.shape))
        return output

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
