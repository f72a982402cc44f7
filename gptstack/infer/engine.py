"""The inference engine: requests in, tokens out, over a paged KV cache with continuous batching.

    engine = Engine(model, EngineConfig(max_seqs=32), tokenizer=tok)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))   # ValueError on bad input
                                        # (ContextLengthExceeded when it does not fit the context)
    while engine.has_unfinished():
        for out in engine.step():       # each step: new tokens of every running request
            ...

Memory: the KV cache is a pool of fixed-size blocks (`kv_block_size` tokens × layers × kv heads ×
head_dim, for K and V). Each sequence holds a block table (its blocks in order); free blocks sit in
an LRU free list. Every token of a step is written to its slot `table[pos // bs] * bs + pos % bs`.
The pool is sized from a memory budget (`kv_memory`: a size or a fraction of the device's memory,
default min(2 GiB, 10%)), never beyond what `max_seqs` full contexts need (`plan_kv`), and allocated
uninitialised: the OS maps its pages as blocks are first written, so start-up costs nothing, and each
block is zeroed when it is handed out.

Scheduling (one `step()`), in the spirit of vLLM v1: the running sequences first, in arrival order,
then waiting ones while there is room (`max_seqs` sequences, `max_step_tokens` tokens per step).
A sequence that has tokens without KV (a prompt, a chunk of one, or the last sampled token) gets up
to the remaining budget of them, so long prompts are prefilled in chunks between decode steps. When
the pool runs out of blocks the newest running sequence is preempted: its blocks are freed and it
goes back to the head of the queue, to be recomputed (prompt + tokens generated so far) later; its
sampled tokens and generator are kept, so its output is unchanged. A request that could not fit
even alone is refused when added, so the engine never waits on blocks that cannot come.

Prefix caching: a full block is named by a BLAKE2b digest of (previous block's digest, its tokens), so
no request can craft a block whose name equals another's (Python's `hash` is unkeyed and the same in
every process: colliding blocks are found in minutes). Finished sequences leave their blocks in the
free list still named; a new request whose prompt starts with named blocks takes them instead of
recomputing (at least one prompt token is always computed, for its logits), after checking that each
block holds exactly its tokens. Eviction takes the least recently freed block first.

Images (issue 21): a request may carry `ImageInput`s, each a run of placeholder tokens in its prompt
(`prompt[offset : offset + n_image_tokens]`), the image bytes' digest and its pixels (or precomputed
features). The features are computed by the engine's VisionTower the first time a step's chunk reaches
the image's positions (so a prompt served from the prefix cache never runs the tower), kept by the
sequence (preemption recomputes its KV, not its features) and in a bounded LRU by digest (the n samples
of one request, or the same image sent again, run the tower once). They replace the placeholders'
embeddings through `model(idx, kv_cache=..., embeds=(where, rows))`, the rows sliced to the chunk when
a prompt is prefilled in chunks. A block that holds image positions is named with the image's digest
and offset too, so two images behind the same placeholder ids never share a block, and the same image
twice is a prefix hit. The draft model of speculative decoding sees the placeholders' own embeddings.

The flattened batch: all new tokens of a step form one row (1, N) through the model, so the linear
layers see every token at once (2-64 rows: the register-tiled kernels of transforms/csrc/gemm.c). Attention is
per sequence (`PagedKVCache.attend`): one call for all the single-token (decode) sequences (on CPU in fp32 a C
kernel that reads each one's blocks in place; else one gather of the batch's block table and one SDPA), one call
per multi-token chunk. The step's next tokens are sampled together (sampling.sample_rows).

The native step (issue 20, `native=True`, the default): when a step is one sequence decoding one generated token
(`gptstack generate`/`chat`, a lone request in `serve`), it runs as one C call (infer/native.py's PagedDecoder over
transforms/csrc/decode.c) instead of ~40 PyTorch ops per layer, for models `native.supports` (Llama-style, fp32
activations on CPU, linears in a native layout; else `native_off` says why). It reads and writes the same paged
pool through the sequence's block table, so a request that joins mid-decode continues on the batched path from the
K/V the native step wrote, and back. The native step also batches (one C call for every decoding sequence and prompt
chunk of the step, up to NATIVE_ROWS tokens) and runs speculative decoding: the (k+1)-row verification of the target,
and the draft model's steps over its own pool. `act_int8=True` (opt-in) runs the quantized layers as w8a8 products in
the native step and their definition (`quantize.int8_activations`, fake-quantized inputs) in the PyTorch forward
(prefills over NATIVE_ROWS_A8 tokens), so both paths compute the same model; its batched steps (csrc/gemm_a8.c, on
AVX-512 VNNI) compute each row bit for bit as that row's step alone, so a request's greedy tokens do not depend on
what else runs with it while every step of it is native.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import itertools
import os
import re
from collections import OrderedDict, deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptstack.config import ModelConfig
from gptstack.infer import native
from gptstack.infer.sampling import Sampler, SamplingParams, draw, sample_rows, top_logprobs
from gptstack.infer.speculative import accept, accept_greedy, ngram_propose, plain_greedy
from gptstack.model import GPT, attend, attention_mask, kv_cache_bytes_per_token
from gptstack.transforms import kernels
from gptstack.transforms.quantize import int8_activations
from gptstack.vision import VisionConfig, VisionTower, image_positions


@dataclass
class EngineConfig:
    kv_block_size: int = 16  # tokens per KV-cache block
    kv_memory: str | None = None  # KV pool budget: 2GiB, 512MiB, or a fraction of memory (0.25); default min(2GiB, 10%)
    num_blocks: int | None = None  # KV-cache blocks, overriding kv_memory (default: what the budget holds)
    max_seqs: int = 32  # requests decoded at once
    max_step_tokens: int = 512  # tokens through the model per engine step (prefill chunks share it)
    prefix_caching: bool = True  # reuse the KV blocks of a prompt prefix seen before
    speculative: str | None = None  # speculative decoding: 'ngram' (prompt lookup) or 'draft' (needs a draft model)
    num_speculative: int = 4  # tokens proposed per speculative round
    draft_confidence: float = 0.0  # a draft model stops a round's proposals below this top probability (0: k always)
    ngram_max: int = 4  # prompt lookup tries the last ngram_max..1 tokens
    image_cache: int = 64  # images whose vision features are kept (by the image bytes' digest)
    native: bool = True  # one decoding sequence alone: one C call per token (infer/native.py) where the model allows
    act_int8: bool = False  # int8 activations for the quantized layers (w8a8, as llama.cpp's Q8_1 dots): needs native
    draft_act_int8: bool = False  # the same for the draft model's step (a quantized copy of the target as its draft)

    def __post_init__(self) -> None:
        if self.kv_block_size < 1 or self.max_seqs < 1 or self.max_step_tokens < 1:
            raise ValueError("kv_block_size, max_seqs and max_step_tokens must be >= 1")
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be None, 'ngram' or 'draft', got {self.speculative!r}")
        if self.num_speculative < 1:
            raise ValueError(f"num_speculative must be >= 1, got {self.num_speculative}")
        if not 0.0 <= self.draft_confidence < 1.0:
            raise ValueError(f"draft_confidence must be in [0, 1), got {self.draft_confidence}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_memory is not None:
            parse_memory(self.kv_memory)  # a bad budget fails here, not when the engine starts
        if self.act_int8 and not self.native:
            raise ValueError("act_int8 needs the native step (native=True)")
        if self.draft_act_int8 and not self.native:
            raise ValueError("draft_act_int8 needs the native step (native=True)")


# ---- sizing the KV pool from a memory budget ---------------------------------------------------------

# Most new tokens of one step through the native batched step; more go through the PyTorch forward (BLAS). SmolLM2
# Q4_1 kept, one prompt, 2 threads: native / PyTorch prefill time 0.63 at 16 tokens, 0.86 at 256, 1.25 at 512; with
# int8 activations (act_int8: gemm_a8.c's kernels against the forward under int8_activations) 0.18 at 16, 0.41 at
# 256, 0.66 at 512, 1.12 at 1,024.
NATIVE_ROWS = 256
NATIVE_ROWS_A8 = 512
DEFAULT_KV_MEMORY = (2 << 30, 0.1)  # no kv_memory: min(2 GiB, 10% of the device's memory)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}  # fmt: skip


def parse_memory(spec: str) -> int | float:
    """'2GiB', '512 MiB', '1.5GB', '4096B' → bytes (int); a bare number in (0, 1] ('0.25') → that
    fraction of the device's memory (float). A bare number above 1 is refused: it would be ambiguous."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(spec))
    unit = m.group(2).lower() if m else ""
    if m and not unit and 0 < float(m.group(1)) <= 1:
        return float(m.group(1))
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise ValueError(
            f"kv_memory: expected a size such as 2GiB or 512MiB, or a fraction of memory in (0, 1] such as 0.25, "
            f"got {spec!r}"
        )
    return int(float(m.group(1)) * UNITS[unit])


def device_memory(device: str | torch.device = "cpu") -> int:
    """Total memory of the device the pool lives on: the GPU's, else the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget(spec: str | None, device: str | torch.device = "cpu") -> int:
    """The KV pool's budget in bytes: `spec` as parse_memory reads it, or the default."""
    if spec is None:
        cap, fraction = DEFAULT_KV_MEMORY
        return min(cap, int(fraction * device_memory(device)))
    value = parse_memory(spec)
    return int(value * device_memory(device)) if isinstance(value, float) else value


@dataclass(frozen=True)
class KVPlan:
    """The pool an engine allocates: `num_blocks` blocks of `block_bytes` (K and V, every layer, the
    draft model's too), within `budget` bytes (None when num_blocks was given explicitly)."""

    num_blocks: int
    block_bytes: int
    kv_block_size: int
    budget: int | None

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.kv_block_size


def plan_kv(models: list[tuple[ModelConfig, int]], cfg: EngineConfig, device: str | torch.device = "cpu") -> KVPlan:
    """Size the pool without allocating it: as many blocks as the budget holds, but never more than
    `max_seqs` full contexts need (a short context does not take the whole budget). `models`: (config,
    bytes per element) of the target, and of the draft model when it shares the block tables."""
    bs = cfg.kv_block_size
    block_bytes = bs * sum(kv_cache_bytes_per_token(c, element) for c, element in models)
    if cfg.num_blocks is not None:
        return KVPlan(cfg.num_blocks, block_bytes, bs, None)
    budget = kv_budget(cfg.kv_memory, device)
    full = cfg.max_seqs * (-(-models[0][0].block_size // bs) + 1)  # +1: speculative tokens past the context
    num_blocks = min(full, budget // block_bytes)
    if num_blocks < 1:
        raise ValueError(
            f"kv_memory: {budget:,} bytes hold no KV block ({block_bytes:,} bytes for {bs} tokens): raise --kv-memory"
        )
    return KVPlan(num_blocks, block_bytes, bs, budget)


class ContextLengthExceeded(ValueError):
    """A request that does not fit the model's context: the prompt alone (at least one token must be
    generated), or the prompt plus max_tokens."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        if prompt_tokens >= context:
            message = f"the prompt has {prompt_tokens} tokens; the context holds {context}, including output"
        else:
            message = (
                f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} ({prompt_tokens + max_tokens} tokens) "
                f"exceed the context of {context} tokens (at most {context - prompt_tokens} new tokens)"
            )
        super().__init__(message)

    @property
    def prompt_too_long(self) -> bool:
        return self.prompt_tokens >= self.context


@dataclass
class RequestOutput:
    """What one step produced for one request: the new tokens (and text, given a tokenizer)."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Completion:
    """A finished request, gathered by `Engine.generate`."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[tuple[float, list[tuple[int, float]]]]
    prompt_logprobs: list | None
    num_cached_tokens: int


def block_digest(parent: bytes, tokens: tuple[int, ...], extra: bytes = b"") -> bytes:
    """A KV block's prefix-cache name: BLAKE2b-256 of the previous block's name (b"" for the first), the
    block's token ids (int64) and `extra` (the hook for what else its positions hold, e.g. an image's hash)."""
    h = hashlib.blake2b(parent, digest_size=32)
    h.update(array.array("q", tokens).tobytes())
    h.update(extra)
    return h.digest()


@dataclass(frozen=True)
class ImageInput:
    """One image of a request: its placeholders are prompt[offset : offset + n_image_tokens]. Give
    `pixels` (3, H, W), preprocessed (vision.preprocess), for the engine's VisionTower, or `features`
    (n_image_tokens, D) computed already (then the engine needs no tower)."""

    digest: bytes  # vision.image_digest of the image bytes: the feature cache's and the prefix cache's key
    offset: int  # prompt position of its first placeholder token
    pixels: Tensor | None = None
    features: Tensor | None = None


def place_images(ids: list[int], images: list[tuple[bytes, Tensor]], cfg: VisionConfig) -> list[ImageInput]:
    """The ImageInputs of a prompt whose placeholder runs (vision.render_image_chat) hold `images`,
    (digest, pixels (3, H, W)) in order; ValueError when the runs and the images do not number the same."""
    starts = image_positions(ids, cfg).nonzero().flatten().tolist()[:: cfg.n_image_tokens]  # each run's first
    if len(starts) != len(images):
        raise ValueError(f"the prompt holds {len(starts)} image placeholder runs for {len(images)} images")
    return [ImageInput(d, at, pixels=p) for (d, p), at in zip(images, starts, strict=True)]


def image_extra(images: tuple[ImageInput, ...], spans: list[int], lo: int, hi: int) -> bytes:
    """What block_digest adds for the positions [lo, hi) of a prompt: digest + offset of each image
    (its placeholders images[i].offset + [0, spans[i])) with a position there; b"" when none has one."""
    return b"".join(
        im.digest + im.offset.to_bytes(8, "little")
        for im, n in zip(images, spans, strict=True)
        if im.offset < hi and im.offset + n > lo
    )


class BlockPool:
    """Block ids 0..n-1: reference counts, an LRU free list, and the prefix-cache name of each block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.name: dict[int, int] = {}  # block → hash
        self.by_hash: dict[int, int] = {}  # hash → block

    def allocate(self) -> int | None:
        if not self.free:
            return None
        block, _ = self.free.popitem(last=False)  # least recently freed
        if block in self.name:  # evict its cached content
            del self.by_hash[self.name.pop(block)]
        self.refs[block] = 1
        return block

    def take_cached(self, h: int) -> int | None:
        block = self.by_hash.get(h)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def register(self, block: int, h: int) -> None:
        if block not in self.name and h not in self.by_hash:
            self.name[block], self.by_hash[h] = h, block

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)


class Sequence:
    def __init__(
        self, request_id: str, prompt: list[int], params: SamplingParams, arrival: int, device, vocab: int, images=()
    ):
        self.request_id, self.params, self.arrival = request_id, params, arrival
        self.prompt = list(prompt)
        self.images: tuple[ImageInput, ...] = tuple(images)  # in prompt order; kept through preemption
        self.spans = [0] * len(self.images)  # placeholder tokens of each image (set by the engine)
        self.features: list[Tensor | None] = [im.features for im in self.images]  # (n, D) once computed
        self.tokens = list(prompt)  # prompt + generated
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.draft_computed = 0  # the same for the draft model's cache
        self.blocks: list[int] = []
        self.hashes: list[bytes] = []  # prefix-cache names (block_digest) of the full blocks, in order
        self.sampler = Sampler(params, prompt, vocab, device)  # its generator and penalty counts
        self.logprobs: list = []
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.num_cached = 0  # prompt tokens served from the prefix cache
        self.admitted = False
        self.text, self.emitted = "", 0  # detokenized output, and how much of it was returned
        self.decoder = None
        self.finish_reason: str | None = None

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt)

    def block_extra(self, i: int, bs: int) -> bytes:
        """block_digest's `extra` for block i: the images with a position in it."""
        return image_extra(self.images, self.spans, i * bs, (i + 1) * bs) if self.images else b""


class PagedKVCache:
    """Block pools K, V of shape (n_layer, num_blocks, kv_block_size, n_kv_head, head_dim), and the
    layout of the current step, set by `prepare`. Implements the cache protocol of `GPT.forward`."""

    def __init__(self, model: GPT, num_blocks: int, kv_block_size: int):
        cfg = model.config
        ref = model.transformer.wte.weight
        shape = (cfg.n_layer, num_blocks, kv_block_size, cfg.n_kv_head, cfg.head_dim)
        # uninitialised: the OS maps pages on first write, so start-up costs nothing and the resident
        # size grows with the blocks in use; `clear` zeroes a block when it is handed out
        self.k = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        self.v = torch.empty(shape, dtype=ref.dtype, device=ref.device)
        self.kv_block_size, self.device = kv_block_size, ref.device

    def clear(self, blocks: list[int]) -> None:
        """Zero fresh blocks: a decode row's masked keys and its zero-weighted values are still read, and
        uninitialised memory may hold NaN or inf, which would poison the softmax and the weighted sum."""
        index = torch.tensor(blocks, device=self.device)
        self.k.index_fill_(1, index, 0)
        self.v.index_fill_(1, index, 0)

    def prepare(self, chunks: list[tuple[int, int, list[int]]]) -> None:
        """chunks: per sequence (start position, number of new tokens, block table), in the order
        their tokens are laid out in the flattened batch."""
        bs, dev = self.kv_block_size, self.device
        pos = torch.cat([torch.arange(s, s + n) for s, n, _ in chunks])  # (N,)
        tables = [torch.tensor(t, dtype=torch.long) for _, _, t in chunks]
        self.pos = pos.to(dev)
        per_seq = pos.split([n for _, n, _ in chunks])
        self.slots = torch.cat([t[p // bs] * bs + p % bs for t, p in zip(tables, per_seq, strict=True)]).to(dev)
        offsets = list(itertools.accumulate([n for _, n, _ in chunks], initial=0))
        single = [i for i, (_, n, _) in enumerate(chunks) if n == 1]
        self.multi = [(offsets[i], n, s + n, tables[i].to(dev)) for i, (s, n, _) in enumerate(chunks) if n > 1]
        self.single = None
        if single:
            lens = torch.tensor([chunks[i][0] + 1 for i in single])  # (Bd,) context lengths
            width = -(-int(lens.max()) // bs)
            table = torch.zeros(len(single), width, dtype=torch.long)
            for row, i in enumerate(single):
                t = tables[i][:width]
                table[row, : len(t)] = t
            self.single = (torch.tensor([offsets[i] for i in single], device=dev), table.to(dev), lens.to(dev))
        self.masks: dict = {}

    def positions(self, T: int, device) -> Tensor:
        return self.pos[None]  # (1, N)

    def _single_mask(self, window: int | None) -> Tensor | None:
        """(Bd, 1, 1, S) key mask of the decode rows: key j visible when j < len (and within the band)."""
        if window not in self.masks:
            _, table, lens = self.single
            j = torch.arange(table.size(1) * self.kv_block_size, device=self.device)[None]
            mask = j < lens[:, None]
            if window is not None:
                mask &= lens[:, None] - 1 - j < window
            self.masks[window] = None if bool(mask.all()) else mask[:, None, None, :]
        return self.masks[window]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, window: int | None, scale: float | None = None
    ) -> Tensor:
        """q (1, h, N, hd), k/v (1, kv, N, hd) of the flattened step → (1, h, N, hd); `scale` as in
        model.attend."""
        kv, hd = k.size(1), k.size(3)
        kp, vp = self.k[layer], self.v[layer]  # (num_blocks, bs, kv, hd)
        kp.view(-1, kv, hd).index_copy_(0, self.slots, k[0].transpose(0, 1))
        vp.view(-1, kv, hd).index_copy_(0, self.slots, v[0].transpose(0, 1))
        if self.single is not None and not self.multi and self.single[0].numel() == q.size(2):
            return self._attend_single(q[0].transpose(0, 1)[:, :, None], kp, vp, window, scale).transpose(0, 1)[None]
        out = torch.empty_like(q)
        if self.single is not None:
            rows = self.single[0]
            y = self._attend_single(q[0, :, rows].transpose(0, 1)[:, :, None], kp, vp, window, scale)  # (Bd, h, 1, hd)
            out[0, :, rows] = y.transpose(0, 1)
        for start, n, length, table in self.multi:
            keys = kp[table].view(1, -1, kv, hd)[:, :length].transpose(1, 2)  # (1, kv, L, hd)
            vals = vp[table].view(1, -1, kv, hd)[:, :length].transpose(1, 2)
            mask = attention_mask(n, length, length - n, window, q.device)
            out[:, :, start : start + n] = attend(q[:, :, start : start + n], keys, vals, mask, scale=scale)
        return out

    def _attend_single(self, q: Tensor, kp: Tensor, vp: Tensor, window: int | None, scale: float | None) -> Tensor:
        """q (Bd, h, 1, hd): each decode row against its own blocks → (Bd, h, 1, hd)[:, :, 0]. On CPU in fp32 the
        C kernel reads the blocks in place; otherwise one gather of the batch's block table and one SDPA call."""
        _, table, lens = self.single
        Bd, kv, hd = table.size(0), kp.size(2), kp.size(3)
        s = scale if scale is not None else hd**-0.5
        y = kernels.paged_decode_attention(q[:, :, 0].contiguous(), kp, vp, table, lens, window, s)  # (Bd, h, hd)
        if y is not None:
            return y
        keys = kp[table].view(Bd, -1, kv, hd).transpose(1, 2)  # (Bd, kv, S, hd)
        vals = vp[table].view(Bd, -1, kv, hd).transpose(1, 2)
        return attend(q, keys, vals, self._single_mask(window), scale=scale)[:, :, 0]

    def advance(self, n: int) -> None:
        pass  # positions come from the engine's layout


class Engine:
    def __init__(
        self,
        model: GPT,
        config: EngineConfig | None = None,
        tokenizer=None,
        draft: GPT | None = None,
        vision: tuple[VisionTower, VisionConfig] | None = None,
    ):
        self.model, self.config, self.tokenizer, self.draft = model.eval(), config or EngineConfig(), tokenizer, draft
        # the vision tower and its config (image tokens per image, the placeholder id), or None: text only
        self.vision, self.vision_config = (vision[0].eval(), vision[1]) if vision is not None else (None, None)
        self.image_features: OrderedDict[bytes, Tensor] = OrderedDict()  # digest → (n_image_tokens, D), LRU
        cfg = self.config
        mc = model.config
        self.context = mc.block_size
        self.device = model.transformer.wte.weight.device
        if cfg.draft_act_int8 and cfg.speculative != "draft":
            raise ValueError("draft_act_int8 needs a draft model (speculative='draft')")
        if cfg.speculative == "draft":
            if draft is None:
                raise ValueError("speculative='draft' needs a draft model")
            if draft.config.vocab_size != mc.vocab_size or draft.config.block_size < mc.block_size:
                raise ValueError("the draft model must share the target's vocabulary and context")
        models = [model] + ([draft] if cfg.speculative == "draft" else [])
        self.kv_plan = plan_kv([(m.config, m.transformer.wte.weight.element_size()) for m in models], cfg, self.device)
        self.num_blocks = self.kv_plan.num_blocks
        spare = cfg.num_speculative if cfg.speculative else 0
        # the most tokens (prompt + output) one request may span: the context, or less in a smaller pool
        self.capacity = min(self.context, self.kv_plan.tokens - spare)
        self.pool = BlockPool(self.num_blocks)
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # named block → the tokens it was named for
        self.cache = PagedKVCache(model, self.num_blocks, cfg.kv_block_size)
        self.draft_cache = None
        if cfg.speculative == "draft":  # the draft's own pools, indexed by the same block tables
            self.draft_cache = PagedKVCache(draft.eval(), self.num_blocks, cfg.kv_block_size)
        self.allowed = tokenizer.decodable_mask(mc.vocab_size).to(self.device) if tokenizer is not None else None
        self.eos = tokenizer.stop_ids if tokenizer is not None else frozenset()  # end of turn, end of text
        # the ids a prompt may hold: the model's, and only those the tokenizer knows (a padded vocabulary's extra
        # ids are never real tokens)
        self.vocab_size = min(mc.vocab_size, tokenizer.n_vocab) if tokenizer is not None else mc.vocab_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.counter = itertools.count()
        self.stats = dict(
            steps=0, prompt_tokens=0, computed_tokens=0, generated_tokens=0, prefix_queried=0, prefix_hits=0,
            preemptions=0, spec_proposed=0, spec_accepted=0, images=0, images_encoded=0, native_steps=0,
            draft_native_steps=0,
        )  # fmt: skip
        self.native_off = ""  # why the native step does not run, when it does not
        self.native = self._native_step()
        self.draft_native = None  # the draft model's native step over its own pool (w8a8 with draft_act_int8)
        if self.draft_cache is not None and self.native is not None:
            self.draft_native, why = self._native_decoder(draft, self.draft_cache, cfg.draft_act_int8)
            if self.draft_native is None and cfg.draft_act_int8:
                raise ValueError(f"draft_act_int8 needs the draft's native step, which cannot run: {why}")

    def _native_step(self) -> native.PagedDecoder | None:
        """The native decode step over the engine's pool (config.native), or None where it does not apply (then
        `native_off` says why); with act_int8, a model it cannot serve is an error."""
        cfg = self.config
        step, why = self._native_decoder(self.model, self.cache, cfg.act_int8)
        if step is None and cfg.act_int8 and cfg.native:
            raise ValueError(f"act_int8 needs the native step, which this engine cannot run: {why}")
        self.native_off = why
        return step

    def _native_decoder(self, model: GPT, cache, act_int8: bool = False) -> tuple[native.PagedDecoder | None, str]:
        """A native step over `cache`'s pool for `model`, or None and the reason it cannot run."""
        why = "native=False" if not self.config.native else native.supports(model)
        if why is None:
            try:
                return native.PagedDecoder(model, cache.k, cache.v, act_int8=act_int8), ""
            except (TypeError, ValueError, RuntimeError) as e:
                why = str(e)
        return None, why

    # ---- requests ----------------------------------------------------------------------------------

    def check_request(self, prompt: list[int], params: SamplingParams, images: Seq[ImageInput] = ()) -> None:
        """Raise ValueError (ContextLengthExceeded for the context) if the engine cannot serve the request.
        Reads only the engine's fixed configuration, so any thread may call it."""
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        V = self.vocab_size
        placeholders = self.check_images(prompt, images)
        if any(not isinstance(t, int) or not (0 <= t < V or i in placeholders) for i, t in enumerate(prompt)):
            raise ValueError(f"prompt token ids must be integers in [0, {V})")
        if len(prompt) + params.max_tokens > self.context:  # max_tokens >= 1: a prompt must leave room
            raise ContextLengthExceeded(len(prompt), params.max_tokens, self.context)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if len(prompt) + params.max_tokens > self.capacity:
            spare = self.config.num_speculative if self.config.speculative else 0
            need = -(-(len(prompt) + params.max_tokens + spare) // self.config.kv_block_size)
            raise ValueError(
                f"the request needs {need} KV blocks and the pool has {self.num_blocks} "
                f"({self.config.kv_block_size} tokens each): lower max_tokens or raise --kv-memory"
            )

    def image_span(self, image: ImageInput) -> int:
        """The placeholder tokens of one image: its features' rows, else the tower's n_image_tokens."""
        if image.features is not None:
            return image.features.size(0)
        return self.vision_config.n_image_tokens if self.vision_config is not None else 0

    def check_images(self, prompt: list[int], images: Seq[ImageInput]) -> set[int]:
        """ValueError unless each image has its features or pixels for this engine's tower, and its run of
        placeholder ids in the prompt, in order and apart. Returns the placeholder positions."""
        positions: set[int] = set()
        end, D = 0, self.model.config.n_embd
        for k, im in enumerate(images):
            if im.features is None and (im.pixels is None or self.vision is None):
                raise ValueError(
                    "this model has no vision tower: it takes no images"
                    if self.vision is None
                    else f"image {k} has neither pixels nor features"
                )
            if im.features is not None and (im.features.dim() != 2 or im.features.size(1) != D):
                raise ValueError(f"image {k}: features must be (n_image_tokens, {D}), got {tuple(im.features.shape)}")
            if im.features is None and tuple(im.pixels.shape) != (3, S := self.vision_config.image_size, S):
                raise ValueError(
                    f"image {k}: pixels must be (3, {S}, {S}) (vision.preprocess), got {tuple(im.pixels.shape)}"
                )
            n = self.image_span(im)
            if im.offset < end or im.offset + n > len(prompt):
                raise ValueError(f"image {k}: placeholders at {im.offset}..{im.offset + n} overlap or leave the prompt")
            token = self.vision_config.image_token_id if self.vision_config is not None else None
            if token is not None and any(t != token for t in prompt[im.offset : im.offset + n]):
                raise ValueError(f"image {k}: prompt[{im.offset}:{im.offset + n}] must be the image token {token}")
            positions.update(range(im.offset, im.offset + n))
            end = im.offset + n
        return positions

    def add_request(
        self,
        prompt: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        images: Seq[ImageInput] = (),
    ):
        """Queue a request; raises ValueError (nothing queued) for a request that cannot be served.
        `images`: the prompt's images, in order (ImageInput)."""
        params = params or SamplingParams()
        rid = request_id if request_id is not None else f"req-{next(self.counter)}"
        if rid in self.by_id:
            raise ValueError(f"request id {rid!r} is already in use")
        self.check_request(prompt, params, images)
        seq = Sequence(rid, prompt, params, next(self.counter), self.device, self.model.config.vocab_size, images)
        seq.spans = [self.image_span(im) for im in seq.images]
        self.stats["images"] += len(seq.images)
        if self.tokenizer is not None:
            seq.decoder = self.tokenizer.stream_decoder()
        self.by_id[rid] = seq
        self.waiting.append(seq)
        self.stats["prompt_tokens"] += len(prompt)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False when it is unknown or already finished."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        seq.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks held by sequences (cached-but-free blocks count as free)."""
        return self.pool.used / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.stats["prefix_hits"] / max(1, self.stats["prefix_queried"])

    @property
    def acceptance_rate(self) -> float:
        return self.stats["spec_accepted"] / max(1, self.stats["spec_proposed"])

    # ---- blocks --------------------------------------------------------------------------------------

    def _grow(self, seq: Sequence, n_tokens: int) -> bool:
        """Give seq blocks for its first n_tokens tokens; False (holding what it got) when none are left.
        Fresh blocks are zeroed (PagedKVCache.clear)."""
        fresh = []
        while len(seq.blocks) * self.config.kv_block_size < n_tokens:
            block = self.pool.allocate()
            if block is None:
                break
            seq.blocks.append(block)
            fresh.append(block)
        if fresh:
            for cache in filter(None, (self.cache, self.draft_cache)):
                cache.clear(fresh)
        return len(seq.blocks) * self.config.kv_block_size >= n_tokens

    def _free(self, seq: Sequence) -> None:
        for block in seq.blocks:
            self.pool.release(block)
        seq.blocks, seq.hashes, seq.num_computed, seq.draft_computed = [], [], 0, 0

    def _name_blocks(self, seq: Sequence) -> None:
        """Prefix-cache names for the blocks whose tokens are all computed."""
        bs = self.config.kv_block_size
        while (len(seq.hashes) + 1) * bs <= seq.num_computed:
            i = len(seq.hashes)
            tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = block_digest(seq.hashes[-1] if seq.hashes else b"", tokens, seq.block_extra(i, bs))
            seq.hashes.append(h)
            if self.config.prefix_caching:
                self.pool.register(seq.blocks[i], h)
                if self.pool.name.get(seq.blocks[i]) == h:  # named now: record what it holds, for _take_prefix
                    self.block_tokens[seq.blocks[i]] = tokens

    def _take_prefix(self, seq: Sequence) -> None:
        """Reuse the cached blocks that start seq's tokens (leaving at least one token to compute)."""
        if not self.config.prefix_caching or seq.prompt_logprobs is not None:
            return
        bs = self.config.kv_block_size
        parent = b""
        for i in range((len(seq.tokens) - 1) // bs):
            tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = block_digest(parent, tokens, seq.block_extra(i, bs))
            block = self.pool.take_cached(h)
            if block is None:
                break
            if self.block_tokens.get(block) != tokens:  # a name that does not hold these tokens: never reuse it
                self.pool.release(block)
                break
            seq.blocks.append(block)
            seq.hashes.append(h)
            parent = h
        seq.num_computed = len(seq.blocks) * bs

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.waiting.appendleft(seq)
        self.stats["preemptions"] += 1

    # ---- scheduling ------------------------------------------------------------------------------------

    def _schedule(self, spare: int = 0) -> list[tuple[Sequence, int]]:
        """Pick (sequence, new tokens) pairs for this step. `spare`: extra slots each decode sequence
        must own (speculative tokens)."""
        budget = self.config.max_step_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below by an older sequence
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if n == 0:
                break
            extra = spare if seq.num_computed + n == len(seq.tokens) else 0
            while not self._grow(seq, seq.num_computed + n + extra):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.config.max_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.num_computed == 0 and not seq.blocks:
                self._take_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._free(seq)  # hold nothing while waiting: the running sequences will free blocks
                break
            if not seq.admitted:  # first admission: count its prompt against the prefix cache
                seq.admitted, seq.num_cached = True, seq.num_computed
                self.stats["prefix_queried"] += len(seq.prompt)
                self.stats["prefix_hits"] += seq.num_computed
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    # ---- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one model step over the scheduled tokens; return what each request produced."""
        full = not self.waiting or len(self.running) >= self.config.max_seqs
        decoding = all(s.num_computed + 1 == len(s.tokens) for s in self.running)
        if self.config.speculative and self.running and full and decoding:
            return self._speculative_step()  # every running sequence is decoding and none can join
        batch = self._schedule()
        if not batch:
            return []
        self.stats["steps"] += 1
        want: list[int] = []  # flattened positions whose logits are needed
        rows: dict[int, tuple[int, int]] = {}  # batch index → (first row in `want`, number of rows)
        offset = 0
        for i, (seq, n) in enumerate(batch):
            first = len(want)
            if seq.prompt_logprobs is not None and seq.num_computed < len(seq.prompt):
                want += range(offset, offset + n)  # every prompt position predicts the next prompt token
            elif seq.num_computed + n == len(seq.tokens):
                want.append(offset + n - 1)
            rows[i] = (first, len(want) - first)
            offset += n
        if self._native_applies(batch):
            logits = self._native_logits(batch, want)  # (len(want), V)
        else:
            logits = self._forward(self.model, self.cache, batch, want)  # (len(want), V)
        if self.draft_cache is not None:
            self._draft_prefill(batch)
        sampled = self._sample(batch, rows, logits)
        outputs = []
        for i, (seq, n) in enumerate(batch):
            first, count = rows[i]
            start = seq.num_computed
            seq.num_computed += n
            self.stats["computed_tokens"] += n
            self._name_blocks(seq)
            out = RequestOutput(seq.request_id, [], num_prompt_tokens=len(seq.prompt), num_cached_tokens=seq.num_cached)
            try:
                if seq.prompt_logprobs is not None and start < len(seq.prompt):
                    self._prompt_logprobs(seq, start, n, logits[first : first + count])
                if seq.num_computed == len(seq.tokens):
                    row = logits[first + count - 1]
                    token = sampled.get(i)
                    self._emit(seq, [seq.sampler.sample(row) if token is None else token], out, raw=row[None])
            except Exception as e:  # one request's failure never takes down the batch
                seq.finish_reason, out.error = "error", f"{type(e).__name__}: {e}"
            outputs.append(self._finish_output(seq, out))
        return outputs

    def _native_applies(self, batch: list[tuple[Sequence, int]], draft: bool = False) -> bool:
        """The native step (the draft's, with `draft`) runs the batch: one row, or (when it batches) any mix of
        decoding sequences, prompt chunks and speculative verifications of at most NATIVE_ROWS tokens in all
        (NATIVE_ROWS_A8 with int8 activations); no target prompt chunk with images or prompt logprobs (the PyTorch
        forward handles those, and larger prefills, where BLAS wins; the draft sees image placeholders' own
        embeddings)."""
        step = self.draft_native if draft else self.native
        rows = sum(n for _, n in batch)
        most = NATIVE_ROWS_A8 if step is not None and step.act_int8 else NATIVE_ROWS
        if step is None or rows > most or (rows > 1 and not step.batches):
            return False
        return draft or all(
            s.num_computed >= len(s.prompt) or (not s.images and s.prompt_logprobs is None) for s, _ in batch
        )

    def _native_logits(self, batch: list[tuple[Sequence, int]], want: Seq[int], draft: bool = False) -> Tensor:
        """The logits (len(want), V) of rows `want` of the batch's flattened new tokens through the native step (one
        C call for the batch), which writes their K/V into their slots of the pool (where the batched path reads
        them). With `draft`, the draft model's, from each sequence's draft_computed."""
        step = self.draft_native if draft else self.native
        starts = [seq.draft_computed if draft else seq.num_computed for seq, _ in batch]
        if len(batch) == 1 and batch[0][1] == 1:
            seq, pos = batch[0][0], starts[0]
            logits = step.step(seq.tokens[pos], pos, seq.blocks)[None][: len(want)].clone()  # (len(want) <= 1, V)
        else:
            tokens, pos, tables = [], [], []
            for (seq, n), start in zip(batch, starts, strict=True):
                tokens += seq.tokens[start : start + n]
                pos += range(start, start + n)
                tables += [seq.blocks] * n
            logits = step.step_batch(tokens, pos, tables, list(want)).clone()
        self.stats["draft_native_steps" if draft else "native_steps"] += 1
        return self._mask(logits)

    def _mask(self, logits: Tensor) -> Tensor:
        """logits with the ids the tokenizer cannot decode at -inf."""
        return logits if self.allowed is None else logits.masked_fill(~self.allowed, float("-inf"))

    def _sample(self, batch: list[tuple[Sequence, int]], rows: dict[int, tuple[int, int]], logits: Tensor) -> dict:
        """Batch index → next token of every sequence whose step ends its known tokens, sampled together
        (sampling.sample_rows: one argmax for the greedy rows, one softmax per group of equal params). Empty when
        that fails: each sequence then samples alone, so a bad request fails alone."""
        done = [i for i, (seq, n) in enumerate(batch) if seq.num_computed + n == len(seq.tokens)]
        if not done:
            return {}
        at = torch.tensor([rows[i][0] + rows[i][1] - 1 for i in done], device=logits.device)
        try:
            tokens = sample_rows([batch[i][0].sampler for i in done], logits[at])
        except Exception:
            return {}
        return dict(zip(done, tokens, strict=True))

    def _forward(self, model: GPT, cache: PagedKVCache, batch: list[tuple[Sequence, int]], want, draft=False):
        """One flattened forward of the batch's new tokens; logits (len(want), V) in fp32."""
        chunks, ids = [], []
        for seq, n in batch:
            start = seq.draft_computed if draft else seq.num_computed
            chunks.append((start, n, seq.blocks))
            ids += seq.tokens[start : start + n]
        cache.prepare(chunks)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, N)
        at = torch.tensor(want, dtype=torch.long, device=self.device)
        embeds = None if draft else self._image_rows(batch, len(ids))  # the draft sees the placeholders' embeddings
        w8a8 = self.config.draft_act_int8 if draft else self.config.act_int8  # what the native step's a8 equals
        with int8_activations(model) if w8a8 else contextlib.nullcontext():
            logits = model(idx, kv_cache=cache, logits_at=at, embeds=embeds)[0].float()  # (len(want), V)
        return self._mask(logits)

    def _image_rows(self, batch: list[tuple[Sequence, int]], N: int) -> tuple[Tensor, Tensor] | None:
        """The step's `embeds`: where (1, N) marks the flattened positions that hold image placeholders, rows
        (where.sum(), D) their features in order, each image sliced to the part of it this chunk computes."""
        where = torch.zeros(1, N, dtype=torch.bool)
        rows, offset = [], 0
        for seq, n in batch:
            start = seq.num_computed
            for k, (im, span) in enumerate(zip(seq.images, seq.spans, strict=True)):
                lo, hi = max(start, im.offset), min(start + n, im.offset + span)
                if lo < hi:
                    where[0, offset + lo - start : offset + hi - start] = True
                    rows.append(self._features(seq, k)[lo - im.offset : hi - im.offset])
            offset += n
        if not rows:
            return None
        return where.to(self.device), torch.cat(rows).to(self.device, self.model.transformer.wte.weight.dtype)

    def _features(self, seq: Sequence, k: int) -> Tensor:
        """Image k's features (span, D): the sequence's own, the LRU's, or the tower's. A tower call encodes
        every image of the sequence still without features at once."""
        if seq.features[k] is None:
            todo = []
            for j, im in enumerate(seq.images):
                if seq.features[j] is None and (cached := self.image_features.get(im.digest)) is not None:
                    self.image_features.move_to_end(im.digest)
                    seq.features[j] = cached
                elif seq.features[j] is None:
                    todo.append(j)
            if todo:
                weight = next(self.vision.parameters())  # the tower's device and dtype (fp32 beside a bf16 LM)
                pixels = torch.stack([seq.images[j].pixels for j in todo]).to(weight.device, weight.dtype)
                out = self.vision(pixels)  # (n, span, D)
                self.stats["images_encoded"] += len(todo)
                for j, f in zip(todo, out, strict=True):
                    seq.features[j] = self._remember(seq.images[j].digest, f)
        return seq.features[k]

    def _remember(self, digest: bytes, features: Tensor) -> Tensor:
        self.image_features[digest] = features
        while len(self.image_features) > self.config.image_cache:
            self.image_features.popitem(last=False)
        return features

    def _prompt_logprobs(self, seq: Sequence, start: int, n: int, logits: Tensor) -> None:
        logprobs = logits.log_softmax(dim=-1)
        for j in range(n):
            target = start + j + 1
            if target < len(seq.prompt):
                seq.prompt_logprobs.append(top_logprobs(logprobs[j], seq.prompt[target], seq.params.prompt_logprobs))

    def _emit(self, seq: Sequence, tokens: list[int], out: RequestOutput, raw: Tensor) -> None:
        """Append sampled tokens to seq (checking stops and lengths) and to the step's output.
        `raw` (len(tokens), V): the target logits that produced each token, for log-probabilities."""
        p = seq.params
        for j, token in enumerate(tokens):
            seq.tokens.append(token)
            self.stats["generated_tokens"] += 1
            seq.sampler.observe(token)
            out.token_ids.append(token)
            if p.logprobs is not None:
                entry = top_logprobs(raw[j].log_softmax(dim=-1), token, p.logprobs)
                seq.logprobs.append(entry)
                out.logprobs.append(entry)
            if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
                seq.finish_reason = "stop"
            elif seq.decoder is not None:
                seq.text += seq.decoder.push(token)
                for s in p.stop:
                    at = seq.text.find(s, max(0, seq.emitted - len(s)))
                    if at >= 0:
                        seq.text, seq.finish_reason = seq.text[:at], "stop"
                        break
            if seq.finish_reason is None and seq.num_output >= p.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                return

    def _finish_output(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        if seq.finish_reason is not None:
            if seq.decoder is not None and seq.finish_reason != "stop":
                seq.text += seq.decoder.flush()
            self.running.remove(seq)
            self.by_id.pop(seq.request_id, None)
            self._free(seq)
            out.finished, out.finish_reason = True, seq.finish_reason
        hold = 0 if out.finished else max((len(s) - 1 for s in seq.params.stop), default=0)
        safe = max(seq.emitted, len(seq.text) - hold)
        out.text, seq.emitted = seq.text[seq.emitted : safe], safe
        if out.finished and seq.prompt_logprobs is not None:
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    # ---- speculative decoding --------------------------------------------------------------------------

    def _speculative_step(self) -> list[RequestOutput]:
        """One round for every (decoding) running sequence: draft k tokens, verify them in one target
        forward, keep the accepted prefix plus one token from the target."""
        k = self.config.num_speculative
        batch = self._schedule(spare=k)
        if not batch:
            return []
        self.stats["steps"] += 1
        drafts: dict[int, list[int]] = {}
        qs: dict[int, Tensor | None] = {}
        room = {i: min(k, seq.params.max_tokens - seq.num_output - 1) for i, (seq, _) in enumerate(batch)}
        if self.config.speculative == "ngram":
            for i, (seq, _) in enumerate(batch):
                drafts[i], qs[i] = ngram_propose(seq.tokens, room[i], self.config.ngram_max), None
        else:
            drafts, qs = self._draft(batch, room)
        chunks = [(seq, 1 + len(drafts[i])) for i, (seq, _) in enumerate(batch)]
        saved = [list(seq.tokens) for seq, _ in batch]
        for i, (seq, _) in enumerate(batch):
            seq.tokens += drafts[i]  # temporarily, so the forward reads them
        rows = range(sum(n for _, n in chunks))
        if self._native_applies(chunks):
            logits = self._native_logits(chunks, rows)  # (rows, V)
        else:
            logits = self._forward(self.model, self.cache, chunks, rows)
        outputs, offset = [], 0
        for i, (seq, n) in enumerate(chunks):
            seq.tokens = saved[i]
            rows = logits[offset : offset + n]  # (1 + k_i, V)
            offset += n
            out = RequestOutput(seq.request_id, [], num_prompt_tokens=len(seq.prompt), num_cached_tokens=seq.num_cached)
            try:
                d = drafts[i]
                if plain_greedy(seq.params):  # the argmax rule: no distributions, no draws
                    emitted, accepted = accept_greedy(d, rows.argmax(dim=-1).tolist())
                else:
                    p = torch.stack([seq.sampler.probs(rows[j], d[:j]) for j in range(n)])
                    emitted, accepted = accept(d, qs[i], p, seq.sampler.generator)
                self.stats["spec_proposed"] += len(d)
                self.stats["spec_accepted"] += accepted
                seq.num_computed = len(seq.tokens) + accepted  # the last emitted token has no K/V yet
                seq.draft_computed = min(seq.draft_computed, seq.num_computed)
                self._emit(seq, emitted, out, raw=rows)
                self._name_blocks(seq)
            except Exception as e:
                seq.finish_reason, out.error = "error", f"{type(e).__name__}: {e}"
            self.stats["computed_tokens"] += n
            outputs.append(self._finish_output(seq, out))
        return outputs

    def _draft_prefill(self, batch: list[tuple[Sequence, int]]) -> None:
        """The draft model reads this step's prompt chunks too (into its own pool, from each sequence's
        draft_computed), so a sequence's first speculative round starts from a draft that has read the prompt: the
        draft's prompt processing is part of the prefill (time to first token), not of the first round."""
        chunks = [
            (seq, seq.num_computed + n - seq.draft_computed) for seq, n in batch if seq.num_computed < len(seq.prompt)
        ]
        chunks = [(seq, n) for seq, n in chunks if n > 0]
        if not chunks:
            return
        last = [sum(n for _, n in chunks) - 1]  # one row of logits, unused (the forward wants at least one)
        if self._native_applies(chunks, draft=True):
            self._native_logits(chunks, last, draft=True)
        else:
            self._forward(self.draft, self.draft_cache, chunks, last, draft=True)
        for seq, n in chunks:
            seq.draft_computed += n

    def _draft(self, batch, room) -> tuple[dict[int, list[int]], dict[int, Tensor | None]]:
        """The draft model catches up on each sequence's tokens, then proposes room[i] tokens, with their
        distributions q (room[i], V); a greedy sequence takes the draft's argmax and q is None (one-hot). With
        `draft_confidence`, a sequence's proposals end at the first token the draft gives less than that
        probability (the length depends on the draft alone, so the rule stays exact)."""
        room, floor = dict(room), self.config.draft_confidence
        drafts = {i: [] for i in range(len(batch))}
        qs: dict[int, list[Tensor]] = {i: [] for i in range(len(batch))}
        saved = [list(seq.tokens) for seq, _ in batch]
        for _ in range(max(room.values(), default=0)):
            active = [i for i in range(len(batch)) if len(drafts[i]) < room[i]]
            if not active:
                break
            chunks = [(batch[i][0], len(batch[i][0].tokens) - batch[i][0].draft_computed) for i in active]
            want = list(itertools.accumulate((n for _, n in chunks), initial=-1))[1:]
            if self._native_applies(chunks, draft=True):
                logits = self._native_logits(chunks, want, draft=True)  # (len(active), V)
            else:
                logits = self._forward(self.draft, self.draft_cache, chunks, want, draft=True)
            for row, i in enumerate(active):
                seq = batch[i][0]
                seq.draft_computed = len(seq.tokens)
                if plain_greedy(seq.params):
                    token = int(logits[row].argmax())  # the logits are masked to the allowed ids
                    if floor and float(logits[row].softmax(-1)[token]) < floor:
                        room[i] = len(drafts[i])
                        continue
                else:
                    q = seq.sampler.probs(logits[row], drafts[i])
                    token = draw(q, seq.sampler.generator)
                    if floor and float(q.max()) < floor:
                        room[i] = len(drafts[i])
                        continue
                    qs[i].append(q)
                drafts[i].append(token)
                seq.tokens.append(token)
        for (seq, _), tokens in zip(batch, saved, strict=True):
            seq.tokens = tokens
        return drafts, {i: torch.stack(q) if q else None for i, q in qs.items()}

    # ---- conveniences ------------------------------------------------------------------------------------

    def run(self) -> Iterator[RequestOutput]:
        """Step until every request has finished, yielding each step's outputs."""
        while self.has_unfinished():
            yield from self.step()

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        images: list[Seq[ImageInput]] | None = None,
    ):
        """Run prompts to completion (continuous batching over all of them); Completions in order.
        `images`: each prompt's ImageInputs."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        images = images or [()] * len(prompts)
        ids = [self.add_request(p, sp, images=im) for p, sp, im in zip(prompts, params_list, images, strict=True)]
        got = {rid: Completion(rid, list(p), [], "", "", [], None, 0) for rid, p in zip(ids, prompts, strict=True)}
        for out in self.run():
            c = got.get(out.request_id)
            if c is None:
                continue
            c.token_ids += out.token_ids
            c.text += out.text
            c.logprobs += out.logprobs
            c.num_cached_tokens = out.num_cached_tokens
            if out.finished:
                c.finish_reason, c.prompt_logprobs = out.finish_reason, out.prompt_logprobs
        return [got[rid] for rid in ids]

    def stream(
        self, prompt: list[int], params: SamplingParams | None = None, images: Seq[ImageInput] = ()
    ) -> Iterator[RequestOutput]:
        """Add one request and yield its outputs as they come (other requests keep running)."""
        rid = self.add_request(prompt, params, images=images)
        try:
            while rid in self.by_id:
                for out in self.step():
                    if out.request_id == rid:
                        yield out
        finally:
            self.abort(rid)
