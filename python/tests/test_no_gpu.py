"""The Python package on a machine without a GPU (and, in CI, without
PyTorch): it imports, checks its arguments, and fails with clear errors.

Run against an installed wheel (scripts/python-check.sh does):
    python python/tests/test_no_gpu.py        (or python -m unittest, or pytest)
"""

import contextlib
import ctypes
import importlib.util
import os
import socket
import subprocess
import sys
import time
import unittest

import linkreduce
from linkreduce import (
    Communicator,
    LinkreduceError,
    validate_all_gather,
    validate_all_reduce,
    validate_all_reduce_add_rms_norm,
    validate_reduce_scatter,
)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "LINKREDUCE_PORT", "LINKREDUCE_RENDEZVOUS_TIMEOUT_S")


def have_cuda_driver():
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


HAVE_DRIVER = have_cuda_driver()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def environment(**values):
    """The torchrun variables exactly as given (others unset), then back."""
    saved = {name: os.environ.get(name) for name in TORCHRUN_VARS}
    for name in TORCHRUN_VARS:
        os.environ.pop(name, None)
    os.environ.update({name: str(value) for name, value in values.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def torchrun_env():
    # A short rendezvous timeout, so that a machine with a GPU (where set-up
    # gets as far as waiting for rank 1) fails quickly too.
    return dict(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1",
                MASTER_PORT=free_port(), LINKREDUCE_RENDEZVOUS_TIMEOUT_S=2)


class Import(unittest.TestCase):
    def test_imports_without_torch_and_describes_itself(self):
        if not HAVE_TORCH:
            self.assertNotIn("torch", sys.modules)
        self.assertRegex(linkreduce.__version__, r"^\d+\.\d+\.\d+")
        self.assertEqual(linkreduce.version(), linkreduce.__version__)
        self.assertEqual(linkreduce.DTYPES, ("f32", "f16", "bf16"))
        self.assertEqual(linkreduce.ALGORITHMS,
                         ("auto", "one-stage", "two-stage", "push", "chunked-push", "nccl"))
        self.assertEqual(linkreduce._linkreduce.__name__, "linkreduce._linkreduce")

    def test_the_error_is_a_runtime_error_with_attributes(self):
        self.assertTrue(issubclass(LinkreduceError, RuntimeError))
        self.assertEqual(LinkreduceError.__module__, "linkreduce")
        error = LinkreduceError("message")
        self.assertEqual(str(error), "message")
        self.assertEqual((error.kind, error.rank, error.peer), (None, None, None))

    def test_a_communicator_is_built_only_by_its_constructors(self):
        with self.assertRaises(TypeError):
            Communicator()

    def test_both_layers_have_every_collective(self):
        import linkreduce.torch as lt

        for name in ("all_reduce", "all_reduce_add_rms_norm", "reduce_scatter", "all_gather",
                     "scatter_gather_algorithm", "scatter_gather_path"):
            self.assertTrue(callable(getattr(Communicator, name, None)), name)
        for name in ("all_reduce", "all_reduce_add_rms_norm", "reduce_scatter_tensor",
                     "all_gather_into_tensor", "should_custom_norm",
                     "should_custom_scatter_gather"):
            self.assertTrue(callable(getattr(lt.CustomAllreduce, name, None)), name)

    def test_the_torch_module_imports_and_asks_for_torch_when_used(self):
        import linkreduce.torch as lt

        self.assertIs(linkreduce.torch, lt)
        if HAVE_TORCH:
            self.skipTest("PyTorch is installed here")
        with self.assertRaisesRegex(ImportError, r"needs PyTorch.*linkreduce\.Communicator"):
            lt.CustomAllreduce()


class FromEnv(unittest.TestCase):
    def test_without_torchrun_variables_it_names_the_missing_one(self):
        with environment():
            with self.assertRaises(LinkreduceError) as caught:
                Communicator.from_env()
        self.assertEqual(caught.exception.kind, "RendezvousConfig")
        self.assertIn("neither LOCAL_RANK nor RANK is set", str(caught.exception))

    def test_without_a_gpu_it_says_what_is_missing(self):
        with environment(**torchrun_env()):
            start = time.monotonic()
            with self.assertRaises(LinkreduceError) as caught:
                Communicator.from_env(timeout_s=1)
            elapsed = time.monotonic() - start
        if HAVE_DRIVER:
            self.skipTest(f"this machine has a CUDA driver ({caught.exception})")
        self.assertEqual(caught.exception.kind, "DriverNotFound")
        self.assertIn("libcuda.so", str(caught.exception))
        self.assertIn("NVIDIA driver", str(caught.exception))
        self.assertLess(elapsed, 5, "the missing GPU must be reported before any rendezvous")

    def test_a_named_device_is_checked_before_the_rendezvous(self):
        with environment(**torchrun_env()):
            start = time.monotonic()
            with self.assertRaises(LinkreduceError) as caught:
                Communicator.from_env(0, port=free_port())
            elapsed = time.monotonic() - start
        if not HAVE_DRIVER:
            self.assertEqual(caught.exception.kind, "DriverNotFound")
            self.assertLess(elapsed, 5)

    def test_keyword_arguments_are_checked_first(self):
        bad = [
            (dict(port=0), ValueError, "port must be in 1..=65535"),
            (dict(port=70000), ValueError, "port must be in 1..=65535"),
            (dict(timeout_s=0), ValueError, "timeout_s must be a positive number of seconds"),
            (dict(rendezvous_timeout_s=float("nan")), ValueError, "rendezvous_timeout_s"),
            (dict(device=-1), ValueError, "device must be a non-negative int"),
            (dict(device="cuda:0"), TypeError, "device must be an int"),
            (dict(staging_bytes=-4), ValueError, "staging_bytes must be a non-negative int"),
            (dict(max_blocks=2**40), ValueError, "max_blocks .* is too large"),
        ]
        for kwargs, error, message in bad:
            with self.subTest(**{k: repr(v) for k, v in kwargs.items()}):
                with environment(**torchrun_env()):
                    with self.assertRaisesRegex(error, message):
                        Communicator.from_env(**kwargs)


class WithAllGather(unittest.TestCase):
    def test_arguments_are_checked_before_set_up(self):
        def gather(data):
            return [data, data]

        with self.assertRaisesRegex(ValueError, "rank 2 is out of range for world_size 2"):
            Communicator.with_all_gather(2, 2, 0, gather)
        with self.assertRaisesRegex(TypeError, "all_gather must be a callable"):
            Communicator.with_all_gather(0, 2, 0, b"not callable")
        with self.assertRaisesRegex(ValueError, "world_size must be a non-negative int"):
            Communicator.with_all_gather(0, -2, 0, gather)

    def test_without_a_gpu_every_rank_hears_of_the_failure(self):
        calls = []

        def gather(data):
            calls.append(bytes(data))
            return [data, data]

        with self.assertRaises(LinkreduceError) as caught:
            Communicator.with_all_gather(1, 2, 0, gather, timeout_s=1)
        if HAVE_DRIVER:
            self.skipTest(f"this machine has a CUDA driver ({caught.exception})")
        self.assertEqual(caught.exception.kind, "DriverNotFound")
        self.assertEqual(caught.exception.rank, 1)
        self.assertIsNone(caught.exception.__cause__)
        # The failure was sent to the peers (status byte 0, then the message),
        # so that they fail at once instead of waiting for this rank.
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][0], 0)
        self.assertIn(b"libcuda.so", calls[0])


    def test_world_sizes_past_what_nccl_takes_are_refused_before_set_up(self):
        def gather(data):
            return [data]

        with self.assertRaises(LinkreduceError) as caught:
            Communicator.with_all_gather(0, 2**40, 0, gather)
        self.assertEqual(caught.exception.kind, "UnsupportedWorldSize")

    @unittest.skipIf(HAVE_DRIVER, "a CUDA driver is present")
    def test_world_sizes_outside_the_kernels_take_nccl_so_fail_only_for_the_gpu(self):
        # One rank, or more than the kernels' 8, take NCCL instead of being
        # refused for their size: here set-up fails for the missing driver.
        def gather(data):
            return [data]

        for world_size in (1, 9):
            with self.subTest(world_size=world_size):
                with self.assertRaises(LinkreduceError) as caught:
                    Communicator.with_all_gather(0, world_size, 0, gather)
                self.assertEqual(caught.exception.kind, "DriverNotFound")


class RendezvousCallable(unittest.TestCase):
    """What a communicator accepts from an all_gather callable."""

    gather = staticmethod(linkreduce._linkreduce._rendezvous_all_gather)

    def test_contributions_come_back_in_rank_order(self):
        def gather(data):
            self.assertIsInstance(data, bytes)
            return [b"zero", bytearray(data), b""]

        self.assertEqual(self.gather(1, 3, gather, b"one"), [b"zero", b"one", b""])

    def test_what_the_callable_gets_wrong_is_named(self):
        cases = [
            (lambda data: [data], "returned 1 items for 2 ranks"),
            (lambda data: [data, "text"], "returned a str at position 1; every item must be bytes"),
            (lambda data: [b"other", data], "at position 0 \\(this rank's\\) other bytes"),
            (lambda data: 42, "did not return a list"),
        ]
        for callable_, message in cases:
            with self.subTest(message=message):
                with self.assertRaisesRegex(LinkreduceError, message) as caught:
                    self.gather(0, 2, callable_, b"mine")
                self.assertEqual(caught.exception.kind, "RendezvousProtocol")
                self.assertEqual(caught.exception.rank, 0)

    def test_an_exception_of_the_callable_is_the_cause(self):
        def gather(data):
            raise ConnectionError("peer 1 is gone")

        with self.assertRaisesRegex(LinkreduceError, "ConnectionError: peer 1 is gone") as caught:
            self.gather(0, 2, gather, b"mine")
        self.assertEqual(caught.exception.kind, "RendezvousIo")
        self.assertIsInstance(caught.exception.__cause__, ConnectionError)


class Arguments(unittest.TestCase):
    """Communicator.all_reduce makes these checks before anything else."""

    def test_a_valid_call_returns_its_size_in_bytes(self):
        self.assertEqual(validate_all_reduce("f32", 4096, 8192, 10), 40)
        self.assertEqual(validate_all_reduce("bfloat16", 4096, 4096, 10, "two-stage"), 20)
        self.assertEqual(validate_all_reduce("half", 4098, 4098, 3, "push"), 6)
        self.assertEqual(validate_all_reduce("f16", 0, 0, 0), 0)  # empty: null is fine

    def test_bad_arguments_say_what_is_accepted(self):
        cases = [
            (("int8", 16, 16, 1), ValueError, 'unknown dtype "int8": linkreduce reduces f32, f16 '
                                              "and bf16"),
            (("float64", 16, 16, 1), ValueError, "reduce other types with torch.distributed"),
            (("f32", 16, 16, -1), ValueError, "count must be a non-negative int"),
            (("f32", 16, 16, 1.5), TypeError, "count must be an int"),
            (("f32", 16, 16, 1, "fastest"), ValueError,
             'unknown algorithm "fastest": expected one-stage, two-stage, push or chunked-push \\(or auto, nccl\\)'),
            (("f32", 0, 16, 1), ValueError, "input_ptr is 0 \\(a null pointer\\)"),
            (("f32", 16, 0, 1), ValueError, "output_ptr is 0 \\(a null pointer\\)"),
            (("f32", -16, 16, 1), ValueError, "input_ptr must be a non-negative int"),
            (("f32", 2**64, 16, 1), ValueError, "input_ptr must fit in 64 bits"),
            (("f32", "0x10", 16, 1), TypeError, "input_ptr must be an int"),
            (("f32", 2**64 - 8, 16, 4), ValueError, "runs past the end of the address space"),
            (("f32", 16, 16, 2**62), ValueError, "more bytes than the address space holds"),
        ]
        for arguments, error, message in cases:
            with self.subTest(arguments=arguments):
                with self.assertRaisesRegex(error, message):
                    validate_all_reduce(*arguments)


class FusedNormArguments(unittest.TestCase):
    """Communicator.all_reduce_add_rms_norm makes these checks first."""

    @staticmethod
    def call(dtype="bf16", count=8 * 4095, hidden=4095, eps=1e-6, pointers=(4096, 8192, 12288),
             weight=16384, algorithm="auto"):
        input_ptr, residual_ptr, out_ptr = pointers
        return validate_all_reduce_add_rms_norm(dtype, input_ptr, residual_ptr, out_ptr, count,
                                                weight, hidden, eps, algorithm)

    def test_a_valid_call_returns_the_inputs_size_in_bytes(self):
        self.assertEqual(self.call(), 8 * 4095 * 2)
        self.assertEqual(self.call(dtype="float16", count=6, hidden=3, algorithm="two-stage"), 12)
        self.assertEqual(self.call(eps=0), 8 * 4095 * 2)
        # No rows: nothing is read or written, so null addresses are fine.
        self.assertEqual(self.call(count=0, pointers=(0, 0, 0), weight=0), 0)

    def test_bad_arguments_say_what_is_accepted(self):
        cases = [
            (dict(dtype="f32"), ValueError, "takes f16 and bf16 activations, not f32"),
            (dict(dtype="int8"), ValueError, 'unknown dtype "int8"'),
            (dict(count=10, hidden=4), ValueError, "count 10 is not a whole number of rows of "
                                                   "hidden = 4"),
            (dict(hidden=0), ValueError, "hidden > 0"),
            (dict(hidden=-1), ValueError, "hidden must be a non-negative int"),
            (dict(count=1.5), TypeError, "count must be an int"),
            (dict(eps=-1e-6), ValueError, "finite, non-negative eps"),
            (dict(eps=float("nan")), ValueError, "finite, non-negative eps"),
            (dict(eps=1e39), ValueError, "finite, non-negative eps \\(as an f32\\)"),
            (dict(eps="1e-6"), TypeError, "eps must be a float, got str"),
            (dict(pointers=(4096, 0, 8192)), ValueError, "residual_ptr is 0 \\(a null pointer\\)"),
            (dict(pointers=(4096, 8192, 0)), ValueError, "out_ptr is 0"),
            (dict(weight=0), ValueError, "weight_ptr is 0"),
            (dict(weight=2**64 - 16), ValueError, "weight_ptr .* runs past the end"),
            (dict(pointers=(-1, 16, 32)), ValueError, "input_ptr must be a non-negative int"),
            (dict(algorithm="fastest"), ValueError, "unknown algorithm"),
        ]
        for kwargs, error, message in cases:
            with self.subTest(**{k: repr(v) for k, v in kwargs.items()}):
                with self.assertRaisesRegex(error, message):
                    self.call(**kwargs)


class ScatterGatherArguments(unittest.TestCase):
    """Communicator.reduce_scatter and all_gather make these checks first;
    the larger buffer (the reduce-scatter's send, the all-gather's recv)
    holds world_size blocks."""

    def test_a_valid_call_returns_the_larger_buffers_size(self):
        self.assertEqual(validate_reduce_scatter("bf16", 4096, 8192, 7, 4), 56)
        self.assertEqual(validate_all_gather("float32", 4096, 8192, 7, 2, "nccl"), 56)
        self.assertEqual(validate_reduce_scatter("f16", 0, 0, 0, 8), 0)
        # In NCCL's in-place layout the buffers overlap; the library checks
        # the layout, these checks let it through.
        self.assertEqual(validate_all_gather("f32", 4096 + 28, 4096, 7, 2), 56)

    def test_bad_arguments_say_what_is_accepted(self):
        end = 2**64 - 64
        cases = [
            (validate_reduce_scatter, ("i32", 16, 32, 1, 2), ValueError, 'unknown dtype "i32"'),
            (validate_reduce_scatter, ("f32", 16, 32, -1, 2), ValueError,
             "recv_count must be a non-negative int"),
            (validate_all_gather, ("f32", 16, 32, 1.0, 2), TypeError, "send_count must be an int"),
            (validate_reduce_scatter, ("f32", 0, 32, 1, 2), ValueError, "send_ptr is 0"),
            (validate_all_gather, ("f32", 16, 0, 1, 2), ValueError, "recv_ptr is 0"),
            # Only the larger buffer holds world_size blocks.
            (validate_reduce_scatter, ("f32", end, 16, 8, 4), ValueError,
             "send_ptr .* plus 128 bytes runs past the end"),
            (validate_all_gather, ("f32", 16, end, 8, 4), ValueError,
             "recv_ptr .* plus 128 bytes runs past the end"),
            (validate_all_gather, ("f16", 16, 32, 2**62, 8), ValueError,
             "recv holds 8 x send_count .* more bytes than the address space holds"),
            (validate_reduce_scatter, ("f32", 16, 32, 1, 0), ValueError,
             "world_size must be at least 1"),
            (validate_all_gather, ("f32", 16, 32, 1, 2, "fastest"), ValueError,
             "unknown algorithm"),
        ]
        for function, arguments, error, message in cases:
            with self.subTest(function=function.__name__, arguments=arguments):
                with self.assertRaisesRegex(error, message):
                    function(*arguments)
        self.assertEqual(validate_reduce_scatter("f32", 16, end, 8, 4), 128)


class Bench(unittest.TestCase):
    def run_bench(self, *arguments):
        return subprocess.run([sys.executable, "-m", "linkreduce.bench", *arguments],
                              capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS})

    def test_help_works_anywhere(self):
        result = self.run_bench("--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("torchrun", result.stdout)

    def test_without_torch_or_a_gpu_it_says_why_it_cannot_run(self):
        result = self.run_bench("--sizes", "1K:4K")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertRegex(result.stderr, r"linkreduce\.bench: needs (PyTorch|NVIDIA GPUs)")
        self.assertNotIn("Traceback", result.stderr)

    def test_sizes_parse_like_the_command_lines(self):
        from linkreduce.bench import parse_args, parse_sizes

        self.assertEqual(parse_sizes("1K:4K,3000,1M"), [1024, 2048, 4096, 3000, 1 << 20])
        args = parse_args(["--implementations", "nccl,linkreduce", "--modes", "graph"])
        self.assertEqual((args.implementations, args.modes), (["nccl", "linkreduce"], ["graph"]))
        args = parse_args(["--op", "reduce-scatter"])
        self.assertEqual((args.op, args.implementations), ("reduce-scatter", ["nccl", "linkreduce"]))
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            for bad in (["--sizes", "4K:1K"], ["--implementations", "gloo"], ["--modes", "x"],
                        ["--op", "fused-norm", "--dtype", "f32"], ["--hidden", "0"],
                        ["--op", "all-gather", "--implementations", "symm-one-shot"]):
                with self.subTest(bad=bad), self.assertRaises(SystemExit):
                    parse_args(bad)


if __name__ == "__main__":
    print(f"linkreduce {linkreduce.__version__} from {os.path.dirname(linkreduce.__file__)}; "
          f"torch {'present' if HAVE_TORCH else 'absent'}; "
          f"CUDA driver {'present' if HAVE_DRIVER else 'absent'}", flush=True)
    unittest.main(verbosity=2)
