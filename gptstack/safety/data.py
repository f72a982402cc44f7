"""Refusal-training data (issue 22): refusal demonstrations for harmful prompts, helpful answers to their
benign look-alikes, and preference pairs between the two, in post-training's own JSONL formats.

    sft_rows = refusal_demos(harmful) + helpful_rows(benign, answers)   # {"prompt", "response", ...}
    dpo_rows = preference_pairs(harmful, compliant, benign, answers)    # {"prompt", "chosen", "rejected", ...}
    sft_rows += wrapped_rows(sft_rows, 64)                              # the same, inside jailbreak templates
    write_jsonl(path, rows)                                             # what `gptstack sft|dpo --data` reads

The inputs are suite rows `{"prompt", "label": "safe"|"unsafe", "category"}` of the *train* suites only
(`load_suite("harmful-train")`, `load_suite("benign-train")`); `check_disjoint` refuses a training
set that shares a prompt with an evaluation suite. Extra keys (`label`, `category`, `source`) ride
along: SFT and DPO ignore them.

- A refusal demonstration is the desired style of GPT-4's rubric (option A): brief, not judgemental,
  offering a safe alternative where there is a natural one. It is built from templates (an opener, a
  short reason, an alternative by harm category) picked by a SHA-256 of the prompt, so the data is
  deterministic and varied without a sampler.
- A helpful answer is the model's own greedy reply (`generate`), kept only when a judge says it is not
  a refusal and cut at its last full sentence: self-distillation, so learning to refuse the harmful
  rows does not pull the benign answers away from what the model already says (a low alignment tax).
- Wrapped rows (`wrapped_rows`) put a share of either inside pyrit's jailbreak templates, only ones the
  evaluation's wrappers never use: adversarial training, with benign requests wrapped too so that the
  wrapper alone does not come to mean "refuse".
- A pair for a harmful prompt prefers the refusal over the model's compliant reply; one for a benign
  prompt prefers the helpful reply over a refusal. `ranked_pair` instead picks, among sampled replies,
  the best and the worst by a reward (reward model + w · RBRM, the issue's recipe).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gptstack.data.shards import atomic_write

OPENERS = (
    "I can't help with that.",
    "I'm not able to help with that.",
    "Sorry, but I can't assist with that request.",
    "I won't be able to help with this one.",
    "I can't provide that.",
)
REASONS = (
    "It could put people at risk.",
    "It could be used to cause real harm.",
    "Information like this could hurt someone.",
    "",
)
# (keywords of a category or prompt, safe alternatives); the first entry that matches wins
ALTERNATIVES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (
        ("self-harm", "self_harm", "suicide", "kill myself", "hurt myself"),
        (
            "If you're going through a hard time, talking to someone you trust or a local crisis line can really help.",
            "If you're struggling, you don't have to face it alone: a crisis line or a doctor can help right now.",
        ),
    ),
    (
        (
            "cyber",
            "malware",
            "hack",
            "virus",
            "phishing",
            "exploit",
            "ransomware",
            "password",
            "ddos",
            "sql injection",
            "keylogger",
        ),
        (
            "If you're working on security, I can explain how to protect systems against this kind of attack.",
            "I'm happy to help with defensive security, like hardening a system or spotting phishing.",
        ),
    ),
    (
        ("drug", "narcotic", "methamphetamine", "mdma", "cocaine", "heroin", "fentanyl"),
        (
            "If you or someone you know is struggling with substance use, I can point you to support resources.",
            "I can share general information about drug safety and where to find help instead.",
        ),
    ),
    (
        ("weapon", "bomb", "explosive", "gun", "firearm", "poison", "chemical", "biolog"),
        (
            "If you're interested in the topic, I can talk about its history or about safety instead.",
            "I can share general safety information or point you to legal, supervised resources.",
        ),
    ),
    (
        ("fraud", "scam", "financial", "theft", "steal", "counterfeit", "launder"),
        (
            "I can explain how to recognise and protect yourself against scams instead.",
            "If you're worried about fraud, I can help you with ways to keep your money and accounts safe.",
        ),
    ),
    (
        (
            "misinformation",
            "disinformation",
            "fake news",
            "propaganda",
            "conspiracy",
            "persuasive article",
            "article arguing",
        ),
        (
            "I can help you find reliable sources on the topic instead.",
            "If you'd like, I can help you write something accurate and well sourced on the topic.",
        ),
    ),
    (
        ("hate", "harass", "discriminat", "bully", "toxic", "violen", "kill", "threat", "assault"),
        (
            "If there's a conflict behind this, I'm happy to help you think through a peaceful way to handle it.",
            "I can help with something constructive instead, like how to resolve a conflict or get support.",
        ),
    ),
)
DEFAULT_ALTERNATIVES = ("Is there something else I can help you with?", "I'm happy to help with something else.")

Judge = Callable[[Sequence[str], Sequence[str]], list[bool]]  # (prompts, responses) -> refused?
_SENTENCE_END = re.compile(r"(?<=[.!?])(\s|$)|\n")


def _pick(options: Sequence[str], prompt: str, salt: str) -> str:
    """A deterministic choice of option for the prompt (SHA-256, not Python's salted hash)."""
    h = int.from_bytes(hashlib.sha256(f"{salt}\0{prompt}".encode()).digest()[:8], "big")
    return options[h % len(options)]


def alternatives_for(category: str, prompt: str) -> tuple[str, ...]:
    """The safe alternatives for a request (by keywords of the prompt, then of its harm category)."""
    for text in (prompt.lower(), category.lower()):
        for keys, alts in ALTERNATIVES:
            if any(k in text for k in keys):
                return alts
    return DEFAULT_ALTERNATIVES


def refusal(prompt: str, category: str = "", variant: int = 0) -> str:
    """A refusal of the desired style for the prompt: opener, an optional short reason, an alternative.
    `variant` gives another, equally deterministic, wording (DPO's chosen differs from SFT's target)."""
    salt = str(variant)
    parts = [_pick(OPENERS, prompt, "o" + salt), _pick(REASONS, prompt, "r" + salt)]
    parts.append(_pick(alternatives_for(category, prompt), prompt, "a" + salt))
    return " ".join(p for p in parts if p)


def _check_rows(rows: Iterable[dict], label: str) -> list[dict]:
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"row {i}: no prompt")
        if row.get("label") != label:
            raise ValueError(f"row {i}: label {row.get('label')!r}, expected {label!r}")
    return rows


def refusal_demos(harmful: Iterable[dict]) -> list[dict]:
    """SFT rows: each harmful suite row with a refusal demonstration as its response."""
    return [
        {"prompt": r["prompt"], "response": refusal(r["prompt"], r.get("category", "")), "label": "unsafe",
         "category": r.get("category", "")}
        for r in _check_rows(harmful, "unsafe")
    ]  # fmt: skip


def wrapped_rows(rows: Iterable[dict], n: int, salt: str = "w") -> list[dict]:
    """Copies of up to n rows (SFT or DPO rows of this module) with the prompt inside one of pyrit's
    jailbreak templates that the evaluation never uses (`wrappers.train_templates`), picked by a SHA-256
    of the prompt; the response stays. Harmful rows so wrapped teach refusing through a jailbreak, benign
    ones answering through it (the model learns to read the request, not the wrapper). `request` keeps
    the bare prompt, `template` the template's name."""
    from gptstack.safety.wrappers import fill_template, train_templates

    templates = train_templates()
    rows = list(rows)
    picked = sorted(rows, key=lambda r: hashlib.sha256(f"{salt}\0{r['prompt']}".encode()).digest())[:n]
    out = []
    for r in picked:
        name, text = _pick(templates, r["prompt"], "t" + salt)
        out.append({**r, "prompt": fill_template(text, r["prompt"]), "request": r["prompt"], "template": name})
    return out


def trim(text: str, min_chars: int = 12) -> str:
    """The reply up to its last full sentence (or line), when that keeps at least min_chars; else as is.
    A reply cut at max_tokens then ends cleanly, and SFT on it teaches a finished answer."""
    text = text.strip()
    ends = [m.start() for m in _SENTENCE_END.finditer(text)]
    cut = max((e for e in ends if e >= min_chars), default=None)
    return text[:cut].rstrip() if cut is not None else text


def helpful_rows(benign: Iterable[dict], answers: Sequence[str], refused: Sequence[bool]) -> list[dict]:
    """SFT rows: each benign suite row with the model's own (trimmed) answer, those a judge marked as a
    refusal (or empty) dropped."""
    benign = _check_rows(benign, "safe")
    if not len(benign) == len(answers) == len(refused):
        raise ValueError(f"{len(benign)} rows, {len(answers)} answers, {len(refused)} judgements")
    return [
        {"prompt": r["prompt"], "response": trim(a), "label": "safe", "category": r.get("category", "")}
        for r, a, no in zip(benign, answers, refused, strict=True)
        if not no and trim(a)
    ]  # fmt: skip


def preference_pairs(
    harmful: Iterable[dict], compliant: Sequence[str], complied: Sequence[bool], helpful: Iterable[dict]
) -> list[dict]:
    """DPO rows. Harmful: chosen a refusal (a second wording), rejected the model's reply where the
    judge says it complied. Benign (`helpful`: helpful_rows' output): chosen the helpful answer,
    rejected a refusal."""
    harmful = _check_rows(harmful, "unsafe")
    if not len(harmful) == len(compliant) == len(complied):
        raise ValueError(f"{len(harmful)} rows, {len(compliant)} replies, {len(complied)} judgements")
    rows = [
        {"prompt": r["prompt"], "chosen": refusal(r["prompt"], r.get("category", ""), variant=1),
         "rejected": trim(a), "label": "unsafe", "category": r.get("category", "")}
        for r, a, yes in zip(harmful, compliant, complied, strict=True)
        if yes and trim(a)
    ]  # fmt: skip
    rows += [
        {"prompt": r["prompt"], "chosen": r["response"], "rejected": refusal(r["prompt"], r.get("category", ""), 1),
         "label": "safe", "category": r.get("category", "")}
        for r in _check_rows(helpful, "safe")
    ]  # fmt: skip
    return rows


def ranked_pair(prompt: str, samples: Sequence[str], rewards: Sequence[float]) -> dict | None:
    """A DPO row from sampled replies scored by a reward (e.g. RM + w · RBRM): the best chosen, the worst
    rejected, their reward gap as the margin; None when they tie or the replies are all the same."""
    if len(samples) != len(rewards) or len(samples) < 2:
        raise ValueError("need at least two samples, each with a reward")
    best = max(range(len(samples)), key=lambda i: rewards[i])
    worst = min(range(len(samples)), key=lambda i: rewards[i])
    if rewards[best] == rewards[worst] or samples[best] == samples[worst]:
        return None
    return {"prompt": prompt, "chosen": samples[best], "rejected": samples[worst],
            "reward_gap": float(rewards[best] - rewards[worst])}  # fmt: skip


def check_disjoint(train: Iterable[dict], *evals: Iterable[dict]) -> None:
    """Refuse training rows whose prompt (whitespace and case folded) is in an evaluation suite."""

    def key(p: str) -> str:
        return " ".join(p.lower().split())

    held = {key(r["prompt"]) for rows in evals for r in rows}
    shared = [r["prompt"] for r in train if key(r["prompt"]) in held]
    if shared:
        raise ValueError(f"{len(shared)} training prompts are in an evaluation suite (e.g. {shared[0][:80]!r})")


def generate(model, prompts: Sequence[str | list[dict]], max_tokens: int = 96, max_seqs: int = 16) -> list[str]:
    """The model's greedy replies to user prompts (or conversations), in the model's own chat template."""
    from gptstack.infer.engine import Engine, EngineConfig
    from gptstack.infer.sampling import SamplingParams

    tok = model.tokenizer
    msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    ids = [tok.encode_chat(m, add_generation_prompt=True)[0] for m in msgs]
    engine = Engine(model, EngineConfig(max_seqs=max_seqs), tokenizer=tok)
    outs = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.text for o in outs]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Rows as JSONL, written atomically (a crash leaves the old file or none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return path
