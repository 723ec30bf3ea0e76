"""What every Triton kernel of ours needs from the host side: the device facts and a low-overhead launcher.

The CUDA-only parts live here and nowhere else, so that under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported; kernels then run on CPU tensors, which is how CI tests them) they are bypassed
in one place: the SM count is a constant, there is no stream, and every launch goes through the JIT.
"""
from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Triton's JIT call (kernel[grid](...)) binds and specializes every argument, builds a cache key and reads
# its knobs on every call: tens of microseconds of host time per launch, more than some kernels run.
# Launcher goes through the JIT once per specialization and afterwards calls the compiled kernel's own
# launcher, the call that the JIT itself ends with. FAST_LAUNCH = False sends every launch through the JIT.
try:
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver

    FAST_LAUNCH = torch.version.hip is None and not INTERPRET  # the key follows Triton's NVIDIA specialization
except ImportError:  # a Triton without the knobs module: the JIT path only
    _knobs = _driver = None
    FAST_LAUNCH = False

INTERPRETER_SM_COUNT = 4  # any small number: grids only need "enough programs", and the CPU runs them in turn


def supported_device(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on this tensor's device: CUDA, or the CPU under the interpreter."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def device_index(t: torch.Tensor) -> int:
    return t.get_device() if t.is_cuda else -1


@functools.cache
def sm_count(device: int) -> int:
    if device < 0:
        return INTERPRETER_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_current_device(t: torch.Tensor) -> bool:
    """Triton launches on the current CUDA device's stream; a tensor elsewhere needs a device guard first."""
    return not t.is_cuda or t.get_device() == torch.cuda.current_device()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function: microseconds of wrapper per host call


def next_pow2(n: int) -> int:
    """triton.next_power_of_2 without its constexpr_function wrapper (~300 host calls a Sana training step)."""
    return 1 << max(0, n - 1).bit_length()


def pow2_tiles(n: int, smallest: int = 1) -> tuple[int, int]:
    """(head, tail): n channels as one power-of-two tile (tail 0), or as the largest power of two below n and a tail
    tile for the rest where the two are narrower together (a masked lane still issues its instructions: 1152 as
    1024 + 128 instead of 2048, 72 as 64 + 16 instead of 128). Tiles are at least `smallest` wide."""
    full = max(smallest, next_pow2(n))
    head = full // 2
    if head < smallest:
        return full, 0
    tail = max(smallest, next_pow2(n - head))
    return (head, tail) if head + tail < full else (full, 0)


def partial_sums(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A backward kernel's float32 partial-sum buffer of `shape`, on like's device. Every program writes its rows
    in full, so no zero fill (a kernel launch each) unless there is nothing to write (then the sums must be zero)."""
    return (like.new_empty if like.numel() else like.new_zeros)(shape, dtype=torch.float32)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook does anything (None, or since 3.7 a HookChain, empty by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """Launches one @triton.jit kernel with arguments (*tensors, *scalars, *constexprs).

    Which compiled kernel the JIT picks depends on the tensors' dtypes and whether their addresses are
    multiples of 16, on each int (== 1, a multiple of 16, 32 or 64 bits), on the constexprs, the launch
    options and the current device. The key here holds all of those, and more (ints and floats by value,
    addresses mod 16), so a hit launches the kernel the JIT would have launched; a miss goes through the JIT
    and remembers what it compiled."""

    def __init__(self, fn):
        self.fn = fn
        self.kernels: dict = {}
        self.direct = 0  # launches that skipped the JIT (tests read this)

    def __call__(self, grid: tuple[int, ...], device: int, tensors: tuple, scalars: tuple, consts: tuple,
                 options: tuple) -> None:
        grid = tuple(grid) + (1,) * (3 - len(grid))
        fast = FAST_LAUNCH and device >= 0
        if fast:
            ptrs = tuple([t.data_ptr() for t in tensors])
            key = (device, tuple([t.dtype for t in tensors]), tuple([p & 15 for p in ptrs]), scalars, consts,
                   options)
            kernel = self.kernels.get(key)
            if kernel is not None:
                args = (*ptrs, *scalars, *consts)
                stream = self.stream(device)
                enter, exit_ = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
                if _hooked(enter) or _hooked(exit_):  # e.g. a profiler: exactly what the JIT passes
                    meta = kernel.launch_metadata(grid, stream, *args)
                else:
                    meta = enter = exit_ = None
                kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta,
                           enter, exit_, *args)
                self.direct += 1
                return
        kernel = self.fn[grid](*tensors, *scalars, *consts, **dict(options))
        if fast and kernel is not None and getattr(kernel, "function", None) is not None:
            if len(self.kernels) >= 256:  # shapes come from a model: a handful, but never unbounded
                self.kernels.clear()
            self.stream = _driver.active.get_current_stream
            self.kernels[key] = kernel


class KernelOp:
    """A kernel's host function as a torch.library custom op, and the same function called directly in eager mode.

    torch.compile traces the op (schema, fake implementation, registered autograd: no graph break). Eager calls
    skip the dispatcher's Python layers (a 28-block DiT forward + backward with its launches stubbed: 77-107 ms
    of host time through the ops, 60-69 ms direct, bench/bench_host_overhead.py on the 2-core CPU runner):
    `fn` runs directly when nothing needs a gradient, else through one autograd.Function that uses the op's own
    setup_context and backward. The Linear DiT's eager step is host-bound on an H200 (thousands of
    launches a step), so this is time the GPU waits for.

        op = KernelOp("sana::name", fn)              # fn(*args) -> Tensor | tuple[Tensor, ...]
        op.register_fake(fake)
        op.register_autograd(backward, setup_context=setup)   # backward calls bwd_op.within(ctx)(...)
        out = op(*args)
    """

    via_dispatcher = False  # True: eager calls go through the op as well (bench/bench_host_overhead.py compares)

    def __init__(self, name: str, fn):
        self.fn = fn
        self.op = torch.library.custom_op(name, mutates_args=())(fn)
        self.backward = self.setup = None

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        self.backward, self.setup = backward, setup_context

    def __call__(self, *args):
        # Tracing (dynamo, or make_fx/AOT with fake or functional tensor subclasses) goes through the op.
        if (self.via_dispatcher or torch.compiler.is_compiling()
                or any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)):
            return self.op(*args)
        if self.backward is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return _Eager.apply(self, *args)
        return self.fn(*args)

    def within(self, ctx):
        """What a registered backward calls for this (backward) op: the function itself under the eager
        autograd.Function, the op when the backward is being traced."""
        return self.fn if getattr(ctx, "sana_eager", False) else self.op


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Eager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kop: KernelOp, *args):
        out = kop.fn(*args)
        kop.setup(ctx, args, out)
        ctx.kop, ctx.sana_eager = kop, True
        # Outputs nobody differentiates (statistics, saved activations) get None, not a zero tensor of their size.
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.kop.backward(ctx, *grads))


def kernel_op(name: str):
    """Decorator form of KernelOp: @kernel_op("sana::name") over the host function."""
    return lambda fn: KernelOp(name, fn)
