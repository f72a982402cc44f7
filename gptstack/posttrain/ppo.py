"""PPO with a KL penalty to the reference (Ziegler et al. 2019; InstructGPT step 3).

Each step:
1. rollouts: a batch of prompts, responses sampled by the inference engine from the current policy;
2. scoring (no grad): the policy's and the frozen reference's log-probabilities of every response
   token, the value head's estimates, and the reward of each whole response;
3. per-token rewards r_t = −β (log π − log π_ref) and the sequence reward added at its last token;
   a response that ran out of tokens before <|end|> can get `missing_eos_penalty` instead;
4. GAE (γ = 1, λ = 0.95) → advantages (whitened over the batch) and returns;
5. ppo_epochs passes over minibatches: clipped policy loss, clipped value loss, optionally plus
   ptx_coef × the pretraining LM loss on a shard batch (PPO-ptx);
6. the adaptive KL controller moves β toward kl_target (or β stays fixed).
Logged per step: reward, KL, entropy, clip fraction, approximate KL, response length, EOS rate,
and a tracked score that is reported but never optimised (the demo's ground truth).
A batch with a non-finite reward (a rule returning NaN) is not trained on, and a minibatch with a
non-finite loss or gradient makes no update; either counts the step as non-finite (common.StageRun
stops the run after max_bad_steps in a row). The trainer's own state (β, sampling seeds, minibatch
order, the PPO-ptx cursor) travels in the checkpoint, so a killed run resumes exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptstack.data.loader import TokenLoader
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.sampling import SamplingParams
from gptstack.model import GPT
from gptstack.posttrain.common import (
    DataError,
    SkipRow,
    StageConfig,
    StageRun,
    entropy,
    freeze,
    load_start,
    maybe_lora,
    nonfinite,
    pad,
    read_jsonl,
    token_logprobs,
)
from gptstack.posttrain.reward import Reward, build_reward
from gptstack.train.optim import build_adamw, param_groups


@dataclass
class PPOConfig(StageConfig):
    """PPO against a reward (model, rule or weighted sum) with a KL penalty to the starting model"""

    reward: str = ""  # reward spec (see reward.build_reward)
    track: str = ""  # a reward spec logged but not optimised (e.g. a ground-truth judge)
    max_tokens: int = 32  # tokens sampled per response
    temperature: float = 1.0  # sampling temperature of the rollouts
    ppo_epochs: int = 4  # optimisation passes over each batch of rollouts
    minibatch_size: int = 16  # rollouts per PPO minibatch
    kl_coef: float = 0.05  # β
    adaptive_kl: bool = False  # adapt β toward kl_target (Ziegler et al.)
    kl_target: float = 6.0  # nats per response, for the adaptive controller
    kl_horizon: int = 10000  # the adaptive controller's horizon, in rollouts
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE λ
    cliprange: float = 0.2  # PPO ratio clip ε
    cliprange_value: float = 0.2  # value-function clip
    vf_coef: float = 0.1  # weight of the value loss
    whiten: bool = True  # whiten advantages per batch
    missing_eos_penalty: float | None = None  # reward for a response cut off before <|end|>
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining LM loss
    ptx_data: str = ""  # shard folder for PPO-ptx
    max_steps: int = 50
    lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reward:
            raise ValueError("--reward is required (rm:PATH, rule:module:function, or a weighted sum)")
        if self.kl_coef < 0 or not 0 <= self.lam <= 1 or self.cliprange <= 0:
            raise ValueError("need kl_coef >= 0, 0 <= lam <= 1 and cliprange > 0")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs --ptx-data (a shard folder)")


class PolicyWithValue(nn.Module):
    """The policy (a GPT) and a value head reading the same final hidden states."""

    def __init__(self, policy: GPT):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = nn.Linear(policy.config.n_embd, 1, device=policy.lm_head.weight.device)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, T, V) and values (B, T) at every position."""
        h, _ = self.policy.features(idx)
        return self.policy.lm_head(h), self.value_head(h).squeeze(-1).float()


def frozen_copy(model: GPT) -> GPT:
    """A frozen deep copy of the model's weights (the tokenizer object is shared, not copied)."""
    tok, model.tokenizer = model.tokenizer, None
    try:
        ref = copy.deepcopy(model)
    finally:
        model.tokenizer = tok
    ref.tokenizer = tok
    return freeze(ref)


class KLController:
    """Fixed β, or Ziegler et al.'s adaptive β: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns (B, R) over response tokens (mask 1 on real tokens, 0 after the end)."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < R else 0)) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def whiten(x: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp_min(1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def read_prompts(path: str, tokenizer, max_prompt: int) -> tuple[list[tuple[str, list[int]]], dict]:
    """Prompts {"prompt": str} or {"messages": [...]} (up to a user turn) as (text, ids)."""

    def parse(row: dict) -> tuple[str, list[int]]:
        if isinstance(row.get("prompt"), str) and row["prompt"]:
            msgs, text = [{"role": "user", "content": row["prompt"]}], row["prompt"]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            msgs, text = row["messages"], str(row["messages"][-1].get("content", ""))
        else:
            raise SkipRow("no prompt")
        try:
            ids = tokenizer.encode_chat(msgs, add_generation_prompt=True)[0]
        except ValueError:
            raise SkipRow("bad messages") from None
        if len(ids) > max_prompt:
            raise SkipRow("longer than the context")
        return text, ids

    rows, skipped = read_jsonl(path, parse)
    return rows, dict(skipped)


@dataclass
class Rollouts:
    idx: Tensor  # (B, T) prompt + response, right-padded
    start: Tensor  # (B,) index of each row's first response token
    mask: Tensor  # (B, R) 1 on response tokens
    logp: Tensor  # (B, R) policy log p when sampled
    ref_logp: Tensor  # (B, R)
    values: Tensor  # (B, R)
    adv: Tensor  # (B, R)
    returns: Tensor  # (B, R)


def response_positions(start: Tensor, R: int) -> Tensor:
    """(B, R) positions of each row's response tokens in the full sequence (may run past the end
    of a row: masked)."""
    return start[:, None] + torch.arange(R, device=start.device)[None, :]


def score_tokens(logits: Tensor, idx: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """log p and entropy (B, R) of the tokens at `pos`, predicted from the logits at pos − 1."""
    T = idx.size(1)
    at = (pos - 1).clamp(0, T - 1)
    lg = logits.gather(1, at[..., None].expand(-1, -1, logits.size(-1)))  # (B, R, V)
    tgt = idx.gather(1, pos.clamp(max=T - 1))
    return token_logprobs(lg, tgt), entropy(lg)


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, model: GPT | None = None, reward: Reward | None = None):
        self.cfg = cfg
        policy = model if model is not None else load_start(cfg)
        self.tokenizer = policy.tokenizer
        self.ref = frozen_copy(policy)  # the SFT model, frozen
        maybe_lora(policy, cfg)
        self.model = PolicyWithValue(policy)
        self.reward = reward if reward is not None else build_reward(cfg.reward, cfg.device)
        self.track = build_reward(cfg.track, cfg.device) if cfg.track else None
        for rm in self.reward.models + (self.track.models if self.track else []):
            freeze(rm)
        self.kl = KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
        self.opt = build_adamw(param_groups(self.model, cfg.weight_decay), cfg.lr, (0.9, 0.95), 1e-8, fused=False)
        self.end_ids = self.tokenizer.stop_ids
        self.ptx = None
        if cfg.ptx_coef > 0:
            self.ptx = TokenLoader(cfg.ptx_data, batch_size=cfg.minibatch_size, seq_len=policy.config.block_size)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.sample_seed = cfg.seed * 1_000_003

    # ---- rollouts ------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list[tuple[str, list[int]]]) -> tuple[Rollouts | None, dict]:
        """Sample, score and build advantages; (None, stats with "nonfinite") when a reward is not finite."""
        cfg, policy = self.cfg, self.model.policy
        engine = Engine(policy, EngineConfig(max_seqs=len(prompts), prefix_caching=False), tokenizer=self.tokenizer)
        params = []
        for _ in prompts:
            self.sample_seed += 1
            params.append(SamplingParams(cfg.temperature, max_tokens=cfg.max_tokens, seed=self.sample_seed))
        outs = engine.generate([ids for _, ids in prompts], params)
        responses = [o.token_ids or [self.tokenizer.end_of_turn_id] for o in outs]
        ended = torch.tensor([r[-1] in self.end_ids for r in responses], dtype=torch.float)
        texts = [self.tokenizer.decode([t for t in r if t not in self.end_ids]) for r in responses]
        full = [ids + r for (_, ids), r in zip(prompts, responses, strict=True)]
        prompt_texts = [p for p, _ in prompts]
        scores, parts = self.reward(prompt_texts, texts, full)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(ended.bool(), scores, torch.full_like(scores, cfg.missing_eos_penalty))
        if not torch.isfinite(scores).all():  # no update from this batch (and β stays)
            culprits = [k for k, v in parts.items() if not math.isfinite(v)] or ["the reward"]
            why = f"{int((~torch.isfinite(scores)).sum())} of {len(scores)} rewards not finite ({', '.join(culprits)})"
            return None, {"reward": float(scores.mean()), "nonfinite": why}
        tracked = self.track(prompt_texts, texts, full)[0] if self.track else None

        dev = policy.lm_head.weight.device
        idx = pad(full).to(dev)
        start = torch.tensor([len(ids) for _, ids in prompts], device=dev)
        R = max(len(r) for r in responses)
        mask = (torch.arange(R)[None, :] < torch.tensor([len(r) for r in responses])[:, None]).float().to(dev)
        pos = response_positions(start, R)
        self.model.eval()
        logits, values_all = self.model(idx)
        logp, _ = score_tokens(logits, idx, pos)
        values = values_all.gather(1, (pos - 1).clamp(max=idx.size(1) - 1)) * mask  # V of the state before each token
        ref_logp, _ = score_tokens(self.ref(idx), idx, pos)
        logp, ref_logp = logp * mask, ref_logp * mask

        kl_tok = (logp - ref_logp) * mask  # (B, R)
        rewards = -self.kl.beta * kl_tok
        last = (mask.sum(1).long() - 1).clamp_min(0)
        rewards[torch.arange(len(full)), last] += scores.to(dev)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten:
            adv = whiten(adv, mask)
        stats = {
            "reward": float(scores.mean()), "kl": float(kl_tok.sum(1).mean()), "beta": self.kl.beta,
            "response_len": float(mask.sum(1).mean()), "eos_rate": float(ended.mean()),
            **({"score_" + k: v for k, v in parts.items()} if len(parts) > 1 else {}),
            **({"tracked": float(tracked.mean())} if tracked is not None else {}),
        }  # fmt: skip
        return Rollouts(idx, start, mask, logp, ref_logp, values, adv, returns), stats

    # ---- optimisation -------------------------------------------------------------------------------

    def train_minibatch(self, ro: Rollouts, rows: Tensor) -> tuple[dict[str, float], bool]:
        """One clipped PPO update on the rows; (stats, False) when its loss or gradient was not finite
        (then no update)."""
        cfg = self.cfg
        idx, mask = ro.idx[rows], ro.mask[rows]
        pos = response_positions(ro.start[rows], mask.size(1))
        logits, values_all = self.model(idx)
        logp, ent = score_tokens(logits, idx, pos)
        values = values_all.gather(1, (pos - 1).clamp(max=idx.size(1) - 1))
        old_logp, adv, returns, old_v = ro.logp[rows], ro.adv[rows], ro.returns[rows], ro.values[rows]

        ratio = torch.exp((logp - old_logp) * mask)
        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
        pg_loss = masked_mean(pg, mask)
        v_clip = old_v + (values - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clip - returns) ** 2), mask)
        loss = pg_loss + cfg.vf_coef * vf_loss
        stats = {}
        if self.ptx is not None:
            x, y = self.ptx.next_batch()
            _, ptx_loss = self.model.policy(x.to(idx.device), y.to(idx.device))
            loss = loss + cfg.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        finite = nonfinite(loss=float(loss.detach()), grad_norm=norm) is None
        if finite:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            stats.update(
                pg_loss=float(pg_loss), vf_loss=float(vf_loss), entropy=float(masked_mean(ent, mask)),
                clip_frac=float(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), mask)),
                approx_kl=float(masked_mean(0.5 * (logp - old_logp) ** 2, mask)),
            )  # fmt: skip
        return stats, finite

    def step(self, prompts: list[tuple[str, list[int]]]) -> dict:
        """One PPO step on a batch of prompts: its stats, with "nonfinite" (why) when it was skipped."""
        ro, stats = self.rollout(prompts)
        if ro is None:
            return stats
        self.model.train()
        B, sums, n, bad = ro.idx.size(0), {}, 0, 0
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.g)
            for rows in order.split(self.cfg.minibatch_size):
                mb, finite = self.train_minibatch(ro, rows)
                for k, v in mb.items():
                    sums[k] = sums.get(k, 0.0) + v
                n, bad = n + 1, bad + (not finite)
        self.model.eval()
        out = {**stats, **{k: v / n for k, v in sums.items()}}
        if bad:
            return {**out, "nonfinite": f"loss or gradient in {bad} of {n} minibatches (those made no update)"}
        self.kl.update(stats["kl"], B)
        return out

    def heads(self) -> dict[str, Tensor]:
        return {f"value_head.{k}": v for k, v in self.model.value_head.state_dict().items()}

    def state_dict(self) -> dict:
        """What a resumed run needs besides the weights and the optimizer: β, the sampling seed, the
        minibatch generator and the PPO-ptx cursor."""
        ptx = self.ptx.state_dict() if self.ptx is not None else None
        return {"beta": self.kl.beta, "sample_seed": self.sample_seed, "generator": self.g.get_state(), "ptx": ptx}

    def load_state_dict(self, state: dict) -> None:
        self.kl.beta, self.sample_seed = state["beta"], state["sample_seed"]
        self.g.set_state(state["generator"])
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])


def ppo(cfg: PPOConfig) -> dict:
    trainer = PPOTrainer(cfg)
    policy = trainer.model.policy
    max_prompt = policy.config.block_size - cfg.max_tokens
    if max_prompt < 1:
        raise ValueError(f"max_tokens {cfg.max_tokens} leaves no room in a {policy.config.block_size} context")
    prompts, skipped = read_prompts(cfg.data, trainer.tokenizer, max_prompt)
    if len(prompts) < cfg.batch_size:
        raise DataError(f"{cfg.data}: {len(prompts)} usable prompts, fewer than batch_size {cfg.batch_size}")
    run = StageRun(cfg, "ppo", policy, heads=trainer.heads, head_config={"kind": "value"},
                   extra=(trainer.state_dict, trainer.load_state_dict))  # fmt: skip
    run.loop(trainer.model, trainer.opt, prompts, cfg.max_steps, lambda _, batch: trainer.step(batch))
    good = [r for r in run.records if "nonfinite" not in r] or run.records
    first, last = good[0], good[-1]
    summary = {
        "prompts": len(prompts), "skipped": sum(skipped.values()), **{f"skipped: {k}": v for k, v in skipped.items()},
        "steps": cfg.max_steps, "kl_coef": cfg.kl_coef, "adaptive_kl": cfg.adaptive_kl,
        "reward_first": first["reward"], "reward_last": last["reward"], "kl_last": last.get("kl", float("nan")),
        **({"tracked_first": first["tracked"], "tracked_last": last["tracked"]} if "tracked" in last else {}),
    }  # fmt: skip
    run.finish(summary, plots=[("curves", ["reward", "kl", "tracked", "entropy", "response_len"])])
    return summary
