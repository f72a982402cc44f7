"""The `gptstack` command as a user runs it: its main() on real checkpoints and data (a real process where
the process is what is tested: the entry point, a missing optional package), one-line errors."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_util import gptstack as gptstack_cli

import gptstack
from gptstack.checkpoint import InitConfig, init_checkpoint
from gptstack.cli import main
from gptstack.infer import chat
from gptstack.infer.generate import generate
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.infer.sampling import SamplingParams


def run(*args, ok=True):
    """`gptstack ARGS` in this process (cli_util); ok=False: no check, the test reads the status."""
    return gptstack_cli(*args, ok=True if ok else None)


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
        (["chat", "ckpt", "--kv-memory", "2"], "kv_memory: expected a size such as 2GiB or 512MiB, or a fraction"),
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
    assert "2 layers × 128 wide" in info and "vocab 100281" in info and "at context 128" in info

    args = ("generate", str(ckpt), "--prompt", "def main():", "--max-tokens", "12")
    first = run(*args, "--seed", "3", "--temperature", "0.9", "--top-p", "0.95").stdout
    again = run(*args, "--seed", "3", "--temperature", "0.9", "--top-p", "0.95").stdout
    assert first == again and first.startswith("def main():") and len(first) > len("def main():\n")

    greedy = run(*args, "--temperature", "0").stdout
    tok = model.tokenizer
    allowed = tok.decodable_mask(model.config.vocab_size)
    expected = list(
        generate(model, tok.encode("def main():"), SamplingParams(temperature=0, max_tokens=12), allowed=allowed)
    )
    assert greedy == "def main():" + tok.decode(expected) + "\n"

    too_long = run("generate", str(ckpt), "--prompt", "x " * 300, "--max-tokens", "10", ok=False)
    assert too_long.returncode == 2 and "the prompt has 301 tokens; the context holds 256" in too_long.stderr
    override = run(*args, "--tokenizer", "bytes", "--temperature", "0")
    assert override.stdout.startswith("def main():")


@pytest.mark.slow
def test_tokenizer_and_data_commands_end_to_end(tmp_path):
    import json

    from conftest import SHARED_DATA

    from gptstack.data.sources import default_corpus

    tok = tmp_path / "tok"
    out = run("tokenizer", "train", "--vocab-size", "2048", "--max-bytes", "2000000", "--out", str(tok)).stdout
    assert "trained 2,048-id BPE (rustbpe)" in out and (tok / "ranks.tiktoken").is_file()
    table = run("tokenizer", "eval", "--tokenizers", f"{tok},cl100k_base", "--max-bytes", "300000").stdout
    assert "| tok | 2,048 |" in table and "| cl100k_base | 100,281 |" in table
    ids = run("tokenizer", "encode", str(tok), "--text", "def f(x):\n    return x").stdout.split()
    assert (
        run("tokenizer", "encode", str(tok), "--decode", "--text", " ".join(ids)).stdout == "def f(x):\n    return x\n"
    )

    # A quality classifier trained on real articles vs raw stdlib license/readme text, then a run.
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    pos.mkdir()
    neg.mkdir()
    gold = json.loads((SHARED_DATA / "html" / "ground-truth.json").read_text())
    for i, k in enumerate(sorted(gold)[:40]):
        (pos / f"{i}.txt").write_text(gold[k]["articleBody"])
    for i, line in enumerate((default_corpus() / "LICENSE.txt").read_text().split("\n\n")[:40]):
        (neg / f"{i}.txt").write_text(line)
    out = run("data", "train-quality", "--positive", str(pos), "--negative", str(neg), "--out", str(tmp_path / "q.npz"))
    assert "held-out accuracy" in out.stdout
    shards = tmp_path / "shards"
    inputs = [str(SHARED_DATA / "html"), str(default_corpus() / "json")]
    out = run("data", "prepare", "--input", *inputs, "--tokenizer", str(tok), "--out", str(shards), "--keep-text",
              "--quality-model", str(tmp_path / "q.npz"), "--mixture", "json=2", "--workers", "2").stdout  # fmt: skip
    assert "| json | 5 | 5 | 2 |" in out and "| quality | pareto_rejected |" in out
    assert (shards / "quality.npz").is_file() and (shards / "documents.jsonl").is_file()
    assert run("data", "stats", str(shards)).stdout.strip() in out
    task = tmp_path / "t.jsonl"
    from gptstack.data.contamination import shard_documents

    doc = next(shard_documents(shards))  # a training document
    task.write_text(json.dumps({"query": doc[:3000], "choices": ["a", "b"], "gold": 0}) + "\n" + '{"query": "x"}\n')
    report = run("data", "contamination", str(shards), "--tasks", str(task), "--out", str(tmp_path / "c.json")).stdout
    assert "| t | 2 |" in report and json.loads((tmp_path / "c.json").read_text())["t"]["dirty_items"] == [0]

    bad = run("data", "prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), ok=False)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    bad = run("data", "prepare", "--filters", '{"c4": {"lines": 1}}', "--out", str(tmp_path / "x"), ok=False)
    assert "filter c4 has no parameter 'lines'" in bad.stderr
    bad = run("data", "stats", str(tmp_path), ok=False)
    assert "not a shard folder" in bad.stderr


MISSING_EXTRA = """
import sys
sys.modules[sys.argv[1]] = None  # as if the optional package were not installed
from gptstack.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_missing_optional_extra_is_named_with_its_install_command():
    cmd = [sys.executable, "-c", MISSING_EXTRA, "fastapi", "serve", "ckpt"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "this needs the optional package 'fastapi': pip install 'gptstack[serve]'" in run.stderr
    assert "Traceback" not in run.stderr


# ---- generate, chat and eval: what tripped a user of a real model --------------------------------------


def strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity, as every parser outside Python does."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> Path:
    """A one-layer byte-level checkpoint with a 32-token context: 1 KiB of fp32 KV per token."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    overrides = {"n_layer": 1, "block_size": 32}
    return init_checkpoint(InitConfig("tiny", str(out), tokenizer="bytes", overrides=overrides))[0]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`gptstack ARGS` in this process (the same main() as the command, without a second torch start-up):
    exit status, stdout, stderr."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_allow_special_and_a_kv_memory_budget(tiny_bytes, capsys):
    prompt = "<|endoftext|>" * 2  # 26 bytes as text, 2 tokens as special tokens
    args = ("generate", str(tiny_bytes), "--prompt", prompt, "--temperature", "0", "--max-tokens", "8")
    code, _, err = cli(capsys, *args)
    assert code == 2 and "prompt of 26 tokens + max_tokens 8 (34 tokens) exceed the context of 32" in err
    code, out, err = cli(capsys, *args, "--allow-special")
    assert code == 0 and out.startswith(prompt) and " tokens in " in err
    # 16 KiB holds one block of 16 tokens: enough for 2 + 8 tokens, not for 2 + 20
    assert cli(capsys, *args, "--allow-special", "--kv-memory", "16KiB")[1] == out
    code, _, err = cli(capsys, *args[:-1], "20", "--allow-special", "--kv-memory", "16KiB")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs 2 KV blocks and the pool has 1 (16 tokens each): lower max_tokens or raise --kv-memory" in err


def test_chat_puts_the_system_message_first_through_the_template(tiny_bytes):
    engine = load_engine(LoadConfig(str(tiny_bytes)), chat.ENGINE)
    assert engine.config.max_seqs == 1 and engine.kv_plan.bytes <= engine.kv_plan.budget
    lines = iter(["Hi\n", "/reset\n", "Yo\n"])
    out = io.StringIO()
    params = SamplingParams(temperature=0, max_tokens=3)
    messages = chat.chat(engine, params, lambda: next(lines, None), out, system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Be brief." and messages[1]["content"] == "Yo"  # no line terminator
    ids, _ = engine.tokenizer.encode_chat(messages[:2], add_generation_prompt=True)
    first, _ = engine.tokenizer.encode_chat([messages[0], {"role": "user", "content": "Hi"}], True)
    assert engine.stats["prompt_tokens"] == len(first) + len(ids)  # each turn sent with the system message
    assert "Be brief." in engine.tokenizer.decode(ids) and out.getvalue().count("assistant> ") == 2
    long = iter(["x" * 40])  # more than the 32-token context: reported, the conversation goes on
    assert chat.chat(engine, params, lambda: next(long, None), out) == []
    assert "(that message takes" in out.getvalue()


def test_eval_out_is_strict_json_with_null_for_what_is_not_a_number(tiny_bytes, tmp_path, capsys):
    task = tmp_path / "t.jsonl"
    items = [{"query": f"{a} plus {a} is", "choices": [f" {2 * a}", f" {a}"], "gold": 0} for a in range(4)]
    task.write_text("".join(json.dumps(item) + "\n" for item in items))
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    cmd = ("eval", str(tiny_bytes), "--tasks", str(task), "--out", str(out), "--log-samples", str(samples))
    assert cli(capsys, *cmd, "--no-progress", "--report", str(tmp_path / "report.md"))[0] == 0
    results = strict_json(out.read_text())
    assert results["tasks"]["t"]["items"] == 4
    empty = [b for b in results["calibration"]["bins"] if b["n"] == 0]  # 4 answers leave empty bins: NaN before
    assert empty and all(b["confidence"] is None and b["accuracy"] is None for b in empty)
    assert [strict_json(line)["task"] for line in samples.read_text().splitlines()] == ["t"] * 4
