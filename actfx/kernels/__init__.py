"""Kernels that pack activations into 1-8 bits per value, and the dispatch between them.

CUDA tensors go to the Triton kernels (`triton_pack.py`); CPU tensors of 16K values or more to the
same math compiled into fused loops by torch.compile (`cpu_compiled.py`), smaller ones to the
eager PyTorch reference (`reference.py`). If Triton cannot import, compile or launch on a CUDA
device, or Inductor cannot compile on the CPU, that path falls back to the reference with one
warning; `ACTFX_CPU_KERNELS=reference` picks the reference on CPU without trying. The default path (`backend="auto"`) goes through the
`actfx::*` custom ops (`ops.py`) so graphs that call these functions stay traceable; tests force a
backend with `backend="triton"` / `"reference"`, which calls the implementation directly.

The bit layout, error bound and special groups are documented in `actfx/format.py`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import warnings
from collections.abc import Sequence

import torch

from . import cpu_compiled
from .masks import mask_nbytes, pack_bits_impl, unpack_bits_impl
from .reference import pack_groups_reference, unpack_groups_reference
from .widths import ALLOWED_BITS, TERNARY, check_bits, code_bits, code_bytes, levels, width

__all__ = [
    "pack_groups",
    "unpack_groups",
    "pack_bits",
    "unpack_bits",
    "scale_by_mask",
    "affine_scale_by_mask",
    "channel_affine",
    "pack_bits_between",
    "packed_nbytes",
    "mask_nbytes",
    "check_bits",
    "check_group_size",
    "check_float_dtype",
    "ALLOWED_BITS",
    "TERNARY",
    "code_bits",
    "code_bytes",
    "levels",
    "FLOAT_DTYPES",
    "BACKENDS",
]

MIN_GROUP_SIZE = 32  # >= 32 so that every group has at least 4 code bytes (constant groups need them)
MAX_GROUP_SIZE = 4096
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "compiled", "reference")
CPU_KERNEL_CHOICES = ("compiled", "reference")


# ----------------------------------------------------------------------------------- validation


def check_group_size(group_size: object) -> int:
    """Return `group_size` if it is a power of two from 32 to 4096; TypeError / ValueError otherwise."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(
            f"group_size must be an int (a power of two from 32 to 4096 inclusive), "
            f"got {group_size!r} ({type(group_size).__name__})"
        )
    power_of_two = group_size > 0 and group_size & (group_size - 1) == 0
    if not power_of_two or not MIN_GROUP_SIZE <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be a power of two from 32 to 4096 inclusive, got {group_size}")
    return group_size


def check_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return `dtype` if it is float32, float16 or bfloat16; TypeError naming it otherwise."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"actfx packs float32, float16 or bfloat16 tensors, got dtype {dtype}; "
            f"leave such tensors unpacked (or convert them with .float() first)"
        )
    return dtype


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_seed(seed: object, device: torch.device) -> None:
    _check_tensor("seed", seed)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(
            f"seed must be a one-element int64 tensor, got dtype {seed.dtype} with {seed.numel()} "
            f"elements; build it with torch.tensor([s], dtype=torch.int64, device=x.device)"
        )
    if seed.device != device:
        raise ValueError(f"seed is on {seed.device} but x is on {device}; move the seed to x's device")


def _check_shape(shape: Sequence[int]) -> list[int]:
    """A list of the dims; SymInts pass through untouched so tracing with dynamic shapes works."""
    dims = list(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, torch.SymInt)):
            raise TypeError(f"shape must be a sequence of ints, got {tuple(shape)!r}")
    return dims


def _num_groups(numel: int, group_size: int) -> int:
    return (numel + group_size - 1) // group_size


def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes of codes + meta that `pack_groups` produces for `numel` values (for planners and dry runs)."""
    check_bits(bits)
    check_group_size(group_size)
    return _num_groups(int(numel), group_size) * (code_bytes(bits, group_size) + 4)


# ------------------------------------------------------------------------------------- dispatch


@functools.cache
def _triton_works(device: str) -> bool:
    """Import, compile and run the Triton kernels once on `device`, checking them against the reference.

    Cached per device, so a failure warns once per device and later calls take the reference path.
    """
    try:
        triton_pack = _triton_module()
        x = torch.linspace(-3.0, 5.0, 100, device=device)
        seed = torch.zeros(1, dtype=torch.int64, device=device)
        got = triton_pack.pack_groups_triton(x, seed, 0, 2, 32, False)
        want = pack_groups_reference(x, seed, 0, 2, 32, False)
        back = triton_pack.unpack_groups_triton(*got, (100,), torch.float32, 2, 32)
        same_meta = torch.equal(got[1].view(torch.int16), want[1].view(torch.int16))
        if not (torch.equal(got[0], want[0]) and same_meta):
            raise RuntimeError("Triton pack disagrees with the PyTorch reference")
        if not torch.equal(back, unpack_groups_reference(*want, (100,), torch.float32, 2, 32)):
            raise RuntimeError("Triton unpack disagrees with the PyTorch reference")
        return True
    except Exception as err:  # noqa: BLE001 - any failure means "use the reference here"
        warnings.warn(
            f"actfx: Triton kernels do not work on {device} ({type(err).__name__}: {err}); "
            f"packing there falls back to the slower PyTorch reference",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def _triton_module():
    """`triton_pack`, imported on first use so that `import actfx` works without triton."""
    try:
        from . import triton_pack
    except ImportError as err:
        raise ImportError(
            f"backend='triton' needs the triton package ({err}); install triton or use "
            f"backend='reference'"
        ) from err
    return triton_pack


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend == "triton":
        return True
    if backend in ("reference", "compiled"):
        return False
    return device.type == "cuda" and _triton_works(str(device))


def cpu_kernels_choice() -> str:
    """ACTFX_CPU_KERNELS (read at each call, default "compiled"); ValueError naming it if misspelt."""
    choice = os.environ.get("ACTFX_CPU_KERNELS", "compiled")
    if choice not in CPU_KERNEL_CHOICES:
        raise ValueError(f"ACTFX_CPU_KERNELS must be one of {CPU_KERNEL_CHOICES}, got {choice!r}")
    return choice


_REFERENCE_ONLY = contextvars.ContextVar("actfx_reference_kernels", default=False)


@contextlib.contextmanager
def reference_kernels():
    """Within it, CPU packs run the eager reference (the same format; stochastic rounding draws the
    reference's noise, equally unbiased): for a one-off step, where
    compiling kernels for widths not used before costs more than running them (a plan's check of
    its chosen widths: 9 of the 43 s of ``actfx plan resnet50 --gpu t4`` under cProfile)."""
    token = _REFERENCE_ONLY.set(True)
    try:
        yield
    finally:
        _REFERENCE_ONLY.reset(token)


def _use_compiled(t: torch.Tensor, numel: int, backend: str) -> bool:
    """Plain CPU tensors worth compiling for, when Inductor works here (checked once per process).

    Only exact `torch.Tensor`s: fake, meta or functional tensors (dry runs, export tracing) take
    the eager path, which traces like any other PyTorch code.
    """
    device = t.device
    if backend == "compiled":
        if device.type != "cpu":
            raise ValueError(f"backend='compiled' is the CPU path, got a tensor on {device}")
        return True
    if backend != "auto" or device.type != "cpu" or type(t) is not torch.Tensor or not cpu_compiled.usable(numel) \
            or _REFERENCE_ONLY.get():
        return False
    return cpu_kernels_choice() == "compiled" and cpu_compiled.compiled_cpu_works()


def pack_groups_impl(
    x: torch.Tensor, seed: torch.Tensor, stream: int, bits: int, group_size: int, stochastic: bool,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implementation behind `actfx::pack_groups` (no validation, no custom op)."""
    bits = width(bits)
    if _use_triton(x.device, backend):
        pack_groups_triton = _triton_module().pack_groups_triton
        return pack_groups_triton(x, seed, stream, bits, group_size, stochastic)
    if _use_compiled(x, x.numel(), backend):
        return cpu_compiled.pack_groups_compiled(x, seed, stream, bits, group_size, stochastic)
    return pack_groups_reference(x, seed, stream, bits, group_size, stochastic)


def unpack_groups_impl(
    codes: torch.Tensor, meta: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, bits: int,
    group_size: int, backend: str = "auto",
) -> torch.Tensor:
    """The implementation behind `actfx::unpack_groups` (no validation, no custom op)."""
    bits = width(bits)
    if _use_triton(codes.device, backend):
        unpack_groups_triton = _triton_module().unpack_groups_triton
        return unpack_groups_triton(codes, meta, shape, dtype, bits, group_size)
    if _use_compiled(codes, math.prod(shape), backend):
        return cpu_compiled.unpack_groups_compiled(codes, meta, shape, dtype, bits, group_size)
    return unpack_groups_reference(codes, meta, shape, dtype, bits, group_size)


# ------------------------------------------------------------------------------- public wrappers


def pack_groups(
    x: torch.Tensor,
    seed: torch.Tensor,
    stream: int,
    bits: int,
    group_size: int,
    stochastic: bool,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` in groups: `codes` uint8 [num_groups, code_bytes(bits, G)] and `meta` bf16 [num_groups, 2].

    `seed` (int64, one element, on x's device) and `stream` (an int naming the call site) select
    the rounding noise: equal pairs give equal bytes. The global RNG is never touched.
    """
    _check_tensor("x", x)
    check_float_dtype(x.dtype)
    check_bits(bits)
    check_group_size(group_size)
    _check_seed(seed, x.device)
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int (a call-site id), got {type(stream).__name__}")
    if not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be a bool, got {type(stochastic).__name__}")
    if _check_backend(backend) == "auto":
        return torch.ops.actfx.pack_groups(x, seed, stream, bits, group_size, stochastic)
    return pack_groups_impl(x, seed, stream, bits, group_size, stochastic, backend)


def unpack_groups(
    codes: torch.Tensor,
    meta: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    bits: int,
    group_size: int,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize what `pack_groups` produced: a contiguous tensor of `shape` and `dtype` on codes' device."""
    _check_tensor("codes", codes)
    _check_tensor("meta", meta)
    check_float_dtype(dtype)
    check_bits(bits)
    check_group_size(group_size)
    shape = _check_shape(shape)
    num_groups = _num_groups(math.prod(shape), group_size)
    want_codes = (num_groups, code_bytes(bits, group_size))
    if codes.dtype != torch.uint8 or tuple(codes.shape) != want_codes:
        raise ValueError(
            f"codes must be uint8 of shape {want_codes} for shape={tuple(shape)}, bits={bits}, "
            f"group_size={group_size}; got {codes.dtype} {tuple(codes.shape)}"
        )
    if meta.dtype != torch.bfloat16 or tuple(meta.shape) != (num_groups, 2):
        raise ValueError(
            f"meta must be bfloat16 of shape {(num_groups, 2)}; got {meta.dtype} {tuple(meta.shape)}"
        )
    if meta.device != codes.device:
        raise ValueError(f"codes are on {codes.device} but meta is on {meta.device}; keep them together")
    if _check_backend(backend) == "auto":
        return torch.ops.actfx.unpack_groups(codes, meta, shape, dtype, bits, group_size)
    return unpack_groups_impl(codes.contiguous(), meta.contiguous(), shape, dtype, bits, group_size, backend)


def _fused_bytes(t: torch.Tensor) -> bool:
    """Whether a mask kernel over `t` (8 values per mask byte) runs compiled: eager mode, whole
    bytes, contiguous, and the compiled CPU path applies (`_use_compiled`)."""
    n = t.numel()
    return (not torch.compiler.is_compiling() and n % 8 == 0 and t.is_contiguous()
            and _use_compiled(t, n, "auto"))


def pack_bits_dispatch(mask: torch.Tensor) -> torch.Tensor:
    """The implementation behind `actfx::pack_bits`: compiled on CPU when worth it, eager otherwise."""
    if _fused_bytes(mask):
        return cpu_compiled.pack_bits_compiled(mask)
    return pack_bits_impl(mask)


def pack_bits_between(values: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """`pack_bits(lo < values < hi)` (no upper bound when hi is None): ReLU-like masks in one pass on CPU."""
    if _fused_bytes(values):
        return cpu_compiled.pack_bits_between_compiled(values, lo, hi)
    mask = values > lo
    if hi is not None:
        mask &= values < hi
    return pack_bits(mask)


def scale_by_mask(values: torch.Tensor, codes: torch.Tensor, inside: float, outside: float) -> torch.Tensor:
    """`values * where(mask, inside, outside)` for a mask stored by `pack_bits`, shaped like `values`.

    What ReLU-like and dropout backwards (and rebuilt ReLU outputs) compute. On CPU the bits are
    unpacked inside one fused loop; under torch.compile it stays plain ops for Inductor to fuse.
    """
    if _fused_bytes(values):
        return cpu_compiled.scale_by_bits_compiled(values, codes, inside, outside)
    mask = unpack_bits(codes, values.shape)
    if outside == 0.0:
        return values * mask if inside == 1.0 else values * mask * inside
    return values * torch.where(mask, inside, outside).to(values.dtype)


def channel_affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, channel_dim: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """`(x * a + b).to(dtype)` in fp32 with a, b per channel along `channel_dim` (BatchNorm's
    output from its input). A multiply then an add, never a fused multiply-add: the compiled CPU
    rebuilds compute it the same way, so every path gives the same bits."""
    view = [1] * x.dim()
    view[channel_dim] = -1
    return (x.float() * a.float().view(view)).add_(b.float().view(view)).to(dtype)


def affine_scale_by_mask(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, channel_dim: int,
                         codes: torch.Tensor, inside: float, outside: float, dtype: torch.dtype,
                         addend: torch.Tensor | None = None) -> torch.Tensor:
    """`scale_by_mask((x * a + b).to(dtype) [+ addend], ...)` with a, b per channel along
    `channel_dim`: a conv input rebuilt from BatchNorm's input, affine map and the ReLU mask (and,
    after a residual add, the shortcut). Computed in fp32 as a multiply then an add (no fused
    multiply-add), so every path gives the same bits; on CPU in one fused loop when each
    channel's values fill whole mask bytes."""
    plain = addend is None or (addend.dtype == torch.float32 and addend.shape == x.shape and addend.is_contiguous())
    if (channel_dim == 1 and x.dim() >= 3 and x.dtype == torch.float32 and dtype == torch.float32 and plain
            and (x.numel() // (x.shape[0] * x.shape[1])) % 8 == 0 and _fused_bytes(x)):
        return cpu_compiled.affine_scale_by_bits_compiled(x, a, b, codes, inside, outside, addend)
    y = channel_affine(x, a, b, channel_dim, dtype)
    if addend is not None:
        y = y + addend
    return scale_by_mask(y.contiguous(), codes, inside, outside)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool mask -> uint8 [ceil(n/8)]: bit i goes to byte i // 8, bit i % 8 (LSB first)."""
    _check_tensor("mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits takes a bool mask, got dtype {mask.dtype}; compare first (e.g. x > 0)")
    return torch.ops.actfx.pack_bits(mask)


def unpack_bits(codes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 [ceil(n/8)] -> bool tensor of `shape` (inverse of `pack_bits`)."""
    _check_tensor("codes", codes)
    shape = _check_shape(shape)
    want = mask_nbytes(math.prod(shape))
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != want:
        raise ValueError(
            f"codes must be a 1-D uint8 tensor of {want} bytes for shape {tuple(shape)}; "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    return torch.ops.actfx.unpack_bits(codes, shape)


from . import ops as _ops  # noqa: E402,F401 - registers actfx::* (needs the functions above)
