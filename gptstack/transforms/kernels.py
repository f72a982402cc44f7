"""Matrix-vector kernels for batch-1 decoding on CPU: fp32, int8, int4 and grouped int8 weights.

Decoding one token reads every weight once for two FLOPs each: it is bound by memory bandwidth.
On a 2-core CI machine (≈30 GB/s streaming reads) the BLAS GEMV behind F.linear reaches about
10 GB/s on nn.Linear's (out, in) layout; the small C kernels of csrc/gemv.c reach 25-35 GB/s, and
their int8 and int4 versions read 4× and 8× fewer bytes, dequantizing in registers
(benchmarks/bench_infer.py has the per-shape table, with torch.compile's generated loop beside them).

The C file is compiled on first use with the system's gcc (-O3 -march=native -fopenmp) into
$GPTSTACK_CACHE (default ~/.cache/gptstack) and called through ctypes. The PyTorch definitions below
are the reference the C code must equal (tests compare them); without a working compiler they run
instead, after one warning.

Shapes: x (1, K) fp32 contiguous; fp32 w (N, K); int8 q (N, K) with scales (N,); int4 `packed`
(K/2, N) uint8 holding rows 2j (low nibble) and 2j+1 (high nibble) of the (K, N) codes, with
per-group scales and minimums (G, N), G = K / group: w[k, n] = code[k, n]·scale[k // group, n] +
minimum[k // group, n]; grouped int8 (GGUF's Q8_0, kept as codes on import) q (N, K) with scales
(N, K / group): w[n, k] = q[n, k]·scale[n, k // group], for up to SMALL_M rows x (M, K). Output (M, N).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
GEMM_SOURCE = Path(__file__).with_name("csrc") / "gemm.c"
# 2..SMALL_M rows (a decode batch, a speculative verification) go through the register-tiled kernels of
# csrc/gemm.c instead of BLAS: measured per shape (benchmarks/bench_infer.py --parts kernels), fp32 BLAS sgemm is
# 1.5-3x slower there on the gpt2-small and SmolLM2 shapes (and quantized weights would need a full dequantized copy
# per call); beyond 64 rows (prefill) BLAS catches up
SMALL_M = 64
ENABLED = True  # set False to run the PyTorch definitions (tests compare the two)
_lib: ctypes.CDLL | bool | None = None  # None: not built yet; False: unavailable
_gemm_lib: ctypes.CDLL | bool | None = None


def gemv_ref(x: Tensor, w: Tensor) -> Tensor:
    return x @ w.t()


def gemv_int8_ref(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    return (x @ q.to(x.dtype).t()) * scales.to(x.dtype)


def gemv_int4_ref(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    G, N = scales.shape
    codes = torch.stack([packed & 15, packed >> 4], dim=1).view(-1, N).to(x.dtype)  # (K, N)
    w = codes.view(G, -1, N) * scales.to(x.dtype)[:, None] + mins.to(x.dtype)[:, None]  # (G, group, N)
    return x @ w.view(-1, N)


def gemm_int8g_ref(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    N, K = q.shape
    w = q.to(x.dtype).view(N, scales.size(1), -1) * scales.to(x.dtype)[..., None]  # (N, G, group)
    return x @ w.view(N, K).t()


ACT_BLOCK = 32  # activation values per int8 block (scale) of the w8a8 products (csrc/decode.c's Act8)


def quantize_act_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) fp32, K a multiple of 32 → int8 codes (..., K) and one scale per block of 32 (..., K/32), as
    decode.c's quantize_act computes them (bit for bit): d = max|x| · (1/127), codes round-half-even(x · (1/d))
    clamped to [-127, 127] (all zero where d = 0). x ≈ codes · d: llama.cpp's Q8_0 activation blocks."""
    if x.size(-1) % ACT_BLOCK:
        raise ValueError(f"int8 activations need a width divisible by {ACT_BLOCK}, got {x.size(-1)}")
    xb = x.float().reshape(*x.shape[:-1], -1, ACT_BLOCK)  # (..., K/32, 32)
    d = xb.abs().amax(-1) * torch.tensor(1.0, dtype=torch.float32).div(127)  # (..., K/32)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    codes = (xb * inv[..., None]).round().clamp(-127, 127)
    return codes.to(torch.int8).reshape(x.shape), d


def fake_quantize_act(x: Tensor) -> Tensor:
    """x (..., K) replaced by the values its int8 blocks stand for (codes · d): a w8a8 product equals the
    weight-only product of this, up to float summation order (the reference of the native a8 step)."""
    codes, d = quantize_act_ref(x)
    return (codes.float().reshape(*d.shape, ACT_BLOCK) * d[..., None]).reshape(x.shape).to(x.dtype)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built once per source version and machine; None when unavailable."""
    global _lib
    if _lib is None:
        _lib = _load(lambda: _declare(_build(SOURCE)))
    return _lib or None


def gemm_library() -> ctypes.CDLL | None:
    """The register-tiled kernels of csrc/gemm.c (M >= 2 rows); None when unavailable."""
    global _gemm_lib
    if _gemm_lib is None:
        _gemm_lib = _load(lambda: _declare_gemm(_build(GEMM_SOURCE)))
    return _gemm_lib or None


def _load(build) -> ctypes.CDLL | bool:
    try:
        return build()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode()[-300:] if isinstance(e, subprocess.CalledProcessError) else str(e)
        warnings.warn(f"decode kernels unavailable (gcc failed: {detail}); using PyTorch ops", stacklevel=4)
        return False


def _build(source: Path, libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`libs`: linker flags after the source (decode.c's vectorised expf needs libm's vector functions, -lm). The
    cache key covers the source and the local files it includes (decode.c includes gemm.c)."""
    text = source.read_bytes()
    for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
        text += (source.parent / name.decode()).read_bytes()
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(text + " ".join(flags + list(libs)).encode() + os.uname().machine.encode()).hexdigest()[:16]
    root = Path(os.environ.get("GPTSTACK_CACHE", Path.home() / ".cache" / "gptstack")) / "kernels"
    lib = root / f"{source.stem}-{key}.so"
    if not lib.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{source.stem}-{key}-{os.getpid()}.so"
        subprocess.run(["gcc", *flags, str(source), *libs, "-o", str(tmp)], check=True, capture_output=True)
        os.replace(tmp, lib)  # atomic: concurrent builders never load a half-written file
    return ctypes.CDLL(str(lib))


def _declare_gemm(cdll: ctypes.CDLL) -> ctypes.CDLL:
    P, I = ctypes.c_void_p, ctypes.c_int
    cdll.gemm_tiled_f32.argtypes = [P, P, P, I, I, I]
    cdll.gemm_tiled_int8.argtypes = [P, P, P, P, I, I, I]
    cdll.gemm_tiled_int8g.argtypes = [P, P, P, P, I, I, I, I]
    cdll.gemm_tiled_int4.argtypes = [P, P, P, P, P, I, I, I, I]
    cdll.paged_decode_attention.argtypes = [P, P, P, P, P, P, I, I, I, I, I, I, I, ctypes.c_float]
    return cdll


def _declare(cdll: ctypes.CDLL) -> ctypes.CDLL:
    P, I = ctypes.c_void_p, ctypes.c_int
    cdll.gemv_f32.argtypes = [P, P, P, I, I]
    cdll.gemv_int8.argtypes = [P, P, P, P, I, I]
    cdll.gemv_int4.argtypes = [P, P, P, P, P, I, I, I]
    cdll.gemm_int8g.argtypes = [P, P, P, P, I, I, I, I]
    return cdll


def _usable(x: Tensor, *tensors: Tensor, rows: int = 1, lib=library) -> ctypes.CDLL | None:
    if not ENABLED or x.device.type != "cpu" or x.dtype != torch.float32 or not 1 <= x.size(0) <= rows:
        return None
    if not all(t.is_contiguous() for t in (x, *tensors)) or any(t.dtype == torch.float64 for t in tensors):
        return None
    return lib()


def gemv(x: Tensor, w: Tensor) -> Tensor:
    lib = _usable(x, w)
    if lib is None or w.dtype != torch.float32:
        return gemv_ref(x, w)
    y = x.new_empty(1, w.size(0))
    lib.gemv_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.size(1), w.size(0))
    return y


def gemm(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) with M <= SMALL_M · w (N, K)ᵀ → (M, N), register-tiled: each weight row read once for all M rows.
    BLAS sgemm is slowest exactly here (M = 2..16 on this CPU: 3-10× slower per row than one row), which is where
    a decode batch of a few sequences and a speculative verification of k+1 tokens fall."""
    lib = _usable(x, w, rows=SMALL_M, lib=gemm_library)
    if lib is None or w.dtype != torch.float32:
        return x @ w.t()
    y = x.new_empty(x.size(0), w.size(0))
    lib.gemm_tiled_f32(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.size(0), x.size(1), w.size(0))
    return y


def gemm_int8(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x (M, K), M <= SMALL_M · the int8 weight (N, K)ᵀ with scales (N,) → (M, N); codes converted once per tile."""
    lib = _usable(x, q, scales, rows=SMALL_M, lib=gemm_library)
    if lib is None or scales.dtype != torch.float32:
        return gemv_int8_ref(x, q, scales)
    (M, K), N = x.shape, q.size(0)
    y = x.new_empty(M, N)
    lib.gemm_tiled_int8(x.data_ptr(), q.data_ptr(), scales.data_ptr(), y.data_ptr(), M, K, N)
    return y


def gemm_int4(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """x (M, K), M <= SMALL_M · the int4 weight (packed (K/2, N), scales and mins (G, N)) → (M, N)."""
    lib = _usable(x, packed, scales, mins, rows=SMALL_M, lib=gemm_library)
    if lib is None or scales.dtype != torch.float32:
        return gemv_int4_ref(x, packed, scales, mins)
    (M, K), N = x.shape, packed.size(1)
    y = x.new_empty(M, N)
    lib.gemm_tiled_int4(
        x.data_ptr(), packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), y.data_ptr(), M, K, N, K // scales.size(0)
    )
    return y


def gemv_int8(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    lib = _usable(x, q, scales)
    if lib is None or scales.dtype != torch.float32:
        return gemv_int8_ref(x, q, scales)
    y = x.new_empty(1, q.size(0))
    lib.gemv_int8(x.data_ptr(), q.data_ptr(), scales.data_ptr(), y.data_ptr(), x.size(1), q.size(0))
    return y


def gemv_int4(x: Tensor, packed: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    lib = _usable(x, packed, scales, mins)
    if lib is None or scales.dtype != torch.float32:
        return gemv_int4_ref(x, packed, scales, mins)
    K, N = x.size(1), packed.size(1)
    y = x.new_empty(1, N)
    lib.gemv_int4(
        x.data_ptr(), packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), y.data_ptr(), K, N, K // scales.size(0)
    )
    return y


def gemm_int8g(x: Tensor, q: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) with M <= SMALL_M · the grouped int8 weight (N, K)ᵀ, dequantized one tile at a time: a tied
    Q8_0 output head (49,152 × 576 for SmolLM2) never materialises its 113 MB fp32 copy. One row runs the
    batch-1 kernel of gemv.c, more the tiled one of gemm.c."""
    rows = x.size(0)
    lib = _usable(x, q, scales, rows=SMALL_M, lib=library if rows == 1 else gemm_library)
    if lib is None or scales.dtype != torch.float32:
        return gemm_int8g_ref(x, q, scales)
    (M, K), N = x.shape, q.size(0)
    y = x.new_empty(M, N)
    kernel = lib.gemm_int8g if M == 1 else lib.gemm_tiled_int8g
    kernel(x.data_ptr(), q.data_ptr(), scales.data_ptr(), y.data_ptr(), M, K, N, K // scales.size(1))
    return y


def paged_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, table: Tensor, lens: Tensor, window: int | None, scale: float
) -> Tensor | None:
    """One query row per sequence against its own blocks of a layer's KV pool, read in place (csrc/gemm.c).
    q (B, h, hd); k, v (num_blocks, bs, kv, hd); table (B, W) int64 block ids; lens (B,) int64 context
    lengths; window: the band, None for dense. Returns (B, h, hd), or None where the kernel does not apply
    (not fp32 CPU, not contiguous, no compiler): the caller then gathers and runs SDPA."""
    if not ENABLED or q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype == torch.float32):
        return None
    if not all(t.is_contiguous() for t in (q, k, v, table, lens)) or table.dtype != torch.long:
        return None
    lib = gemm_library()
    if lib is None:
        return None
    (B, h, hd), (bs, kv) = q.shape, k.shape[1:3]
    out = torch.empty_like(q)
    lib.paged_decode_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), table.data_ptr(), lens.data_ptr(), out.data_ptr(),
        B, h, kv, hd, bs, table.size(1), window or 0, scale,
    )  # fmt: skip
    return out
