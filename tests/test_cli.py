"""The `gptstack` command as a user runs it: real subprocesses, real checkpoints, one-line errors."""

import subprocess
import sys

import pytest
import torch

import gptstack
from gptstack.infer.generate import generate
from gptstack.infer.sampling import SamplingParams


def run(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "gptstack.cli", *args], capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_info_prints_counts_flops_and_kv_bytes():
    out = run("info", "gpt2-small").stdout
    assert "124,439,808" in out and "FLOPs per token" in out and "KV cache per token" in out
    moe = run("info", "moe-8x7b").stdout
    assert "46,702,792,704" in moe and "12,879,925,248" in moe


@pytest.mark.parametrize(
    "args,message",
    [
        (["info", "gpt2-smal"], "unknown preset 'gpt2-smal'; did you mean gpt2-small"),
        (["init", "tiny", "X", "--set", "n_head=3"], "n_head=3 does not divide n_embd=128"),
        (["init", "tiny", "X", "--set", "n_heads=3"], "unknown config field 'n_heads'"),
        (["init", "tiny-llama", "X", "--set", "n_kv_head=3"], "n_kv_head=3 does not divide n_head=4"),
        (["generate", "/nonexistent/ckpt", "--prompt", "hi"], "checkpoint /nonexistent/ckpt does not exist"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    proc = run(*[a.replace("X", str(tmp_path / "x")) for a in args], ok=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_init_then_generate_streams_reproducibly(tmp_path):
    ckpt = tmp_path / "demo"
    run("init", "tiny", str(ckpt), "--tokenizer", "cl100k_base", "--set", "n_layer=2")
    model = gptstack.load(ckpt)
    assert model.tokenizer.name == "cl100k_base" and model.config.vocab_size == model.tokenizer.n_vocab
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, model.tokenizer.n_vocab)
    info = run("info", str(ckpt), "--context", "128").stdout
    assert "2 layers × 128 wide" in info and "vocab 100277" in info and "at context 128" in info

    args = ("generate", str(ckpt), "--prompt", "def main():", "--max-new-tokens", "12")
    first = run(*args, "--seed", "3", "--temperature", "0.9", "--top-p", "0.95").stdout
    again = run(*args, "--seed", "3", "--temperature", "0.9", "--top-p", "0.95").stdout
    assert first == again and first.startswith("def main():") and len(first) > len("def main():\n")

    greedy = run(*args, "--temperature", "0").stdout
    tok = model.tokenizer
    allowed = tok.decodable_mask(model.config.vocab_size)
    expected = list(generate(model, tok.encode("def main():"), 12, SamplingParams(temperature=0), allowed=allowed))
    assert greedy == "def main():" + tok.decode(expected) + "\n"

    too_long = run("generate", str(ckpt), "--prompt", "x " * 300, "--max-new-tokens", "10", ok=False)
    assert too_long.returncode == 2 and "exceed the context of 256 tokens" in too_long.stderr
    override = run(*args, "--tokenizer", "bytes", "--temperature", "0")
    assert override.stdout.startswith("def main():")
