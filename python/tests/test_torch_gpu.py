"""CustomAllreduce on GPUs, under torchrun (one process per GPU):

    torchrun --nproc-per-node 2 python/tests/test_torch_gpu.py            # correctness
    torchrun --nproc-per-node 2 python/tests/test_torch_gpu.py --kill     # a dead rank

Checks, against torch.distributed.all_reduce (NCCL) on the same group:
every dtype on random non-integer data at odd lengths, tensors at storage
offsets, in place, a CUDA graph replayed 1000 times with new inputs, the
fallback for an int32 and a non-contiguous tensor, and bitwise agreement
between ranks. With two ranks NCCL adds the same two values in f32 and
rounds once, as linkreduce does, so results must match it bitwise. ``--kill``:
rank 1 leaves without calling; rank 0 must get LinkreduceError naming it
within the deadline. Every rank prints its verdicts; the exit status is
non-zero when any check failed.
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
        torch.cuda.synchronize()
    print(f"[rank {verdicts.rank}] {len(verdicts.failed)} failed", flush=True)
    dist.destroy_process_group()
    return 1 if verdicts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
