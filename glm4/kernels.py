"""Hand-written CPU kernels, built with the machine's C++ compiler on first use and cached.

Decoding attends with one query per row; on the CPU the library path (float copies of the cache
and two small matmuls, or SDPA) costs several times the arithmetic: about 300 us a layer at 3,000
cached positions on the benchmark model, against 100 for `csrc/decode_attention.cpp`. Long Z1
answers decode over thousands of positions, so the difference grows with every token.

The kernel is compiled with `-march=native` (g++, or $CXX) into a cache folder ($GLM4_KERNEL_CACHE,
or ~/.cache/glm4/kernels) under a name that hashes the source, the command and this CPU's flags, so
that a home folder shared between machines never hands one a binary built for another. Where it
cannot be built (no compiler, no AVX-512F, not Linux on x86-64) or GLM4_CPU_KERNELS=0, `available()`
says False and the model keeps its float path. It links libgomp as torch does, so it shares torch's
OpenMP threads rather than starting a second team.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
HEAD_DIMS = (64, 128, 256)


def cache_dir() -> Path:
    if os.environ.get("GLM4_KERNEL_CACHE"):
        return Path(os.environ["GLM4_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm4" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build(source: Path, folder: Path) -> Path:
    """Compile `source` against torch into a shared library in `folder` (reused if already there);
    raises OSError or CalledProcessError when it cannot."""
    command = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    command += ["-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    root = Path(torch.__file__).parent  # torch.utils.cpp_extension's paths, without importing setuptools
    command += [f"-I{root / 'include'}"]
    libraries = [f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu"]
    identity = [source.read_text(), *command, torch.__version__, _cpu_flags()]
    key = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log.info("glm4: building %s (once for this machine and torch)", source.name)
    # Another process may build the same file at the same time: each writes its own and renames.
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / target.name
        compile_ = [*command, str(source), "-o", str(out), *libraries]
        subprocess.run(compile_, check=True, capture_output=True, timeout=600)
        os.replace(out, target)
    return target


def _load() -> bool:
    """Whether the decode-attention kernel is built, loaded and can run here."""
    if os.environ.get("GLM4_CPU_KERNELS", "1") == "0":
        return False
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        library = ctypes.CDLL(str(build(SOURCE, cache_dir())))  # registers the op's CPU kernel
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.info("glm4: no CPU decode-attention kernel (%s) %s", e, detail.decode(errors="replace")[-500:])
        return False
    if not library.glm4_decode_attention_supported():
        log.info("glm4: no CPU decode-attention kernel (this CPU has no AVX-512F)")
        return False
    return True


_available: bool | None = None


def available() -> bool:
    """Whether the kernel is built and can run here; builds it on the first call. While torch.compile
    traces, only an answer found before counts (`generation.compiled_step` asks first)."""
    global _available
    if _available is None and not torch.compiler.is_compiling():
        _available = _load()
    return bool(_available)


def can_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` runs these inputs: bf16 on the CPU, a head dim it has a kernel
    for, and nothing that needs gradients."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and q.shape[-1] in HEAD_DIMS
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
        and available()
    )


# The op is declared here and its CPU kernel registered by the built library, so that a compiled
# step calls C++ directly: a kernel written in Python (ctypes) spent 20-30 us a call around 10 of work.
_ops = torch.library.Library("glm4", "FRAGMENT")
_ops.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per row: q (B, H, 1, D), k and v (B, H_kv, S, D),
    mask None or a (B, 1, 1, S) bool of the keys each row may see. Check `can_decode` first."""
    return torch.ops.glm4.decode_attention(q, k, v, mask, scale)


@torch.library.register_fake("glm4::decode_attention")
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
