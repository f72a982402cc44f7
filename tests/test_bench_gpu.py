"""benchmarks/bench_gpu.py without a GPU: its static decode step (the one it replays as a CUDA graph) gives
generate()'s greedy tokens, and --dry-run runs every part on CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import VARIANTS, scramble

from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams
from gptstack.model import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "all-local-gqa"])
def test_static_decode_step_gives_the_plain_greedy_tokens(name):
    model = scramble(build_model(VARIANTS[name], seed=0), seed=0).eval().double()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    want = list(generate(model, prompt, SamplingParams(max_tokens=12, temperature=0.0)))
    _, got = bench_gpu().static_decode(model, prompt, 12, graph=False)
    # static_decode's first step consumes the prefill's token, so its tokens are generate()'s from the 2nd on
    assert got[:11] == want[1:]


@pytest.mark.slow  # 4-12 s: tiny shapes, every part
def test_dry_run_exercises_every_part_on_cpu(capsys):
    assert bench_gpu().main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "% of floor" in out and "static (eager)" in out and "| 4 |" in out and "MFU" in out
    assert "failed" not in capsys.readouterr().err
