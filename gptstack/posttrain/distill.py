"""Distilling a tiny draft model for speculative decoding from its target (sequence-level KD).

A draft helps only when its greedy token equals the target's often and a draft step costs far less
than a target step. The draft shares the target's tokenizer (its vocabulary and block size, as the
engine requires), so its embedding/head is vocab × d: d is kept small and the embedding tied, and it
starts as the target's own embedding projected on its top-d principal directions (so token identity
and similarity come for free; the trunk learns the rest).

    teacher answers: the target answers each prompt greedily (the engine, batched)   (Kim & Rush 2016)
    draft training:  next-token cross-entropy on prompt + answer, where every answer position's label
                     is the target's own greedy token, plus a sampled share of the prompt positions
                     (the real text's next token: the passage the answer copies from)

    cfg = DistillConfig(teacher="SmolLM2-135M-Instruct.Q4_1.gguf", data="boolq.jsonl", out="runs/draft")
    summary = distill(cfg)          # writes a checkpoint folder that `--speculative PATH` loads

The data file is JSONL whose rows hold a "prompt", "query" or "text" string (each one user message
through the target's chat template), or a plain .txt file cut into `prompt_chars`-character prompts.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.config import ModelConfig
from gptstack.data.shards import atomic_write
from gptstack.files import iter_jsonl
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT, build_model
from gptstack.posttrain.common import progress_bar

PROMPT_FIELDS = ("prompt", "query", "text")


@dataclass
class DistillConfig:
    teacher: str  # the target model: a checkpoint folder or a GGUF file (its tokenizer is the draft's)
    data: str  # prompts: JSONL rows with "prompt"/"query"/"text", or a .txt file cut into prompts
    out: str  # the draft checkpoint folder to write
    items: int = 96  # prompts the teacher answers
    skip: int = 0  # prompts skipped at the start of the data (keep evaluation items out)
    instruction: str = ""  # text appended to every prompt (e.g. how to answer)
    prompt_chars: int = 1500  # .txt data: characters per prompt
    answer_tokens: int = 64  # the teacher's greedy answer length (it may stop earlier)
    teacher_batch: int = 16  # prompts the teacher answers at once
    init_layers: int = 0  # > 0: the draft is the teacher's first init_layers blocks, final norm and table (frozen)
    n_layer: int = 2  # draft shape: layers
    n_embd: int = 128  # draft width (the embedding is vocab × n_embd, tied with the head)
    n_head: int = 4  # draft attention heads
    n_kv_head: int = 2  # draft key/value heads (GQA)
    d_ff: int = 384  # draft SwiGLU hidden width
    steps: int = 100  # optimizer steps
    batch_size: int = 6  # sequences per step
    lr: float = 3e-3  # AdamW peak learning rate (cosine to 10%, 20 warm-up steps)
    prompt_share: float = 0.1  # share of prompt positions scored (every answer position is)
    seed: int = 0
    answers: str | None = None  # JSONL cache of the teacher's answers: read when it exists, else written
    progress: bool = True  # a progress bar over the training steps (stderr)

    def __post_init__(self) -> None:
        if self.items < 1 or self.steps < 1 or self.batch_size < 1 or self.answer_tokens < 1:
            raise ValueError("items, steps, batch_size and answer_tokens must be >= 1")
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError(f"prompt_share must be in [0, 1], got {self.prompt_share}")
        if self.init_layers < 0:
            raise ValueError(f"init_layers must be >= 0, got {self.init_layers}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")


def read_prompts(path: str | Path, items: int, skip: int = 0, chars: int = 1500) -> list[str]:
    """The data file's prompts [skip, skip + items): JSONL rows' prompt/query/text field, or a .txt cut
    into `chars`-character pieces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distillation data {path} does not exist")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        pieces = [text[i : i + chars] for i in range(0, len(text), chars)]
    else:
        pieces = []
        for where, row in iter_jsonl(path):
            field = next((f for f in PROMPT_FIELDS if isinstance(row.get(f), str)), None)
            if field is None:
                raise ValueError(f"{where}: the row needs a string field among {PROMPT_FIELDS}")
            pieces.append(row[field])
            if len(pieces) >= skip + items:
                break
    out = pieces[skip : skip + items]
    if not out:
        raise ValueError(f"{path} holds no prompts after skipping {skip}")
    return out


def chat_prompt(tokenizer, text: str, instruction: str = "") -> list[int]:
    """One user message (text + instruction) through the tokenizer's chat template, ready for the answer."""
    content = f"{text}\n{instruction}" if instruction else text
    ids, _ = tokenizer.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)
    return ids


def teacher_answers(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """The target's greedy answers (ending with its stop token when it stopped)."""
    done = engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0))
    return [c.token_ids for c in done]


def cached_answers(path: str | None, prompts: list[list[int]], tokens: int) -> list[list[int]] | None:
    """The teacher's answers from a cache written for exactly these prompts and answer length, else None."""
    if not path or not Path(path).is_file():
        return None
    rows = [row for _, row in iter_jsonl(path)]
    if [r.get("prompt") for r in rows] != prompts or any(r.get("tokens") != tokens for r in rows):
        return None  # written for other prompts or settings: the teacher answers again
    return [r["answer"] for r in rows]


def draft_config(teacher: ModelConfig, cfg: DistillConfig) -> ModelConfig:
    """A llama-style draft with the teacher's vocabulary, context and positions."""
    return ModelConfig(
        vocab_size=teacher.vocab_size, block_size=teacher.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, d_ff=cfg.d_ff, mlp="swiglu", norm="rmsnorm",
        norm_eps=teacher.norm_eps, pos="rope", rope_theta=teacher.rope_theta, bias=False, tie_embeddings=True,
    )  # fmt: skip


@torch.no_grad()
def projected_embedding(teacher_wte: Tensor, d: int, std: float = 0.05) -> Tensor:
    """teacher_wte (V, D) centred and projected on its top-d principal directions (V, d), scaled to `std`."""
    E = teacher_wte.float()
    E = E - E.mean(dim=0)
    u, _, _ = torch.linalg.svd(E.T @ E)  # (D, D): the covariance's eigenvectors as columns, largest first
    P = E @ u[:, :d]  # (V, d)
    return P * (std / P.std())


def build_draft(teacher: GPT, cfg: DistillConfig) -> GPT:
    """A fresh draft of cfg's shape from the teacher's projected embedding; or (init_layers) a truncated teacher:
    its first init_layers blocks, its final norm and its token table (tied to the head, frozen: the draft keeps
    the teacher's vocabulary geometry and only its blocks and norms train)."""
    if cfg.init_layers:
        if not 0 < cfg.init_layers < teacher.config.n_layer:
            raise ValueError(f"init_layers must be in [1, {teacher.config.n_layer - 1}], got {cfg.init_layers}")
        if not teacher.config.tie_embeddings:
            raise ValueError("init_layers needs a teacher whose head is tied to its token table")
        draft = build_model(replace(teacher.config, n_layer=cfg.init_layers), seed=cfg.seed)
        missing, _ = draft.load_state_dict(teacher.state_dict(), strict=False)
        if missing:
            raise ValueError(f"the truncated teacher lacks {missing[:3]}")
        draft.transformer.wte.weight.requires_grad_(False)
        return draft
    draft = build_model(draft_config(teacher.config, cfg), seed=cfg.seed)
    draft.transformer.wte.weight.data.copy_(projected_embedding(teacher.transformer.wte.weight, cfg.n_embd))
    return draft


def make_batch(
    rows: list[tuple[list[int], list[int]]], share: float, rng: random.Random
) -> tuple[Tensor, Tensor, Tensor]:
    """rows: (prompt, answer) ids. Returns idx (B, T), the scored flat positions (n,) into B·T and their
    targets (n,): every answer position and a `share` of the prompt positions."""
    T = max(len(p) + len(a) for p, a in rows) - 1
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    where, targets = [], []
    for b, (p, a) in enumerate(rows):
        seq = p + a
        idx[b, : len(seq) - 1] = torch.tensor(seq[:-1])
        for t in range(len(seq) - 1):  # position t predicts seq[t + 1]
            if t + 1 >= len(p) or rng.random() < share:
                where.append(b * T + t)
                targets.append(seq[t + 1])
    return idx, torch.tensor(where), torch.tensor(targets)


def train_draft(draft: GPT, rows: list[tuple[list[int], list[int]]], cfg: DistillConfig) -> list[float]:
    """AdamW on the scored positions' cross-entropy; the loss of each step."""
    rng = random.Random(cfg.seed)
    trainable = [q for q in draft.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    draft.train()
    losses, bar = [], progress_bar(cfg.steps, cfg.progress)
    for step in range(cfg.steps):
        warm = min(1.0, (step + 1) / 20)
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * cosine
        idx, where, targets = make_batch(rng.sample(rows, min(cfg.batch_size, len(rows))), cfg.prompt_share, rng)
        h, _ = draft.features(idx)  # (B, T, D)
        logits = draft.lm_head(h.flatten(0, 1)[where])  # (n, V): the head only where it is scored
        loss = F.cross_entropy(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    return losses


def distill(cfg: DistillConfig) -> dict:
    """Teacher answers, draft training, checkpoint. Returns a summary (losses, times, sizes)."""
    torch.manual_seed(cfg.seed)
    teacher = load_model(cfg.teacher, require_tokenizer=True)
    tok = teacher.tokenizer
    texts = read_prompts(cfg.data, cfg.items, cfg.skip, cfg.prompt_chars)
    prompts = [chat_prompt(tok, t, cfg.instruction) for t in texts]
    t0 = time.perf_counter()
    answers = cached_answers(cfg.answers, prompts, cfg.answer_tokens)
    if answers is None:
        if cfg.progress:
            print(f"the teacher answers {len(prompts)} prompts ({cfg.answer_tokens} tokens each)", file=sys.stderr)
        engine = Engine(teacher, EngineConfig(max_seqs=cfg.teacher_batch, kv_memory="1GiB"), tokenizer=tok)
        answers = teacher_answers(engine, prompts, cfg.answer_tokens)
        del engine
        if cfg.answers:
            pairs = zip(prompts, answers, strict=True)
            rows = [{"prompt": p, "answer": a, "tokens": cfg.answer_tokens} for p, a in pairs]
            atomic_write(Path(cfg.answers), "".join(json.dumps(r) + "\n" for r in rows).encode())
    t_teacher = time.perf_counter() - t0
    draft = build_draft(teacher, cfg)
    t0 = time.perf_counter()
    losses = train_draft(draft, list(zip(prompts, answers, strict=True)), cfg)
    t_train = time.perf_counter() - t0
    draft.eval()
    save_checkpoint(draft, cfg.out, step=cfg.steps, tokenizer=tok, train_config={"distill": asdict(cfg)})
    return {
        "out": str(cfg.out),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "answer_tokens": sum(len(a) for a in answers),
        "teacher_s": round(t_teacher, 1),
        "train_s": round(t_train, 1),
        "loss_first": round(sum(losses[:10]) / len(losses[:10]), 3),
        "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 3),
    }
