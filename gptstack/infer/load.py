"""Loading a checkpoint for inference: which weights, which tokenizer, which transforms.

`LoadConfig` is what `generate`, `chat`, `serve` and the library share: the checkpoint, an optional
tokenizer override, quantization on load and speculative decoding. `load_engine` turns it into an
Engine whose linear layers take the decode layout on CPU (transforms/decode.py) unless they are
quantized (transforms/quantize.py). A checkpoint with a vision tower (vision.safetensors + vision.json)
gives an engine that takes images; the tower is never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from gptstack.checkpoint import load_model, load_vision
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import GPT
from gptstack.transforms.decode import decode_layout
from gptstack.transforms.quantize import GROUP_SIZE, quantize


@dataclass
class LoadConfig:
    checkpoint: str  # checkpoint folder, run folder, or …/latest
    tokenizer: str | None = None  # override the checkpoint's: a stock name | DIR | CKPT | FILE.gguf
    quantize: Literal["int8", "int4"] | None = None  # quantize the weights on load
    group_size: int = GROUP_SIZE  # int4 group size (32, 64, 128)
    speculative: str | None = None  # 'ngram' (prompt lookup) or a draft model's checkpoint
    device: str = "cpu"  # cpu | cuda
    keep_quantized: bool = False  # GGUF files: hold Q4_0/Q4_1/Q8_0 tensors as codes instead of fp32
    draft_keep_quantized: bool = False  # the same for the draft alone (e.g. the target's own GGUF as its draft)


def load_engine(cfg: LoadConfig, engine: EngineConfig | None = None) -> Engine:
    """An engine over `cfg.checkpoint` (a quantized checkpoint loads as it was saved), scheduled by
    `engine` (cfg.speculative, when set, decides its speculative mode)."""
    model = load_model(
        cfg.checkpoint, cfg.device, cfg.tokenizer, require_tokenizer=True, keep_quantized=cfg.keep_quantized
    )
    tok = model.tokenizer

    def prepare(m: GPT) -> GPT:
        if getattr(m, "quantization", None):
            return m
        if cfg.quantize:
            return quantize(m, cfg.quantize, cfg.group_size)
        return decode_layout(m) if cfg.device == "cpu" else m

    draft, speculative = None, cfg.speculative
    if speculative not in (None, "ngram"):
        keep = cfg.keep_quantized or cfg.draft_keep_quantized
        draft = prepare(load_model(speculative, device=cfg.device, tokenizer=tok, keep_quantized=keep))
        speculative = "draft"
    engine = engine or EngineConfig()
    if speculative is not None:  # else the engine config's own mode (e.g. "ngram") stands
        engine = replace(engine, speculative=speculative)
    vision = load_vision(cfg.checkpoint, cfg.device)  # the vision tower (fp32, as saved), or None: text only
    return Engine(prepare(model), engine, tokenizer=tok, draft=draft, vision=vision)
