"""Hand-written CPU kernels for decoding, built with the machine's C++ compiler on first use and cached.

- `decode_attention` (csrc/decode_attention.cpp): one query per row attends over a bf16 KV cache.
  The library path (float copies of the cache and two small matmuls, or SDPA) costs several times
  the arithmetic: about 300 us a layer at 3,000 cached positions on the benchmark model, against
  100 here. Long Z1 answers decode over thousands of positions, so that grows with every token.
- `prompt_attention` (csrc/prompt_attention.cpp): a prompt's queries attend over a bf16 cache,
  causally or under a mask, flash style on bf16 dot-product micro-tiles: 2.3-4x torch's CPU
  flash kernel (2.13), which multiplies its small blocks through the general GEMM.
- `int4_linear` (csrc/int4_linear.cpp, int4.h): up to 32 rows times a group-wise int4 weight in
  glm4's stored layout, unpacked with bitwise ops and multiplied in bf16 pairs (4 rows to a pass,
  or 16 on AMX tiles where the CPU has them), where torch's CPU int4 kernel is bound by its
  unpacking rather than by memory. `int4_dequantize`: the weight as bf16, for prefill's matmuls.
- `int8_linear` (csrc/int8_linear.cpp, int8.h): a few rows of bf16 times glm4's int8 weight with
  its per-row scales, widening the weight for float32 FMAs, or on AMX-INT8 tiles with x split
  exactly into 8-bit digits; torch's int8 kernel is 2-4x slower at 1 to 32 rows.
- `bf16_linear` (csrc/bf16_linear.cpp): a few rows of bf16 times a plain bf16 weight in one
  pass over it, for eager and batched decoding, where oneDNN needs a packed copy of the weight
  and still runs 1.2-1.6x slower at 1 to 4 rows. On a CPU with AMX tiles it runs on them
  (csrc/linear.h, amx.h; `set_amx`).
- `decode_step` (csrc/decode_step.cpp): a Glm4ForCausalLM's whole decode step in one call, its
  projections bf16, int8 or int4, over the cores of the kernels above (csrc/attention.h, linear.h,
  int8.h, int4.h; see glm4/fused.py); and `argmax`, the greedy pick from float logits.

All are registered as torch ops (declared here, their CPU kernels registered by the library), so
a compiled step calls C++ directly: the same kernel called from Python through ctypes spent 20-30 us
a call around 10 of work. The library is compiled with `-march=native` (g++, or $CXX) against
torch's headers into a cache folder ($GLM4_KERNEL_CACHE, or ~/.cache/glm4/kernels) under a name
that hashes the sources, the command, torch's version and this CPU's flags, so that a home folder
shared between machines never hands one a binary built for another. Where it cannot be built (no
compiler, not Linux on x86-64), where the CPU lacks the instructions (decode_attention: AVX-512F,
or AVX2 and FMA, csrc/attention.h being written over either's vectors; prompt_attention AVX-512F,
BW and BF16; decode_step and argmax AVX-512BW, VL and BF16), or with GLM4_CPU_KERNELS=0,
`available(op)` says False and the model keeps its float path, SDPA, torch's kernel or oneDNN.
The linears (bf16, int8, int4) need AVX-512BW and BF16 (and VL for int8); on a CPU without them
but with AVX2 and FMA (most desktop and laptop CPUs, and AVX-512 Xeons before Cooper Lake) they
are built from csrc/avx2.h instead: the weight widened to float32 in registers for FMAs, one row
of x 1.6-3.4x the library's kernels (`avx2()`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OPS = ("decode_attention", "prompt_attention", "int4_linear", "int8_linear", "bf16_linear", "decode_step")
SOURCES = [Path(__file__).with_name("csrc") / f"{op}.cpp" for op in OPS]
HEAD_DIMS = (64, 128, 256)
# Smaller weights (a toy model's) spend more in the call than in the product: not worth the build.
BF16_LINEAR_MIN_WEIGHT = 1 << 18
ARGMAX_MIN_VOCAB = 1 << 14


def cache_dir() -> Path:
    if os.environ.get("GLM4_KERNEL_CACHE"):
        return Path(os.environ["GLM4_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm4" / "kernels"


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(field)), "")
    except OSError:
        return ""


def _cpu_flags() -> str:
    return _cpuinfo("flags")


def prefetch_rows_default(vendor: str, setting: str | None = None) -> int:
    """The rows of x from which the vector kernels ask for their weight's lines ahead (see
    `set_prefetch_rows`): GLM4_PREFETCH_ROWS where it is set (`setting`), else by the CPU's vendor
    (/proc/cpuinfo's vendor_id line). Intel's hardware prefetcher keeps one core's stream well below
    what memory allows, so there they always ask (bf16 at 1 to 8 rows up to 1.9x as fast); AMD's (Zen
    4, the development machine) streams one or two rows' products faster alone (bf16 1.03-1.10x on
    single matrices, the batch-1 decode step 1.05-1.3x), while from 3 or 4 rows asking is faster
    (int8 1.05-1.25x)."""
    if setting:
        try:
            rows = int(setting)
        except ValueError:
            rows = 0
        if rows < 1:
            raise ValueError(f"GLM4_PREFETCH_ROWS must be a whole number of rows >= 1, got {setting!r}")
        return rows
    return 3 if "AuthenticAMD" in vendor else 1


def build(sources: list[Path], folder: Path, name: str = "glm4_cpu") -> Path:
    """Compile `sources` (and the headers beside them) against torch into one shared library in
    `folder`, reused if already there; raises OSError or CalledProcessError when it cannot."""
    command = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-fopenmp", "-fPIC"]
    command += ["-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    root = Path(torch.__file__).parent  # torch.utils.cpp_extension's paths, without importing setuptools
    command += [f"-I{root / 'include'}"]
    libraries = [f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]
    headers = sorted({h for source in sources for h in source.parent.glob("*.h")})
    identity = [*(f.read_text() for f in [*sources, *headers]), *command, torch.__version__, _cpu_flags()]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    target = folder / f"{name}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU kernels (once per machine and torch version, about 10-20 s): %s", target.name)
    # Another process may build the same file at the same time: each writes its own and renames.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = [Path(tmp) / f"{i}-{source.stem}.o" for i, source in enumerate(sources)]

        def run(arguments: list[str]) -> None:
            subprocess.run(arguments, check=True, capture_output=True, timeout=600)

        with ThreadPoolExecutor(len(sources)) as pool:  # the sources side by side
            compiles = [[*command, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects, strict=True)]
            list(pool.map(run, compiles))
        out = Path(tmp) / target.name
        run([command[0], "-shared", "-fopenmp", *map(str, objects), "-o", str(out), *libraries])
        os.replace(out, target)
    return target


def _load() -> dict[str, bool]:
    """Which ops' kernels are built, loaded and can run here."""
    if os.environ.get("GLM4_CPU_KERNELS", "1") == "0":
        return {}
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    try:
        library = ctypes.CDLL(str(build(SOURCES, cache_dir())))  # registers the ops' CPU kernels
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.info("no CPU kernels (%s) %s", e, detail.decode(errors="replace")[-500:])
        return {}
    global _library, _amx, _avx2
    _library = library
    _avx2 = bool(library.glm4_avx2())
    _amx = bool(library.glm4_set_amx(0 if os.environ.get("GLM4_AMX") == "0" else -1))
    library.glm4_set_prefetch_rows.restype = ctypes.c_int64
    library.glm4_set_prefetch_rows.argtypes = [ctypes.c_int64]
    rows = prefetch_rows_default(_cpuinfo("vendor_id"), os.environ.get("GLM4_PREFETCH_ROWS"))
    library.glm4_set_prefetch_rows(rows)
    supported = {op: bool(getattr(library, f"glm4_{op}_supported")()) for op in OPS}
    if not all(supported.values()):
        log.info("this CPU lacks the instructions of some kernels: %s", supported)
    return supported


_supported: dict[str, bool] | None = None
_library: ctypes.CDLL | None = None
_amx: bool | None = None  # set_amx's answer, kept
_avx2 = False


def avx2() -> bool:
    """Whether the linear kernels are the AVX2 ones (csrc/avx2.h: a CPU without AVX-512 BF16), which
    run fewer rows of x faster than the library (see linear.kernel_rows)."""
    return available("bf16_linear") and _avx2


def available(op: str = "decode_attention") -> bool:
    """Whether `op`'s kernel is built and can run here; builds the library on the first call. While
    torch.compile traces, only an answer found before counts (`steps.compiled_step` asks first)."""
    global _supported
    if _supported is None and not torch.compiler.is_compiling():
        _supported = _load()
    return bool(_supported and _supported.get(op))


def set_amx(enabled: bool | None = None) -> bool:
    """Turn the kernels' AMX paths on or off (None: leave them); returns whether they run now.

    On a CPU with AMX tiles (Intel Xeon, Sapphire Rapids and later) the bf16 products of up to 32
    rows run on them by default (weights of a width that is a multiple of 32): as fast as the
    vector path at one row, about twice at eight, and faster than oneDNN at up to 32. So do the
    int4 kernel's rows (about 1.2-1.3x the vector path at one row, and up to 16 rows a pass) and
    the int8 kernel's (on the AMX-INT8 tiles, up to 32 rows). The paths add in different orders,
    so a row's numbers change with the switch (never with its batch): change it between
    generations, not within one. GLM4_AMX=0 in the environment starts with it off.
    """
    global _amx
    if enabled is None and (_amx is not None or torch.compiler.is_compiling()):
        return bool(_amx)
    if not available("bf16_linear") or _library is None:
        return False
    _amx = bool(_library.glm4_set_amx(-1 if enabled is None else int(enabled)))
    return _amx


def set_prefetch_rows(rows: int | None = None) -> int:
    """The rows of x from which the vector kernels (bf16, int8 and int4 products, the fused step's
    too) ask for each line of their weight 4 KiB ahead of reading it: set it where `rows` is given;
    returns it (0 where the kernels are not built). Set on load by `prefetch_rows_default`. Only
    speed changes with it, never the numbers."""
    if not available("bf16_linear") or _library is None:
        return 0
    if rows is not None and rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return int(_library.glm4_set_prefetch_rows(rows or 0))


def _inference(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _attends(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] in HEAD_DIMS
        and _inference(q, k, v)
        and available(op)
    )


def can_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` runs these inputs: bf16 on the CPU, a head dim it has a kernel
    for, and nothing that needs gradients."""
    return _attends("decode_attention", q, k, v)


def can_prompt(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `prompt_attention` runs these inputs: as `can_decode`, where this CPU has the
    prompt kernel's instructions."""
    return _attends("prompt_attention", q, k, v)


def can_bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `bf16_linear` runs x @ weight.T: both bf16 on the CPU, a contiguous weight of at
    least BF16_LINEAR_MIN_WEIGHT elements, nothing that needs gradients. The caller picks the rows."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.numel() >= BF16_LINEAR_MIN_WEIGHT
        and weight.is_contiguous()
        and _inference(x, weight)
        and available("bf16_linear")
    )


def can_int8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `int8_linear` runs x @ (weight * scales).T: bf16 x and an int8 weight on the CPU, a
    contiguous weight of at least BF16_LINEAR_MIN_WEIGHT elements, nothing that needs gradients.
    The caller picks the rows (`linear.QUANTIZED_KERNEL_ROWS`)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and weight.numel() >= BF16_LINEAR_MIN_WEIGHT
        and weight.is_contiguous()
        and _inference(x)
        and available("int8_linear")
    )


def can_int4_dequantize(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `int4_dequantize` makes the bf16 weight for a matmul with x: bf16 x and the packed
    int4 weight (N, K/2) on the CPU, at least BF16_LINEAR_MIN_WEIGHT weights (not a toy model's)."""
    return (
        x.device.type == weight.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.numel() * 2 >= BF16_LINEAR_MIN_WEIGHT
        and available("int4_linear")
    )


def int4_group_fits(group_size: int) -> bool:
    """Whether `int4_linear` and `decode_step` take int4 groups of this many columns: 64, or a
    multiple of 128 (the kernel unpacks 128 columns at a time, two groups of 64 or part of one; as
    `int4_group_fits` in glm4/csrc/int4.h)."""
    return group_size == 64 or (group_size > 0 and group_size % 128 == 0)


def can_int4(x: torch.Tensor, group_size: int) -> bool:
    """Whether `int4_linear` runs x: bf16 on the CPU, groups of 64 columns or a multiple of 128. The caller
    picks the rows (`linear.QUANTIZED_KERNEL_ROWS`)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and int4_group_fits(group_size)
        and _inference(x)
        and available("int4_linear")
    )


_ops = torch.library.Library("glm4", "FRAGMENT")
_ops.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_ops.define("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
_ops.define("int4_linear(Tensor x, Tensor weight, Tensor scales_and_zeros, int group_size) -> Tensor")
_ops.define("bf16_linear(Tensor x, Tensor weight) -> Tensor")
_ops.define("int8_linear(Tensor x, Tensor weight, Tensor scales) -> Tensor")
_ops.define("int4_dequantize(Tensor weight, Tensor scales_and_zeros, int group_size) -> Tensor")
_ops.define(
    "decode_step(Tensor tokens, Tensor positions, Tensor mask, Tensor cache_position, Tensor[] weights, "
    "Tensor(a!)[] keys, Tensor(b!)[] values, Tensor inv_freq, float rope_scale, float eps, float scale, "
    "Tensor? rows=None) -> Tensor"
)
_ops.define("argmax(Tensor logits) -> Tensor")


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per row: q (B, H, 1, D), k and v (B, H_kv, S, D),
    mask None or a (B, 1, 1, S) bool of the keys each row may see. Check `can_decode` first."""
    return torch.ops.glm4.decode_attention(q, k, v, mask, scale)


def prompt_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v for many queries per row: q (B, H, T, D), k and v (B, H_kv, S, D)
    with S >= T, mask a (B, 1, T, S) bool of the keys each query may see, or None for causal
    attention of the last T positions. Check `can_prompt` first."""
    return torch.ops.glm4.prompt_attention(q, k, v, mask, scale)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight.T for bf16 x and weight (N, K), without bias, in one pass over the
    weight for up to 8 rows of x at a time (32 on AMX tiles). Check `can_bf16_linear` first."""
    return torch.ops.glm4.bf16_linear(x, weight)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (weight * scales[:, None]).T for bf16 x, the int8 weight (N, K) and bf16 scales
    (N) of `quantization.Int8Linear` (without bias), in one pass over the weight for up to 8 rows
    of x at a time (16 on AMX tiles)."""
    return torch.ops.glm4.int8_linear(x, weight, scales)


def int4_linear(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
    """x (..., K) times the int4 weight of `quantization.Int4Linear` (without bias): weight (N, K/2)
    bytes, scales_and_zeros (N, K/group_size, 2); one pass over the weight per 4 rows of x, or per
    16 on AMX tiles. Check `can_int4` first."""
    return torch.ops.glm4.int4_linear(x, weight, scales_and_zeros, group_size)


def int4_dequantize(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The bf16 weight (N, K) of `quantization.Int4Linear`'s int4 weight (N, K/2) and scales and
    zeros (N, K/group_size, 2): the same numbers as its `dequantize().bfloat16()`, about ten times
    as fast. Check `available("int4_linear")` first."""
    return torch.ops.glm4.int4_dequantize(weight, scales_and_zeros, group_size)


def decode_step(
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache_position: torch.Tensor,
    weights: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    inv_freq: torch.Tensor,
    rope_scale: float,
    eps: float,
    scale: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Glm4ForCausalLM's whole decode step in one call: float logits (B, vocab), the cache written
    at `cache_position`, in its batch rows `rows` (None: rows 0..B-1). `glm4.fused` builds the
    arguments and says when it applies."""
    return torch.ops.glm4.decode_step(
        tokens, positions, mask, cache_position, weights, keys, values, inv_freq, rope_scale, eps, scale, rows
    )


def can_argmax(logits: torch.Tensor) -> bool:
    """Whether `argmax` runs these logits: float32 (B, V) on the CPU with V of at least
    ARGMAX_MIN_VOCAB (a real vocabulary; a toy one is not worth the kernel build)."""
    return (
        logits.device.type == "cpu"
        and logits.dtype == torch.float32
        and logits.dim() == 2
        and logits.shape[-1] >= ARGMAX_MIN_VOCAB
        and available("decode_step")
    )


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, -1) for float32 (B, V) logits (the first of equal values, the first NaN
    if any), about ten times faster for one row of a real vocabulary. Check `can_argmax` first."""
    return torch.ops.glm4.argmax(logits)


@torch.library.register_fake("glm4::decode_attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("glm4::prompt_attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("glm4::int4_linear")
def _(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("glm4::int8_linear")
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("glm4::int4_dequantize")
def _(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int):
    return scales_and_zeros.new_empty(weight.shape[0], weight.shape[1] * 2)


@torch.library.register_fake("glm4::bf16_linear")
def _(x: torch.Tensor, weight: torch.Tensor):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
