"""gptstack: the whole GPT system in one package."""

from gptstack.config import PRESETS, ConfigError, ModelConfig, get_preset
from gptstack.model import GPT, build_model

__all__ = ["GPT", "PRESETS", "ConfigError", "ModelConfig", "build_model", "get_preset", "load"]
__version__ = "0.1.0"


def load(path, device="cpu", tokenizer=None, keep_quantized=False):
    """Load a checkpoint folder (or run/checkpoints folder → newest step, or a llama.cpp GGUF file) as a GPT
    in eval mode. The model's `.tokenizer` is the checkpoint's (or the file's) when it names one (or
    `tokenizer`); `keep_quantized`: a GGUF file's Q4_0/Q4_1/Q8_0 tensors stay as codes instead of fp32."""
    from gptstack.checkpoint import load_model

    return load_model(path, device=device, tokenizer=tokenizer, keep_quantized=keep_quantized)
