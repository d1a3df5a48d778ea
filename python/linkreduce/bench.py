"""python -m linkreduce.bench: linkreduce beside PyTorch's all-reduces.

    torchrun --nproc-per-node 2 -m linkreduce.bench [--sizes 1K:64M] [--dtype bf16]
    torchrun --nproc-per-node 2 -m linkreduce.bench --op fused-norm|reduce-scatter|all-gather

At every size, in the same run and on the same buffers' values:

- ``linkreduce``: ``CustomAllreduce.all_reduce(x, out=y)``;
- ``nccl``: ``torch.distributed.all_reduce`` (NCCL, in place);
- ``symm-one-shot`` and ``symm-two-shot``: torch's symmetric-memory
  all-reduces (``torch.ops.symm_mem.one_shot_all_reduce_out`` and
  ``two_shot_all_reduce_``) on a symmetric buffer, where the installed torch
  has them.

Each is timed as CUDA-graph replays (``--modes graph``) and eagerly
(``eager``): the median over ``--repetitions`` of ``--iterations`` calls,
on the slowest rank. Results are checked against NCCL's: the inputs are
small integers, whose sums every implementation must get exactly. Rank 0
prints a table like ``linkreduce bench``'s, with each time's ratio to
NCCL's in the same mode (above 1: faster than NCCL). The in-place ones
(nccl, symm-two-shot) are checked on their first call; repeated calls sum
their own outputs, which does not change their speed.

``--op`` times another collective of ``CustomAllreduce`` against its
torch.distributed counterpart (``linkreduce`` and ``nccl`` only):

- ``fused-norm``: ``all_reduce_add_rms_norm`` on rows of ``--hidden``
  elements against ``torch.distributed.all_reduce`` followed by the
  residual add and RMSNorm in torch; checked within an ulp (the fused
  kernel rounds in its own order, docs/fused.md), on the first call only
  (the residual keeps growing);
- ``reduce-scatter`` and ``all-gather``: ``reduce_scatter_tensor`` and
  ``all_gather_into_tensor`` against torch.distributed's; a size is one
  rank's block, and bandwidths are NCCL's (algbw = world size x block /
  time).

Exits with 1 when any result was wrong, 2 when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

IMPLEMENTATIONS = ("nccl", "linkreduce", "symm-one-shot", "symm-two-shot")
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
OPS = ("all-reduce", "fused-norm", "reduce-scatter", "all-gather")
EPS = 1e-6


def parse_size(text):
    """4096, 64K, 1M, 2G (powers of 1024)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in "KMG" else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 4096, 64K, 1M)")
    return int(digits) * scale


def parse_sizes(text):
    """A comma-separated list of sizes and LOW:HIGH ranges that double."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        low, _, high = item.partition(":")
        low = parse_size(low)
        high = parse_size(high) if high else low
        if low > high:
            raise argparse.ArgumentTypeError(f"range {item!r} runs backwards")
        while low <= high:
            sizes.append(low)
            low *= 2
    return sizes


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m linkreduce.bench",
        description="linkreduce beside torch.distributed (NCCL) and torch's symmetric-memory "
        "all-reduces; run it under torchrun with one process per GPU.",
    )
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1K:64M"),
                        help="message sizes in bytes: lists and LOW:HIGH doubling ranges")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--op", choices=OPS, default="all-reduce",
                        help="the collective; the symm-* implementations time all-reduce only")
    parser.add_argument("--hidden", type=int, default=8192,
                        help="fused-norm: elements per row (a size is rounded to whole rows)")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help=f"comma-separated, of {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--modes", default="graph,eager", help="graph, eager or both")
    parser.add_argument("--iterations", type=int, default=20, help="calls per timed repetition")
    parser.add_argument("--repetitions", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--algorithm", default="auto", help="linkreduce's algorithm")
    parser.add_argument("--group", choices=("gloo", "nccl"), default="gloo",
                        help="the group CustomAllreduce sets up over: a gloo group (as vLLM "
                        "passes its cpu_group) or the NCCL default group")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args(argv)
    args.implementations = [i.strip() for i in args.implementations.split(",") if i.strip()]
    unknown = set(args.implementations) - set(IMPLEMENTATIONS)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown or not args.implementations:
        parser.error(f"unknown implementations {sorted(unknown)}; choose from {IMPLEMENTATIONS}")
    if not args.modes or set(args.modes) - {"graph", "eager"}:
        parser.error("--modes takes graph, eager or graph,eager")
    if args.iterations < 1 or args.repetitions < 1:
        parser.error("--iterations and --repetitions must be positive")
    if args.hidden < 1:
        parser.error("--hidden must be positive")
    if args.op == "fused-norm" and args.dtype == "f32":
        parser.error("fused-norm takes f16 and bf16 (--dtype)")
    if args.op != "all-reduce":
        args.implementations = [i for i in args.implementations if not i.startswith("symm-")]
        if not args.implementations:
            parser.error(f"--op {args.op} times nccl and linkreduce only")
    return args


def cannot_run(message):
    print(f"linkreduce.bench: {message}", file=sys.stderr)
    return 2


class Implementation:
    """One all-reduce under test: ``reset()`` puts the input values in
    place, ``run()`` makes one call, ``output`` holds its result."""

    def __init__(self, name, reset, run, output, capture=None, in_place=False):
        self.name, self.reset, self.run, self.output = name, reset, run, output
        self.capture = capture
        self.in_place = in_place


class Bench:
    def __init__(self, torch, args):
        self.torch = torch
        self.dist = torch.distributed
        self.args = args
        self.rank = self.dist.get_rank()
        self.world_size = self.dist.get_world_size()
        self.dtype = getattr(torch, DTYPES[args.dtype])
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.symm = None
        self.symm_reason = None

    # ---- set-up -------------------------------------------------------

    def custom_allreduce(self):
        from .torch import CustomAllreduce

        group = self.dist.new_group(backend="gloo") if self.args.group == "gloo" else None
        # A reduce-scatter's or all-gather's size is one rank's block; the
        # custom path's max_size goes by the larger buffer.
        return CustomAllreduce(group=group, device=self.device,
                               max_size=max(self.args.sizes) * self.world_size,
                               algorithm=self.args.algorithm)

    def symmetric_buffer(self, count):
        """One symmetric buffer for every size (views from its start), or
        None with the reason in ``symm_reason``."""
        torch = self.torch
        try:
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError:
            self.symm_reason = "this torch has no torch.distributed._symmetric_memory"
            return None
        ops = getattr(torch.ops, "symm_mem", None)
        have = {name: ops is not None and hasattr(ops, name)
                for name in ("one_shot_all_reduce_out", "two_shot_all_reduce_")}
        if not any(have.values()):
            self.symm_reason = "this torch has no symm_mem all-reduce operators"
            return None
        try:
            group_name = self.dist.group.WORLD.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # torch < 2.8 needs it
                symm_mem.enable_symm_mem_for_group(group_name)
            buffer = symm_mem.empty(count, dtype=self.dtype, device=self.device)
            symm_mem.rendezvous(buffer, group_name)
        except Exception as error:  # no P2P, no multicast object support, ...
            self.symm_reason = f"symmetric memory set-up failed: {error}"
            return None
        self.symm = (buffer, group_name, have)
        return buffer

    def implementations(self, ca, x, count):
        """The implementations to time at this size, on input `x`."""
        if self.args.op == "fused-norm":
            return self.fused_implementations(ca, x)
        if self.args.op != "all-reduce":
            return self.scatter_gather_implementations(ca, x, count)
        torch, ops = self.torch, getattr(self.torch.ops, "symm_mem", None)
        result = []
        for name in self.args.implementations:
            if name == "nccl":
                buffer = torch.empty_like(x)
                result.append(Implementation(
                    name, lambda b=buffer: b.copy_(x),
                    lambda b=buffer: self.dist.all_reduce(b), buffer, in_place=True))
            elif name == "linkreduce":
                out = torch.empty_like(x)
                result.append(Implementation(
                    name, lambda: None, lambda o=out: ca.all_reduce(x, out=o), out,
                    capture=ca.capture))
            elif name.startswith("symm-") and self.symm is not None:
                buffer, group_name, have = self.symm
                view = buffer[:count]
                if name == "symm-one-shot" and have["one_shot_all_reduce_out"]:
                    out = torch.empty_like(x)
                    result.append(Implementation(
                        name, lambda v=view: v.copy_(x),
                        lambda v=view, o=out: ops.one_shot_all_reduce_out(v, "sum", group_name, o),
                        out))
                elif name == "symm-two-shot" and have["two_shot_all_reduce_"]:
                    result.append(Implementation(
                        name, lambda v=view: v.copy_(x),
                        lambda v=view: ops.two_shot_all_reduce_(v, "sum", group_name), view,
                        in_place=True))
        return result

    def norm_state(self, x):
        """The fused norm's residual (small integers, so its add is exact)
        and weight (ones), alike on every rank."""
        torch = self.torch
        index = torch.arange(x.numel(), device=self.device, dtype=torch.int64).view(x.shape)
        residual = ((index * 3 + 1) % 5 - 2).to(self.dtype)
        return residual, torch.ones(x.shape[-1], dtype=self.dtype, device=self.device)

    def torch_norm(self, residual, weight):
        wide = residual.float()
        inv_rms = self.torch.rsqrt(wide.square().mean(-1, keepdim=True) + EPS)
        return (wide * inv_rms * weight.float()).to(self.dtype)

    def fused_implementations(self, ca, x):
        torch, dist = self.torch, self.dist
        residual0, weight = self.norm_state(x)
        result = []
        for name in self.args.implementations:
            residual, out = torch.empty_like(x), torch.empty_like(x)
            if name == "nccl":
                summed = torch.empty_like(x)

                def reset(s=summed, r=residual):
                    s.copy_(x)
                    r.copy_(residual0)

                def run(s=summed, r=residual, o=out):
                    dist.all_reduce(s)  # in place, as a model's layer would
                    r.add_(s)
                    o.copy_(self.torch_norm(r, weight))

                result.append(Implementation(name, reset, run, out, in_place=True))
            elif name == "linkreduce":
                result.append(Implementation(
                    name, lambda r=residual: r.copy_(residual0),
                    lambda r=residual, o=out: ca.all_reduce_add_rms_norm(x, r, weight, EPS, out=o),
                    out, capture=ca.capture, in_place=True))
        return result

    def scatter_gather_implementations(self, ca, x, count):
        torch = self.torch
        reduce = self.args.op == "reduce-scatter"
        out_count = count if reduce else count * self.world_size
        method = "reduce_scatter_tensor" if reduce else "all_gather_into_tensor"
        result = []
        for name in self.args.implementations:
            out = torch.empty(out_count, dtype=self.dtype, device=self.device)
            if name == "nccl":
                call = getattr(self.dist, method)
                result.append(Implementation(name, lambda: None, lambda o=out: call(o, x), out))
            elif name == "linkreduce":
                call = getattr(ca, method)
                result.append(Implementation(name, lambda: None, lambda o=out: call(o, x), out,
                                             capture=ca.capture))
        return result

    def expected(self, x, count):
        """The op's result on `x` through torch.distributed (NCCL)."""
        torch, dist, op = self.torch, self.dist, self.args.op
        if op == "reduce-scatter":
            result = torch.empty(count, dtype=self.dtype, device=self.device)
            dist.reduce_scatter_tensor(result, x)
            return result
        if op == "all-gather":
            result = torch.empty(count * self.world_size, dtype=self.dtype, device=self.device)
            dist.all_gather_into_tensor(result, x)
            return result
        result = x.clone()
        dist.all_reduce(result)
        if op == "fused-norm":
            residual, weight = self.norm_state(x)
            return self.torch_norm(residual + result, weight)
        return result

    # ---- measuring ----------------------------------------------------

    def wrong(self, impl, expected):
        """Elements of `impl`'s output that differ from `expected`, on all ranks."""
        torch = self.torch
        torch.cuda.synchronize()
        if self.args.op == "fused-norm":  # within an ulp: see the module's docstring
            difference = (impl.output.float() - expected.float()).abs()
            bad = difference > torch.finfo(self.dtype).eps * expected.float().abs() + 1e-6
        else:
            bad = impl.output != expected
        count = bad.sum().to(torch.int64).reshape(1)
        self.dist.all_reduce(count)
        return int(count.item())

    def timed(self, launch):
        """Median microseconds per call over the repetitions, slowest rank."""
        torch = self.torch
        times = []
        for _ in range(self.args.repetitions):
            torch.cuda.synchronize()
            self.dist.barrier()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            launch()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0 / self.args.iterations)
        mine = torch.tensor([statistics.median(times)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(mine, op=self.dist.ReduceOp.MAX)
        return float(mine.item())

    def eager(self, impl):
        iterations = self.args.iterations

        def launch():
            for _ in range(iterations):
                impl.run()

        return self.timed(launch)

    def graph(self, impl, graphs):
        """Captures `iterations` calls in one graph and times its replays;
        keeps the graph in `graphs` until the size is done."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch advises
            impl.run()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        capture = impl.capture() if impl.capture else _nothing()
        with capture:
            with torch.cuda.graph(graph):
                for _ in range(self.args.iterations):
                    impl.run()
        graphs.append(graph)
        graph.replay()
        return self.timed(graph.replay)

    def size(self, ca, nbytes):
        """Every implementation and mode at `nbytes`: a list of rows."""
        torch = self.torch
        element = torch.tensor([], dtype=self.dtype).element_size()
        count = max(1, nbytes // element)
        shape = (count,)
        if self.args.op == "fused-norm":
            shape = (max(1, count // self.args.hidden), self.args.hidden)
            count = shape[0] * shape[1]
        elif self.args.op == "reduce-scatter":
            shape = (count * self.world_size,)
        index = torch.arange(math.prod(shape), device=self.device, dtype=torch.int64)
        # Small integers: every sum over 8 ranks is exact in bf16.
        x = ((index + self.rank) % 7 - 3).to(self.dtype).view(shape)
        expected = self.expected(x, count)
        rows, graphs = [], []
        for impl in self.implementations(ca, x, count):
            impl.reset()
            impl.run()
            first_call_wrong = self.wrong(impl, expected)
            for mode in self.args.modes:
                impl.reset()
                time_us = self.eager(impl) if mode == "eager" else self.graph(impl, graphs)
                wrong = first_call_wrong
                if not impl.in_place:  # the last timed call's output
                    wrong += self.wrong(impl, expected)
                rows.append(self.row(nbytes, count, impl.name, mode, time_us, wrong))
        torch.cuda.synchronize()
        del graphs
        if ca is not None:
            ca.release_graph_buffers()  # the graphs are gone; peers may free their inputs
        for row in rows:
            nccl = next((r for r in rows if r["impl"] == "nccl" and r["mode"] == row["mode"]), None)
            row["vs_nccl"] = nccl["time_us"] / row["time_us"] if nccl and row["time_us"] else None
        return rows

    def row(self, nbytes, count, name, mode, time_us, wrong):
        """A result; bandwidths as NCCL's tests count them for the op."""
        moved = count * self.torch.tensor([], dtype=self.dtype).element_size()
        factor = 2 * (self.world_size - 1) / self.world_size
        if self.args.op in ("reduce-scatter", "all-gather"):
            moved *= self.world_size
            factor /= 2
        algbw = moved / time_us / 1e3
        busbw = algbw * factor
        return {"op": self.args.op, "bytes": nbytes, "count": count, "dtype": self.args.dtype,
                "impl": name,
                "mode": mode, "time_us": time_us, "algbw_gbps": algbw, "busbw_gbps": busbw,
                "wrong": wrong}


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc_info):
        return False


def format_size(nbytes):
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return str(nbytes)


HEADER = ("size", "count", "type", "impl", "mode", "time(us)", "algbw", "busbw", "wrong",
          "vs nccl")


def print_row(row):
    ratio = "-" if row["vs_nccl"] is None else f"{row['vs_nccl']:.2f}x"
    print(f"{format_size(row['bytes']):>9} {row['count']:>11} {row['dtype']:>5} "
          f"{row['impl']:>13} {row['mode']:>6} {row['time_us']:>10.2f} "
          f"{row['algbw_gbps']:>9.2f} {row['busbw_gbps']:>9.2f} {row['wrong']:>6} {ratio:>8}",
          flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return cannot_run("needs PyTorch with CUDA (pip install torch)")
    if not torch.cuda.is_available():
        return cannot_run("needs NVIDIA GPUs, and torch.cuda.is_available() is False")
    if not dist.is_available():
        return cannot_run("this PyTorch has no torch.distributed")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return cannot_run("run it under torchrun, one process per GPU: "
                          "torchrun --nproc-per-node 2 -m linkreduce.bench")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl")
    from . import version

    bench = Bench(torch, args)
    try:
        if bench.world_size < 2:
            return cannot_run("needs at least 2 ranks (torchrun --nproc-per-node 2)")
        count = max(args.sizes) // torch.tensor([], dtype=bench.dtype).element_size()
        if any(name.startswith("symm-") for name in args.implementations):
            bench.symmetric_buffer(max(1, count))
        ca = bench.custom_allreduce() if "linkreduce" in args.implementations else None
        if bench.rank == 0:
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            print(f"{args.op}: linkreduce {version()}, torch {torch.__version__}, "
                  f"{bench.world_size} ranks "
                  f"on {', '.join(names)}; {args.iterations} calls x {args.repetitions} "
                  f"repetitions, median of the slowest rank")
            if bench.symm_reason:
                print(f"symm-one-shot, symm-two-shot: skipped ({bench.symm_reason})")
            print(" ".join(f"{h:>{w}}" for h, w in zip(HEADER, (9, 11, 5, 13, 6, 10, 9, 9, 6, 8))))
        rows = []
        for nbytes in args.sizes:
            for row in bench.size(ca, nbytes):
                rows.append(row)
                if bench.rank == 0:
                    print_row(row)
        if ca is not None:
            ca.close()
        if bench.rank == 0 and args.json:
            with open(args.json, "w") as file:
                json.dump({"torch": torch.__version__, "world_size": bench.world_size,
                           "rows": rows}, file, indent=1)
        return 1 if any(row["wrong"] for row in rows) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
