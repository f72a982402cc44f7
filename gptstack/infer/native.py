"""Native batch-1 decoding: one C call per token for a Llama-style GPT (transforms/csrc/decode.c).

A decode step of SmolLM2-135M runs 30 thin layers (576 wide); through PyTorch each layer costs ~40 small ops
(norms, RoPE, cache writes, SDPA, views) whose dispatch adds up to more than the weight reads themselves at
int4. `NativeDecoder(model)` gathers pointers to the model's own weights (no copy; fp32, int8, int4 and
int8g linears as transforms/quantize.py lays them out, a Q8_0 token table and its tied head) and runs the
whole step in C: RMSNorm, QKV, RoPE, attention over the contiguous KV cache, SwiGLU MLP, residuals, head.

The prompt is prefilled by the PyTorch forward (BLAS matrix products) into an `infer.kvcache.KVCache`,
whose buffers the C step then reads and extends in place. `supports(model)` says which models qualify:
RMSNorm pre-norm blocks, rotary positions, dense attention, SwiGLU, no MoE, QK-norm or sandwich norms, fp32
activations on CPU. The reference is the plain forward loop (`infer.generate.generate`): the tests compare
greedy tokens and logits.

`NativeDecoder(model, act_int8=True)` (opt-in; default off) runs the quantized linear layers (int8, int4 and
int8g, so a kept Q4_1/Q8_0 file too) as w8a8 products, as llama.cpp's Q8_0/Q8_1 dot products do: each layer's
input is quantized once into int8 blocks of 32 (one scale each) and multiplied by the integer codes in integer
SIMD, one float FMA per block. Decoding is compute-bound on the float dequantization otherwise. The step then
equals the forward under `transforms.quantize.int8_activations(model)` (its quantized layers see
`kernels.fake_quantize_act(x)` instead of x), which the prefill runs; fp32 layers keep fp32 activations. Needs
every quantized layer's input width and weight groups in multiples of 32.

`PagedDecoder(model, k, v)` is the same step over the engine's paged KV pool (infer/engine.py's PagedKVCache, k/v
(n_layer, num_blocks, bs, kv, hd)): `step(token, pos, blocks)` reads and writes through the sequence's block
table. decode.c has one layer for both: its `KV` layout (strides, and a block table or none) says where each
position's keys and values live.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from gptstack.infer.kvcache import KVCache
from gptstack.model import GPT
from gptstack.transforms import kernels
from gptstack.transforms.decode import DecodeLinear
from gptstack.transforms.quantize import QuantizedEmbedding, QuantizedLinear, TiedHead, int8_activations

SOURCE = Path(kernels.__file__).with_name("csrc") / "decode.c"
LAYOUT = {"fp32": 0, "int8": 1, "int4": 2, "int8g": 3}  # the Lin kinds of decode.c
_lib: ctypes.CDLL | bool | None = None


class Lin(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("kind", "K", "N", "g", "a8", "f16")] + [
        (n, ctypes.c_void_p) for n in ("w", "s", "m", "bias", "pw", "ps", "pm", "pc")
    ]


class KV(ctypes.Structure):
    """decode.c's KV layout: (layer l, kv head j, position t) at k/v + l*layer + blk*block + (t % bs)*pos + j*head,
    blk = table[t // bs] (int64 block ids) or, without a table, t // bs."""

    _fields_ = (
        [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("table", ctypes.c_void_p)]
        + [(n, ctypes.c_int64) for n in ("layer", "block", "pos", "head")]
        + [("bs", ctypes.c_int)]
    )


class Model(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int) for n in ("n_layer", "D", "h", "kv", "hd", "ff", "V", "max_len", "nthreads")],
        *[(n, ctypes.c_float) for n in ("eps", "scale", "norm_offset")],
        ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p),
        ("emb_kind", ctypes.c_int),
        ("emb_g", ctypes.c_int),
        ("emb_w", ctypes.c_void_p),
        ("emb_s", ctypes.c_void_p),
        *[(n, ctypes.POINTER(ctypes.c_void_p)) for n in ("ln1", "ln2")],
        ("lnf", ctypes.c_void_p),
        *[(n, ctypes.POINTER(Lin)) for n in ("qkv", "proj", "fc", "down")],
        ("head", Lin),
        ("cache", KV),
        *[(n, ctypes.c_void_p) for n in ("scratch", "act")],
    ]


def act_bytes(K: int) -> int:
    """Scratch bytes of decode.c's Act8 for an input of width K: K codes, then K/32 scales and K/32 block sums."""
    return K + 8 * (K // kernels.ACT_BLOCK)


def library() -> ctypes.CDLL | None:
    """csrc/decode.c compiled (once per source version and machine), or None without a compiler."""
    global _lib
    if _lib is None:
        _lib = kernels._load(lambda: _declare(kernels._build(SOURCE, ("-lm",))))
    return _lib or None


def _declare(cdll: ctypes.CDLL) -> ctypes.CDLL:
    P = ctypes.c_void_p
    cdll.decode_step.argtypes = [ctypes.POINTER(Model), ctypes.c_int, ctypes.c_int, P]
    cdll.native_linear.argtypes = [ctypes.POINTER(Lin), P, P, ctypes.c_int, P]
    cdll.batch_floats.argtypes, cdll.batch_floats.restype = [ctypes.POINTER(Model), ctypes.c_int], ctypes.c_int64
    cdll.decode_batch.argtypes = [ctypes.POINTER(Model), ctypes.c_int, P, P, P, ctypes.c_int, ctypes.c_int, P, P, P]
    cdll.a8_batched.argtypes, cdll.a8_batched.restype = [], ctypes.c_int
    cdll.native_linear_rows.argtypes = [ctypes.POINTER(Lin), P, P, ctypes.c_int, ctypes.c_int, P]
    return cdll


def batched_layout(kind: int, K: int, N: int, ts: list[Tensor | None]) -> list[Tensor]:
    """An a8 layer's weights repacked for csrc/gemm_a8.c's batched kernels (see its header): [panels, fp32 scales
    (K/g, N) or int8's (N,), int4's fp32 mins (K/g, N) or None, int8's corrections (K/32, N) int32 or None].
    `ts`: the layer's [weight, scales, mins] in the layouts of transforms/quantize.py, fp32 scales."""
    w, s, m = ts
    if kind == LAYOUT["int4"]:  # packed (K/2, N): byte row j = code 2j | code 2j + 1 << 4
        codes = torch.stack([w & 15, w >> 4], dim=1).reshape(K, N)
        c = codes.view(K // 32, 4, 2, 4, N // 16, 16).permute(4, 0, 1, 5, 3, 2)  # (i, b, p, l, t, half)
        return [(c[..., 0] | (c[..., 1] << 4)).contiguous(), s.contiguous(), m.contiguous(), None]
    panels = w.view(N // 16, 16, K // 32, 8, 4).permute(0, 2, 3, 1, 4).contiguous()  # (i, b, p, l, t)
    corr = (128 * w.view(N, K // 32, 32).sum(-1, dtype=torch.int32)).t().contiguous()
    return [panels, s.contiguous() if kind == LAYOUT["int8"] else s.t().contiguous(), None, corr]


def supports(model: nn.Module) -> str | None:
    """None when `model` can decode natively, else why not."""
    cfg = model.config if isinstance(model, GPT) else None
    if cfg is None:
        return "not a gptstack GPT"
    checks = {
        "rmsnorm": cfg.norm == "rmsnorm" and cfg.prenorm,
        "rotary positions": cfg.pos == "rope" and cfg.rope_local_theta is None,
        "dense attention": all(k == "dense" for k in cfg.attn_kinds),
        "swiglu": cfg.mlp == "swiglu" and not cfg.n_expert,
        "no QK-norm or sandwich norms": not cfg.qk_norm and not cfg.sandwich_norm,
        "embed_scale 1": cfg.embed_scale == 1.0,
        "fp32 on CPU": all(t.device.type == "cpu" and t.dtype != torch.float64 for t in model.state_dict().values())
        and model.transformer.ln_f.weight.dtype == torch.float32,
        "no bias outside QKV": not cfg.bias,
    }
    missing = [k for k, ok in checks.items() if not ok]
    return f"native decoding needs {', '.join(missing)}" if missing else None


def make_lin(module: nn.Module, keep: list, act_int8: bool = False, batched: bool = False) -> Lin:
    """The Lin descriptor of a linear layer (nn.Linear, QuantizedLinear or a TiedHead); `keep` holds tensors
    that must outlive it (contiguous copies, if any were needed). `act_int8`: a quantized layer takes int8
    activations (w8a8); an fp32 one keeps fp32; an int4 one whose scales and minimums are all fp16 values
    multiplies fp16 copies of them (exact: `f16`), a sixth fewer bytes per token for a kept Q4_1 file.
    `batched`: an a8 layer also gets its `batched_layout` (a copy of its weights) where the library has the
    batched w8a8 kernels and N is a multiple of 16."""
    if isinstance(module, TiedHead):
        module = module.table
    bias = getattr(module, "bias", None)
    if isinstance(module, QuantizedLinear):
        ts = [module.qweight, module.scales, getattr(module, "mins", None)]
        kind, g = LAYOUT[module.method], module.group_size
    elif isinstance(module, nn.Linear | DecodeLinear):  # DecodeLinear: transforms/decode.py's fp32 layout
        ts, kind, g = [module.weight.detach(), None, None], 0, 0
    else:
        raise TypeError(f"no native layout for {type(module).__name__}")
    ts = [None if t is None else t.contiguous() for t in [*ts, bias]]
    if any(t is not None and t.is_floating_point() and t.dtype != torch.float32 for t in ts):
        raise TypeError("native decoding needs fp32 weights, scales and biases")
    a8 = act_int8 and kind != LAYOUT["fp32"]
    if a8 and (module.in_features % kernels.ACT_BLOCK or (kind != LAYOUT["int8"] and g % kernels.ACT_BLOCK)):
        raise ValueError(
            f"int8 activations need the input width ({module.in_features}) and weight group ({g}) of "
            f"{type(module).__name__} {module.method} in multiples of {kernels.ACT_BLOCK}"
        )
    K, N = module.in_features, module.out_features
    lib = library() if a8 and batched and N % 16 == 0 else None
    packs = batched_layout(kind, K, N, ts[:3]) if lib is not None and lib.a8_batched() else [None] * 4
    f16 = a8 and kind == LAYOUT["int4"] and all(torch.equal(t.half().float(), t) for t in ts[1:3])
    if f16:  # scales and minimums that are fp16 values (a GGUF file's Q4_1/Q4_0 d and m): read in half the bytes
        ts[1:3] = [t.half() for t in ts[1:3]]
    keep.extend(t for t in ts + packs if t is not None)
    ptr = [0 if t is None else t.data_ptr() for t in ts + packs]
    return Lin(kind, K, N, g, int(a8), int(f16), *ptr)


class _Step:
    """The C descriptor of one model's decode step over a KV layout `kv` (a KV): its weights as Lin descriptors,
    preallocated scratch and logits, for `max_len` positions (scores rows; at most the model's context)."""

    def __init__(self, model: GPT, kv: KV, max_len: int, threads: int | None, act_int8: bool, batched: bool = False):
        why = supports(model)
        if why is not None:
            raise ValueError(why)
        self.lib = library()
        if self.lib is None:
            raise RuntimeError("native decoding unavailable: gcc could not build csrc/decode.c")
        cfg, t = model.config, model.transformer
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len must be in [1, {cfg.block_size}] (the context), got {max_len}")
        self.model, self.max_len, self.act_int8 = model, max_len, act_int8
        self._keep: list = []
        blocks = list(t.h)

        def lin(module: nn.Module) -> Lin:
            return make_lin(module, self._keep, act_int8, batched)

        lins = {name: (Lin * cfg.n_layer)(*(lin(b.get_submodule(name)) for b in blocks))
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}  # fmt: skip
        head = lin(model.lm_head)
        self.act = torch.empty(act_bytes(max(cfg.n_embd, cfg.d_ff, cfg.n_head * cfg.head_dim)), dtype=torch.uint8)
        norms = [(ctypes.c_void_p * cfg.n_layer)(*(getattr(b, n).weight.data_ptr() for b in blocks))
                 for n in ("ln_1", "ln_2")]  # fmt: skip
        h, hd = cfg.n_head, cfg.head_dim
        floats = 4 * cfg.n_embd + 3 * h * hd + 4 * cfg.n_kv_head * hd + 2 * cfg.d_ff + h * self.max_len
        self.scratch = torch.empty(floats + cfg.d_ff)  # (the scores rows last), generously sized
        self.logits = torch.empty(cfg.vocab_size)
        wte = t.wte
        quant_emb = isinstance(wte, QuantizedEmbedding)
        self._keep += [lins, norms]
        self.desc = Model(
            cfg.n_layer, cfg.n_embd, h, cfg.n_kv_head, hd, cfg.d_ff, cfg.vocab_size, self.max_len,
            threads or torch.get_num_threads(), cfg.norm_eps, cfg.attn_scale or 1 / math.sqrt(hd), cfg.norm_offset,
            model.rope_cos.data_ptr(), model.rope_sin.data_ptr(),
            LAYOUT["int8g"] if quant_emb else 0, wte.group_size if quant_emb else 0,
            (wte.qweight if quant_emb else wte.weight).data_ptr(), wte.scales.data_ptr() if quant_emb else None,
            norms[0], norms[1], t.ln_f.weight.data_ptr(),
            lins["attn.c_attn"], lins["attn.c_proj"], lins["mlp.c_fc"], lins["mlp.c_proj"],
            head, kv, self.scratch.data_ptr(), self.act.data_ptr(),
        )  # fmt: skip

    def _run(self, token: int, pos: int) -> Tensor:
        """The logits (V,) of `token` at `pos` (a buffer reused by the next step); its K/V written at `pos`."""
        if not 0 <= pos < self.max_len:
            raise ValueError(f"position {pos} outside the step's {self.max_len} positions")
        if not 0 <= token < self.desc.V:
            raise ValueError(f"token {token} outside the vocabulary of {self.desc.V}")
        self.lib.decode_step(ctypes.byref(self.desc), token, pos, self.logits.data_ptr())
        return self.logits


class NativeDecoder(_Step):
    """Greedy/argmax-free decoding state of one sequence: the model's weights as C descriptors, a KVCache of
    `max_len` tokens, preallocated scratch and logits. `threads`: OpenMP threads (default torch's).
    `act_int8`: the quantized linear layers of the step take int8 activations (w8a8, see the module docstring;
    default False: fp32 activations, weight-only dequantization)."""

    def __init__(self, model: GPT, max_len: int | None = None, threads: int | None = None, act_int8: bool = False):
        cfg = model.config
        max_len = max_len or cfg.block_size
        self.cache = KVCache(cfg, 1, max_len)  # k, v (n_layer, 1, kv, max_len, hd)
        hd = cfg.head_dim
        kv = KV(self.cache.k.data_ptr(), self.cache.v.data_ptr(), None, cfg.n_kv_head * max_len * hd, 0, hd,
                max_len * hd, max_len)  # fmt: skip
        super().__init__(model, kv, max_len, threads, act_int8)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> Tensor:
        """Reset the cache and run the prompt through the PyTorch forward (under `int8_activations` with
        `act_int8`); the last position's logits (V,)."""
        if not prompt or len(prompt) >= self.max_len:
            raise ValueError(f"the prompt must have 1 to {self.max_len - 1} tokens, got {len(prompt)}")
        self.cache.reset()
        last = torch.tensor([len(prompt) - 1])
        with int8_activations(self.model) if self.act_int8 else contextlib.nullcontext():
            return self.model(torch.tensor([prompt]), kv_cache=self.cache, logits_at=last)[0, -1]

    def step(self, token: int) -> Tensor:
        """Append `token` at the cache's position; its next-token logits (V,), a buffer reused by the next step."""
        pos = self.cache.pos
        if pos >= self.max_len:
            raise ValueError(f"KV cache full: {self.max_len} tokens")
        logits = self._run(token, pos)
        self.cache.advance(1)
        return logits

    def greedy(self, prompt: list[int], max_tokens: int, stop_tokens: frozenset[int] = frozenset()) -> Iterator[int]:
        """Greedy tokens after `prompt`, as `infer.generate.generate` with temperature 0 yields them."""
        if len(prompt) + max_tokens > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} + {max_tokens} tokens exceed the cache of {self.max_len}")
        logits = self.prefill(prompt)
        for i in range(max_tokens):
            token = int(logits.argmax())
            if token in stop_tokens:
                return
            yield token
            if i + 1 < max_tokens:
                logits = self.step(token)


class PagedDecoder(_Step):
    """The step over the engine's paged KV pool (engine.PagedKVCache: k, v (n_layer, num_blocks, bs, kv, hd)
    fp32): `step(token, pos, blocks)` reads the sequence's keys/values [0, pos) through its block table and writes
    position pos's into slot blocks[pos // bs] * bs + pos % bs, where the engine's batched path reads them."""

    def __init__(self, model: GPT, k: Tensor, v: Tensor, threads: int | None = None, act_int8: bool = False):
        cfg = model.config
        want = (cfg.n_layer, k.size(1) if k.dim() == 5 else -1, k.size(2) if k.dim() == 5 else -1, cfg.n_kv_head,
                cfg.head_dim)  # fmt: skip
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 5 or tuple(t.shape) != want or t.shape != k.shape:
                raise ValueError(f"KV pool {name}: expected (n_layer, num_blocks, bs, kv, hd) = {want}, got "
                                 f"{tuple(t.shape)}")  # fmt: skip
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"KV pool {name}: native decoding needs a contiguous fp32 CPU pool, got "
                                 f"{t.dtype} on {t.device}")  # fmt: skip
        self.pool, self.num_blocks, self.bs = (k, v), k.size(1), k.size(2)
        self._batch_buf: Tensor | None = None  # decode_batch's scratch and logits, grown to the largest batch
        self._batch_logits: Tensor | None = None
        row = cfg.n_kv_head * cfg.head_dim
        kv = KV(k.data_ptr(), v.data_ptr(), None, self.num_blocks * self.bs * row, self.bs * row, row, cfg.head_dim,
                self.bs)  # fmt: skip
        super().__init__(model, kv, cfg.block_size, threads, act_int8, batched=act_int8)

    def step(self, token: int, pos: int, blocks: list[int]) -> Tensor:
        """The logits (V,) of `token` at `pos` of the sequence whose block table is `blocks` (a buffer reused by the
        next step); its keys and values go into its slot for `pos`."""
        self._check_table(pos, blocks)
        table = (ctypes.c_int64 * len(blocks))(*blocks)
        self.desc.cache.table = ctypes.addressof(table)
        try:
            return self._run(token, pos)
        finally:
            self.desc.cache.table = None

    def _check_table(self, pos: int, blocks: list[int]) -> None:
        if len(blocks) * self.bs <= pos:
            raise ValueError(f"position {pos} is past the {len(blocks)} blocks of {self.bs} tokens of the table")
        if min(blocks) < 0 or max(blocks) >= self.num_blocks:
            raise ValueError(f"block ids must be in [0, {self.num_blocks}), got {min(blocks)}..{max(blocks)}")

    @property
    def batches(self) -> bool:
        """Whether step_batch runs natively: with fp32 activations always; with int8 ones where the library has the
        batched w8a8 kernels (AVX-512 VNNI; elsewhere the engine sends batches to the PyTorch forward). An a8 layer
        without a batched layout (N not a multiple of 16) runs its rows through the batch-1 kernel."""
        return not self.act_int8 or bool(self.lib.a8_batched())

    def step_batch(
        self, tokens: list[int], positions: list[int], tables: list[list[int]], want: list[int] | None = None
    ) -> Tensor:
        """The logits (len(want), V) of rows `want` (default: every row) of B rows, row b: `tokens[b]` at
        `positions[b]` of the sequence whose block table is `tables[b]`, all in one C call (decode.c's decode_batch:
        each weight tile read once for every row); their keys and values go into their slots. Rows of one sequence
        at consecutive positions (a prefill chunk) attend causally to each other. A buffer reused by the next call.
        Needs `batches`."""
        if not self.batches:
            raise ValueError("step_batch with act_int8 needs the batched w8a8 kernels (AVX-512 VNNI), absent here")
        B = len(tokens)
        if not B or len(positions) != B or len(tables) != B:
            raise ValueError(f"need one position and one block table per token, got {B}/{len(positions)}/{len(tables)}")
        want = list(range(B)) if want is None else list(want)
        if want and not 0 <= min(want) <= max(want) < B:
            raise ValueError(f"rows {min(want)}..{max(want)} of logits asked of a batch of {B}")
        for pos, blocks, token in zip(positions, tables, tokens, strict=True):
            self._check_table(pos, blocks)
            if not 0 <= token < self.desc.V:
                raise ValueError(f"token {token} outside the vocabulary of {self.desc.V}")
        W = max(map(len, tables))
        table = torch.tensor([t + [0] * (W - len(t)) for t in tables], dtype=torch.int64)  # (B, W)
        tok, at = torch.tensor(tokens, dtype=torch.int32), torch.tensor(positions, dtype=torch.int32)
        out = torch.tensor(want, dtype=torch.int32)
        need = self.lib.batch_floats(ctypes.byref(self.desc), B)
        if self._batch_buf is None or self._batch_buf.numel() < need:
            self._batch_buf = torch.empty(need)
        if self._batch_logits is None or self._batch_logits.size(0) < len(want):
            self._batch_logits = torch.empty(max(len(want), 1), self.desc.V)
        logits = self._batch_logits[: len(want)]
        self.lib.decode_batch(ctypes.byref(self.desc), B, tok.data_ptr(), at.data_ptr(), table.data_ptr(), W,
                              len(want), out.data_ptr(), logits.data_ptr(), self._batch_buf.data_ptr())  # fmt: skip
        return logits


def linear(module: nn.Module, x: Tensor, threads: int = 1, act_int8: bool = False) -> Tensor:
    """y (N,) = module(x (K,)) through decode.c's kernel for its layout (what the tests compare); `act_int8`: the
    w8a8 kernel (x quantized into int8 blocks first)."""
    lib = library()
    if lib is None:
        raise RuntimeError("native decoding unavailable: gcc could not build csrc/decode.c")
    keep: list = []
    desc = make_lin(module, keep, act_int8)
    x = x.contiguous().float()
    y, act = x.new_empty(desc.N), torch.empty(act_bytes(desc.K), dtype=torch.uint8)
    lib.native_linear(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), threads, act.data_ptr())
    return y


def linear_rows(module: nn.Module, x: Tensor, threads: int = 1, act_int8: bool = False) -> Tensor:
    """Y (B, N) = module(x (B, K)) through decode_batch's product for its layout (with `act_int8`, the batched w8a8
    kernels on the layer's batched layout where the library has them): what the tests compare with `linear`."""
    lib = library()
    if lib is None:
        raise RuntimeError("native decoding unavailable: gcc could not build csrc/decode.c")
    keep: list = []
    desc = make_lin(module, keep, act_int8, batched=True)
    x = x.contiguous().float()
    y = x.new_empty(x.size(0), desc.N)
    act = torch.empty(x.size(0) * (2 * desc.K + 8 * (desc.K // kernels.ACT_BLOCK)), dtype=torch.uint8)
    lib.native_linear_rows(ctypes.byref(desc), x.data_ptr(), y.data_ptr(), x.size(0), threads, act.data_ptr())
    return y
