"""CustomAllreduce on GPUs, under torchrun (one process per GPU):

    torchrun --nproc-per-node 2 python/tests/test_torch_gpu.py            # correctness
    torchrun --nproc-per-node 2 python/tests/test_torch_gpu.py --kill     # a dead rank

Checks, against torch.distributed (NCCL) on the same group:

- all_reduce: every dtype on random non-integer data at odd lengths,
  tensors at storage offsets, in place, a CUDA graph replayed 1000 times
  with new inputs, the fallback for an int32 and a non-contiguous tensor,
  and bitwise agreement between ranks. With two ranks NCCL adds the same
  two values in f32 and rounds once, as linkreduce does, so results must
  match it bitwise.
- all_reduce_add_rms_norm (f16, bf16; odd hidden sizes): output and
  residual bitwise the same on every rank and equal to every forced
  algorithm's (one-stage, two-stage and push fuse; "nccl" runs NCCL's
  all-reduce, then the norm kernel: the unfused sequence, compared on two
  ranks, where NCCL's sum is the kernels'); the residual updated in place
  (bitwise residual + NCCL's sum on two ranks); the output close to an f32
  torch reference (not bitwise: docs/fused.md's summation order is not
  torch's); views at storage offsets, the output over the input, a graph,
  and the torch fallback for f32 and non-contiguous tensors.
- reduce_scatter_tensor and all_gather_into_tensor: bitwise equal to
  NCCL's (random data on two ranks, where the sum of two values rounded
  once is NCCL's too; small integers on more, exact in any order) at odd
  counts, views at storage offsets, NCCL's in-place layouts, a 2-D layout,
  a graph, and the fallback for int32 and a non-contiguous output.

``--kill``: rank 1 leaves without calling; rank 0 must get LinkreduceError
naming it within the deadline. Every rank prints its verdicts; the exit
status is non-zero when any check failed.
"""

import argparse
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist

from linkreduce import LinkreduceError
from linkreduce.torch import CustomAllreduce

LENGTHS = (1, 7, 8, 4097, 65536 + 3, (1 << 20) + 5)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Verdicts:
    def __init__(self, rank):
        self.rank = rank
        self.failed = []

    def check(self, name, ok, detail=""):
        print(f"[rank {self.rank}] {'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}",
              flush=True)
        if not ok:
            self.failed.append(name)


def random_input(shape, dtype, seed, rank):
    """Non-integer values of mixed sign and magnitude, different per rank."""
    generator = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank)
    values = torch.randn(shape, generator=generator, device="cuda", dtype=torch.float32)
    scale = torch.exp2(torch.randint(-8, 9, shape, generator=generator, device="cuda").float())
    return (values * scale).to(dtype)


def digest(tensor):
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def same_on_every_rank(tensor, group):
    mine = digest(tensor)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return all(d == mine for d in everyone)


def reference(tensor):
    expected = tensor.clone()
    dist.all_reduce(expected)
    return expected


def bitwise_equal(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def correctness(ca, verdicts, cpu_group):
    rank = dist.get_rank()
    for dtype in DTYPES:
        for length in LENGTHS:
            name = f"{dtype} x {length}"
            x = random_input((length,), dtype, length, rank)
            expected = reference(x)
            out = ca.all_reduce(x)
            torch.cuda.synchronize()
            verdicts.check(f"{name}: equals NCCL bitwise", bitwise_equal(out, expected))
            verdicts.check(f"{name}: same on every rank", same_on_every_rank(out, cpu_group))
            verdicts.check(f"{name}: took the custom path", ca.should_custom_ar(x) == (
                length * x.element_size() <= ca.max_size))
            # A view at an odd storage offset, in place.
            big = random_input((length + 11,), dtype, length + 1, rank)
            view = big[3 : 3 + length]
            before = big.clone()
            expected = reference(view.clone())
            ca.all_reduce(view, out=view)
            torch.cuda.synchronize()
            verdicts.check(f"{name}: in place at offset 3 equals NCCL", bitwise_equal(view, expected))
            untouched = bitwise_equal(big[:3], before[:3]) and bitwise_equal(
                big[3 + length :], before[3 + length :])
            verdicts.check(f"{name}: elements around the view unchanged", untouched)


def fallbacks(ca, verdicts):
    rank = dist.get_rank()
    ints = torch.arange(1000, device="cuda", dtype=torch.int32) * (rank + 1)
    verdicts.check("int32 goes through torch.distributed", not ca.should_custom_ar(ints))
    verdicts.check("int32 sums right", torch.equal(ca.all_reduce(ints), reference(ints)))
    matrix = random_input((64, 48), torch.bfloat16, 5, rank)
    transposed = matrix.t()
    verdicts.check("a non-contiguous tensor goes through torch.distributed",
                   not ca.should_custom_ar(transposed))
    verdicts.check("a non-contiguous tensor sums right",
                   bitwise_equal(ca.all_reduce(transposed), reference(transposed.contiguous())))


def graphs(ca, verdicts, replays):
    rank = dist.get_rank()
    length = 65536 + 3
    static_in = random_input((length,), torch.bfloat16, 1, rank)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ca.all_reduce(static_in)  # warm-up outside the graph, as torch asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with ca.capture():
        with torch.cuda.graph(graph):
            static_out = ca.all_reduce(static_in)
    wrong = 0
    for replay in range(replays):
        static_in.copy_(random_input((length,), torch.bfloat16, 100 + replay, rank))
        expected = reference(static_in)
        graph.replay()
        torch.cuda.synchronize()
        if not bitwise_equal(static_out, expected):
            wrong += 1
    verdicts.check(f"a graph replayed {replays} times with new inputs equals NCCL", wrong == 0,
                   f"{wrong} replays wrong")
    del graph
    ca.release_graph_buffers()


EPS = 1e-6
# (rows, hidden): odd hidden sizes, one row, more rows than blocks.
NORM_SHAPES = ((1, 4096), (8, 4095), (5, 8192), (3, 7), (130, 1000))
NORM_DTYPES = (torch.float16, torch.bfloat16)
SG_COUNTS = (1, 7, 8, 4097, 65536 + 3)


def shared_input(shape, dtype, seed):
    """Random values that every rank holds alike (residual, weight)."""
    return random_input(shape, dtype, seed, 0)


def summable_input(shape, dtype, seed, rank):
    """Values whose sum over ranks NCCL and linkreduce must get bitwise:
    random non-integers on two ranks (one f32 add, rounded once, in either
    order), small integers beyond (exact in any order)."""
    if dist.get_world_size() == 2:
        return random_input(shape, dtype, seed, rank)
    generator = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank)
    return torch.randint(-3, 4, shape, generator=generator, device="cuda").to(dtype)


def norm_reference(residual, weight):
    """RMSNorm in f32 torch: what the kernels approximate to an ulp."""
    wide = residual.float()
    return wide * torch.rsqrt(wide.square().mean(-1, keepdim=True) + EPS) * weight.float()


def close_to_norm(out, residual, weight):
    return torch.allclose(out.float(), norm_reference(residual, weight),
                          rtol=torch.finfo(out.dtype).eps, atol=1e-6)


def residual_right(residual, expected):
    """Bitwise on two ranks (NCCL's sum rounds as the kernels'), close beyond."""
    if dist.get_world_size() == 2:
        return bitwise_equal(residual, expected)
    return torch.allclose(residual.float(), expected.float(),
                          rtol=2 * torch.finfo(residual.dtype).eps, atol=1e-6)


def norm_weight(hidden, dtype, seed):
    """Non-integers in [0.5, 1.5), alike on every rank: a norm's weights,
    which keep f16 outputs (up to sqrt(hidden) x weight) finite."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return (0.5 + torch.rand((hidden,), generator=generator, device="cuda")).to(dtype)


def norm_inputs(rows, hidden, dtype, seed, rank):
    """Input (per rank), residual and weight (alike on every rank)."""
    x = random_input((rows, hidden), dtype, seed, rank)
    return x, shared_input((rows, hidden), dtype, seed + 1), norm_weight(hidden, dtype, seed + 2)


def fused_norm(ca, forced, verdicts, cpu_group):
    """`forced`: communicators forced to each algorithm, by name."""
    rank = dist.get_rank()
    for dtype in NORM_DTYPES:
        for rows, hidden in NORM_SHAPES:
            name = f"fused norm {dtype} {rows}x{hidden}"
            x, residual0, weight = norm_inputs(rows, hidden, dtype, rows * 10007 + hidden, rank)
            residual = residual0.clone()
            verdicts.check(f"{name}: takes the custom path",
                           ca.should_custom_norm(x, residual, weight))
            expected_residual = residual0 + reference(x)
            out = ca.all_reduce_add_rms_norm(x, residual, weight, EPS)
            torch.cuda.synchronize()
            verdicts.check(f"{name}: residual updated in place",
                           residual_right(residual, expected_residual))
            verdicts.check(f"{name}: output close to an f32 reference",
                           close_to_norm(out, residual, weight))
            same_out = same_on_every_rank(out, cpu_group)
            same_residual = same_on_every_rank(residual, cpu_group)
            verdicts.check(f"{name}: output and residual the same on every rank",
                           same_out and same_residual)
            for algorithm, other in forced.items():
                if algorithm == "nccl" and dist.get_world_size() > 2:
                    continue  # NCCL sums more ranks in its own order
                other_residual = residual0.clone()
                other_out = other.all_reduce_add_rms_norm(x, other_residual, weight, EPS)
                torch.cuda.synchronize()
                verdicts.check(f"{name}: equals {algorithm} bitwise",
                               bitwise_equal(out, other_out)
                               and bitwise_equal(residual, other_residual))


def fused_views(ca, verdicts):
    """Views at odd storage offsets, and the output over the input, give
    the bits contiguous fresh tensors give; nothing around a view moves."""
    rank = dist.get_rank()
    rows, hidden = 6, 4095
    n = rows * hidden
    for dtype in NORM_DTYPES:
        name = f"fused norm {dtype} {rows}x{hidden}"
        x, residual0, weight = norm_inputs(rows, hidden, dtype, 71, rank)
        expected_residual = residual0.clone()
        expected = ca.all_reduce_add_rms_norm(x, expected_residual, weight, EPS)
        buffers = [torch.zeros(n + 9, dtype=dtype, device="cuda") for _ in range(3)]
        weights = torch.zeros(hidden + 3, dtype=dtype, device="cuda")
        x_view = buffers[0][3 : 3 + n].view(rows, hidden)
        residual_view = buffers[1][1 : 1 + n].view(rows, hidden)
        out_view = buffers[2][5 : 5 + n].view(rows, hidden)
        weight_view = weights[1 : 1 + hidden]
        x_view.copy_(x)
        residual_view.copy_(residual0)
        weight_view.copy_(weight)
        before = [b.clone() for b in buffers + [weights]]
        returned = ca.all_reduce_add_rms_norm(x_view, residual_view, weight_view, EPS, out=out_view)
        torch.cuda.synchronize()
        verdicts.check(f"{name}: views at offsets take the custom path",
                       ca.should_custom_norm(x_view, residual_view, weight_view, out_view))
        verdicts.check(f"{name}: views at offsets equal fresh tensors bitwise",
                       returned is out_view and bitwise_equal(out_view, expected)
                       and bitwise_equal(residual_view, expected_residual))
        # (buffer, its copy before, the range the call writes, if any)
        written = [(0, 0), (1, 1 + n), (5, 5 + n), (0, 0)]
        untouched = all(
            bitwise_equal(after[:start], old[:start]) and bitwise_equal(after[end:], old[end:])
            for after, old, (start, end) in zip(buffers + [weights], before, written))
        verdicts.check(f"{name}: input, weight and elements around the views unchanged",
                       untouched)
        over_input = x.clone()
        residual = residual0.clone()
        returned = ca.all_reduce_add_rms_norm(over_input, residual, weight, EPS, out=over_input)
        torch.cuda.synchronize()
        verdicts.check(f"{name}: out=input equals a separate output bitwise",
                       returned is over_input and bitwise_equal(over_input, expected)
                       and bitwise_equal(residual, expected_residual))


def fused_graph(ca, verdicts, replays):
    """A captured fused call replayed with new inputs and residuals gives
    the eager call's bits."""
    rank = dist.get_rank()
    rows, hidden, dtype = 8, 4095, torch.bfloat16
    static_x, static_residual, weight = norm_inputs(rows, hidden, dtype, 5, rank)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as torch asks
        ca.all_reduce_add_rms_norm(static_x, static_residual.clone(), weight, EPS)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with ca.capture():
        with torch.cuda.graph(graph):
            static_out = ca.all_reduce_add_rms_norm(static_x, static_residual, weight, EPS)
    wrong = 0
    for replay in range(replays):
        x, residual, _ = norm_inputs(rows, hidden, dtype, 1000 + replay, rank)
        static_x.copy_(x)
        static_residual.copy_(residual)
        graph.replay()
        expected = ca.all_reduce_add_rms_norm(x, residual, weight, EPS)
        torch.cuda.synchronize()
        if not (bitwise_equal(static_out, expected) and bitwise_equal(static_residual, residual)):
            wrong += 1
    verdicts.check(f"a fused-norm graph replayed {replays} times equals eager calls", wrong == 0,
                   f"{wrong} replays wrong")
    del graph
    ca.release_graph_buffers()


def fused_fallbacks(ca, verdicts):
    rank = dist.get_rank()
    x, residual0, weight = norm_inputs(4, 512, torch.float32, 9, rank)
    residual = residual0.clone()
    verdicts.check("fused norm: f32 goes through torch",
                   not ca.should_custom_norm(x, residual, weight))
    out = ca.all_reduce_add_rms_norm(x, residual, weight, EPS)
    verdicts.check("fused norm: f32 fallback right",
                   torch.allclose(residual, residual0 + reference(x))
                   and close_to_norm(out, residual, weight))
    transposed = random_input((64, 48), torch.bfloat16, 10, rank).t()  # rows of 64, strided
    residual0 = shared_input((48, 64), torch.bfloat16, 11)
    weight = norm_weight(64, torch.bfloat16, 12)
    residual = residual0.clone()
    verdicts.check("fused norm: a non-contiguous input goes through torch",
                   not ca.should_custom_norm(transposed, residual, weight))
    out = ca.all_reduce_add_rms_norm(transposed, residual, weight, EPS)
    verdicts.check("fused norm: non-contiguous fallback right",
                   residual_right(residual, residual0 + reference(transposed.contiguous()))
                   and close_to_norm(out, residual, weight))


def scatter_gather(ca, verdicts, cpu_group):
    rank, world = dist.get_rank(), dist.get_world_size()
    for dtype in DTYPES:
        for count in SG_COUNTS:
            name = f"{dtype} x {count}"
            size = torch.tensor([], dtype=dtype).element_size()
            # reduce-scatter, separate buffers
            send = summable_input((world * count,), dtype, count, rank)
            expected = torch.empty(count, dtype=dtype, device="cuda")
            dist.reduce_scatter_tensor(expected, send.clone())
            recv = torch.empty(count, dtype=dtype, device="cuda")
            verdicts.check(f"reduce_scatter {name}: took the custom path",
                           ca.should_custom_scatter_gather(recv, send)
                           == (world * count * size <= ca.max_size))
            ca.reduce_scatter_tensor(recv, send)
            torch.cuda.synchronize()
            verdicts.check(f"reduce_scatter {name}: equals NCCL bitwise",
                           bitwise_equal(recv, expected))
            # views at odd offsets
            big_send = torch.zeros(world * count + 8, dtype=dtype, device="cuda")
            big_recv = torch.zeros(count + 8, dtype=dtype, device="cuda")
            big_send[3 : 3 + world * count].copy_(send)
            before = big_recv.clone()
            ca.reduce_scatter_tensor(big_recv[5 : 5 + count], big_send[3 : 3 + world * count])
            torch.cuda.synchronize()
            verdicts.check(f"reduce_scatter {name}: views at offsets equal NCCL, around unchanged",
                           bitwise_equal(big_recv[5 : 5 + count], expected)
                           and bitwise_equal(big_recv[:5], before[:5])
                           and bitwise_equal(big_recv[5 + count :], before[5 + count :]))
            # NCCL's in-place layout: the output is this rank's block of the input
            buffer = send.clone()
            own = buffer[rank * count : (rank + 1) * count]
            ca.reduce_scatter_tensor(own, buffer)
            torch.cuda.synchronize()
            verdicts.check(f"reduce_scatter {name}: in place equals NCCL",
                           bitwise_equal(own, expected))
            # all-gather, separate buffers
            mine = random_input((count,), dtype, count + 1, rank)
            expected = torch.empty(world * count, dtype=dtype, device="cuda")
            dist.all_gather_into_tensor(expected, mine)
            gathered = ca.all_gather_into_tensor(
                torch.empty(world * count, dtype=dtype, device="cuda"), mine)
            torch.cuda.synchronize()
            verdicts.check(f"all_gather {name}: equals NCCL bitwise",
                           bitwise_equal(gathered, expected))
            verdicts.check(f"all_gather {name}: same on every rank",
                           same_on_every_rank(gathered, cpu_group))
            big_send = torch.zeros(count + 8, dtype=dtype, device="cuda")
            big_recv = torch.zeros(world * count + 8, dtype=dtype, device="cuda")
            big_send[1 : 1 + count].copy_(mine)
            before = big_recv.clone()
            ca.all_gather_into_tensor(big_recv[3 : 3 + world * count], big_send[1 : 1 + count])
            torch.cuda.synchronize()
            end = 3 + world * count
            verdicts.check(f"all_gather {name}: views at offsets equal NCCL, around unchanged",
                           bitwise_equal(big_recv[3:end], expected)
                           and bitwise_equal(big_recv[:3], before[:3])
                           and bitwise_equal(big_recv[end:], before[end:]))
            buffer = torch.zeros(world * count, dtype=dtype, device="cuda")
            buffer[rank * count : (rank + 1) * count].copy_(mine)
            ca.all_gather_into_tensor(buffer, buffer[rank * count : (rank + 1) * count])
            torch.cuda.synchronize()
            verdicts.check(f"all_gather {name}: in place equals NCCL",
                           bitwise_equal(buffer, expected))
    # torch.distributed's 2-D layout: [world * rows, hidden] <-> [rows, hidden]
    send = summable_input((world * 5, 33), torch.bfloat16, 3, rank)
    expected = torch.empty(5, 33, dtype=torch.bfloat16, device="cuda")
    dist.reduce_scatter_tensor(expected, send.clone())
    verdicts.check("reduce_scatter 2-D equals NCCL", bitwise_equal(
        ca.reduce_scatter_tensor(torch.empty_like(expected), send), expected))
    gathered = torch.empty(world * 5, 33, dtype=torch.bfloat16, device="cuda")
    dist.all_gather_into_tensor(gathered, expected)
    verdicts.check("all_gather 2-D equals NCCL", bitwise_equal(
        ca.all_gather_into_tensor(torch.empty_like(gathered), expected), gathered))


def scatter_gather_graph(ca, verdicts, replays):
    rank, world = dist.get_rank(), dist.get_world_size()
    count, dtype = 4097, torch.bfloat16
    static_send = summable_input((world * count,), dtype, 1, rank)
    static_mine = random_input((count,), dtype, 2, rank)
    static_recv = torch.empty(count, dtype=dtype, device="cuda")
    static_gathered = torch.empty(world * count, dtype=dtype, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ca.reduce_scatter_tensor(static_recv, static_send)
        ca.all_gather_into_tensor(static_gathered, static_mine)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with ca.capture():
        with torch.cuda.graph(graph):
            ca.reduce_scatter_tensor(static_recv, static_send)
            ca.all_gather_into_tensor(static_gathered, static_mine)
    wrong = 0
    for replay in range(replays):
        static_send.copy_(summable_input((world * count,), dtype, 100 + replay, rank))
        static_mine.copy_(random_input((count,), dtype, 200 + replay, rank))
        expected_recv = torch.empty_like(static_recv)
        dist.reduce_scatter_tensor(expected_recv, static_send.clone())
        expected_gathered = torch.empty_like(static_gathered)
        dist.all_gather_into_tensor(expected_gathered, static_mine)
        graph.replay()
        torch.cuda.synchronize()
        if not (bitwise_equal(static_recv, expected_recv)
                and bitwise_equal(static_gathered, expected_gathered)):
            wrong += 1
    verdicts.check(f"a reduce-scatter + all-gather graph replayed {replays} times equals NCCL",
                   wrong == 0, f"{wrong} replays wrong")
    del graph
    ca.release_graph_buffers()


def scatter_gather_fallbacks(ca, verdicts):
    rank, world = dist.get_rank(), dist.get_world_size()
    ints = torch.arange(world * 100, device="cuda", dtype=torch.int32) * (rank + 1)
    recv = torch.empty(100, device="cuda", dtype=torch.int32)
    verdicts.check("reduce_scatter: int32 goes through torch.distributed",
                   not ca.should_custom_scatter_gather(recv, ints))
    expected = torch.empty_like(recv)
    dist.reduce_scatter_tensor(expected, ints.clone())
    verdicts.check("reduce_scatter: int32 right",
                   torch.equal(ca.reduce_scatter_tensor(recv, ints), expected))
    mine = random_input((48,), torch.bfloat16, 6, rank)
    strided = torch.zeros(world * 48, 2, dtype=torch.bfloat16, device="cuda")[:, 0]
    verdicts.check("all_gather: a non-contiguous output goes through torch.distributed",
                   not ca.should_custom_scatter_gather(strided, mine))
    expected = torch.empty(world * 48, dtype=torch.bfloat16, device="cuda")
    dist.all_gather_into_tensor(expected, mine)
    verdicts.check("all_gather: non-contiguous output right",
                   bitwise_equal(ca.all_gather_into_tensor(strided, mine), expected))


def kill(ca, verdicts, timeout_s):
    rank = dist.get_rank()
    x = random_input((4096,), torch.bfloat16, 3, rank)
    ca.all_reduce(x)
    torch.cuda.synchronize()
    if rank == 1:
        print("[rank 1] leaving without the next call", flush=True)
        os._exit(0)  # exit status 0, so that torchrun does not kill rank 0
    started = time.monotonic()
    try:
        ca.all_reduce(x)
        ca.synchronize()
        verdicts.check("a dead peer raises LinkreduceError", False, "the call returned")
    except LinkreduceError as error:
        waited = time.monotonic() - started
        verdicts.check("a dead peer raises LinkreduceError", True)
        verdicts.check("it names rank 1", getattr(error, "peer", None) == 1 or "rank 1" in str(error),
                       str(error))
        verdicts.check(f"within the deadline ({timeout_s} s + 2 s)", waited <= timeout_s + 2,
                       f"{waited:.1f} s")
    os._exit(1 if verdicts.failed else 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--replays", type=int, default=1000)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    cpu_group = dist.new_group(backend="gloo")
    verdicts = Verdicts(dist.get_rank())
    timeout_s = 3.0
    # The default group meets over gloo (CPU tensors) for set-up and falls
    # back to NCCL for CUDA tensors; the gloo group compares digests.
    with CustomAllreduce(dist.group.WORLD, device=local_rank, timeout_s=timeout_s) as ca:
        if args.kill:
            kill(ca, verdicts, timeout_s)
        correctness(ca, verdicts, cpu_group)
        fallbacks(ca, verdicts)
        graphs(ca, verdicts, args.replays)
        # Every kernel algorithm fuses; "nccl" runs NCCL's all-reduce, then
        # the norm kernel (the unfused sequence). All must give ca's bits.
        forced = {name: CustomAllreduce(dist.group.WORLD, device=local_rank,
                                        timeout_s=timeout_s, algorithm=name)
                  for name in ("one-stage", "two-stage", "push", "nccl")}
        fused_norm(ca, forced, verdicts, cpu_group)
        for other in forced.values():
            other.close()
        fused_views(ca, verdicts)
        fused_graph(ca, verdicts, max(1, args.replays // 10))
        fused_fallbacks(ca, verdicts)
        scatter_gather(ca, verdicts, cpu_group)
        scatter_gather_graph(ca, verdicts, max(1, args.replays // 10))
        scatter_gather_fallbacks(ca, verdicts)
        torch.cuda.synchronize()
    print(f"[rank {verdicts.rank}] {len(verdicts.failed)} failed", flush=True)
    dist.destroy_process_group()
    return 1 if verdicts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
