"""GPT-1 supervised fine-tuning (Radford et al. 2018, §3.2-3.3).

Structured inputs become token sequences with learned start, delimiter and extract tokens, and a
linear head reads the final hidden state at the extract token:
- classification:  [start] text [extract]                          → W h → classes
- entailment:      [start] premise [delim] hypothesis [extract]    → W h → classes
- similarity:      both orderings, [start] a [delim] b [extract] and [start] b [delim] a [extract],
                   hidden states summed                             → W h → classes
- multiple choice: [start] context [delim] answer_i [extract] for each answer → w·h_i → softmax
The loss is L_task + λ·L_LM (λ = 0.5), the auxiliary LM loss on the input tokens.

The three special tokens take the ids just after the tokenizer's (the embedding grows if the
model's padded vocabulary has no room), initialised N(0, 0.02) as new embeddings are.

Data: a task of `gptstack eval` (a name found in the task folders, or a DCLM-format JSONL: `mc`
becomes classification when every item has the same choices, e.g. BoolQ's no/yes, and multiple
choice otherwise; `schema` becomes multiple choice), or JSONL rows {"text", "label"},
{"premise", "hypothesis", "label"}, {"text_a", "text_b", "label"} or {"context", "choices", "label"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptstack.checkpoint import CheckpointError, load_heads, load_model, read_meta
from gptstack.config import ModelConfig
from gptstack.eval.scorer import Scorer
from gptstack.eval.tasks import Task, TaskError, resolve_task, run_task
from gptstack.model import GPT, build_model
from gptstack.posttrain.common import (
    DataError,
    SkipRow,
    StageConfig,
    StageRun,
    chunks,
    load_start,
    max_len_of,
    maybe_lora,
    optimize,
    pad,
    read_jsonl,
    split,
)

TRANSFORMS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass
class FinetuneConfig(StageConfig):
    """GPT-1 task fine-tuning: start/delim/extract tokens, a head on the extract token, L_task + λ·L_LM"""

    task: str = ""  # an eval task name or file (also accepted as --data)
    transform: str = "auto"  # auto | classification | entailment | similarity | multiple_choice
    lm_coef: float = 0.5  # λ of the auxiliary LM loss
    lr: float = 6.25e-5  # GPT-1's
    eval_fraction: float = 0.2
    epochs: float = 3.0  # GPT-1's
    warmup_steps: int = 10
    limit: int = 0  # use only the first `limit` items (0: all)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transform not in ("auto", *TRANSFORMS):
            raise ValueError(f"transform must be auto or one of {TRANSFORMS}, got {self.transform!r}")


@dataclass
class Example:
    parts: list[list[str]]  # one list of text fields per sequence (several for similarity / choices)
    label: int


def examples_from_task(records: list[dict], kind: str, transform: str) -> tuple[str, list[Example], list[str]]:
    """(transform, examples, label names) from an eval task's records."""
    if kind == "schema":
        ex = [Example([[o, r["continuation"]] for o in r["context_options"]], int(r["gold"])) for r in records]
        return "multiple_choice", ex, []
    if kind != "mc":
        raise DataError(f"a {kind!r} task has no GPT-1 fine-tuning transform (need mc or schema)")
    same = all(r["choices"] == records[0]["choices"] for r in records)
    if transform == "classification" or (transform == "auto" and same):
        if not same:
            raise DataError("classification needs every item to have the same choices (the labels)")
        return "classification", [Example([[r["query"]]], int(r["gold"])) for r in records], list(records[0]["choices"])
    ex = [Example([[r["query"], c] for c in r["choices"]], int(r["gold"])) for r in records]
    return "multiple_choice", ex, []


def example_from_row(row: dict) -> tuple[str, Example]:
    """A user JSONL row: which transform its fields imply, and the example."""
    label = row.get("label", row.get("gold"))
    if isinstance(label, bool) or not isinstance(label, int):
        raise SkipRow("label is not an integer")
    if isinstance(row.get("text"), str):
        return "classification", Example([[row["text"]]], label)
    if isinstance(row.get("premise"), str) and isinstance(row.get("hypothesis"), str):
        return "entailment", Example([[row["premise"], row["hypothesis"]]], label)
    if isinstance(row.get("text_a"), str) and isinstance(row.get("text_b"), str):
        a, b = row["text_a"], row["text_b"]
        return "similarity", Example([[a, b], [b, a]], label)
    ctx, choices = row.get("context", row.get("query")), row.get("choices")
    if isinstance(ctx, str) and isinstance(choices, list) and all(isinstance(c, str) for c in choices):
        if not 0 <= label < len(choices):
            raise SkipRow("label outside the choices")
        return "multiple_choice", Example([[ctx, c] for c in choices], label)
    raise SkipRow("no text / premise+hypothesis / text_a+text_b / context+choices fields")


def load_examples(cfg: FinetuneConfig) -> tuple[str, list[Example], list[str], dict]:
    spec = cfg.task or cfg.data
    if not spec:
        raise ValueError("--task (an eval task name or file) or --data (JSONL) is required")
    skipped: dict[str, int] = {}
    path = Path(spec)
    is_user_rows = path.is_file() and path.suffix == ".jsonl" and _looks_like_user_rows(path)
    if not is_user_rows:
        try:
            task = resolve_task(spec)
        except TaskError as e:
            raise DataError(str(e)) from None
        transform, examples, labels = examples_from_task(task.records, task.kind, cfg.transform)
    else:
        rows, skip = read_jsonl(path, example_from_row)
        skipped = dict(skip)
        kinds = {t for t, _ in rows}
        if len(kinds) > 1:
            raise DataError(f"{path}: rows mix transforms {sorted(kinds)}")
        transform, examples, labels = kinds.pop(), [e for _, e in rows], []
    if cfg.transform != "auto" and cfg.transform != transform:
        raise DataError(f"{spec}: its rows are {transform} data, not {cfg.transform}")
    if transform == "multiple_choice" and any(len(e.parts) < 2 for e in examples):
        raise DataError(f"{spec}: multiple choice needs at least two choices per item")
    return transform, examples, labels, skipped


def _looks_like_user_rows(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return True  # read_jsonl names the line
    return isinstance(row, dict) and "label" in row


class GPT1Classifier(nn.Module):
    """The transformer plus the task head (classes, or one score per choice)."""

    def __init__(self, model: GPT, transform: str, n_out: int, special: dict[str, int]):
        super().__init__()
        self.backbone, self.transform, self.special = model, transform, special
        self.config = model.config
        self.head = nn.Linear(model.config.n_embd, n_out, device=model.lm_head.weight.device)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def heads(self) -> dict[str, Tensor]:
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def encode(self, tokenizer, ex: Example, max_len: int) -> list[list[int]]:
        """Token sequences of an example: [start] a [delim] b [extract], each field cut from the left
        (the start of a long passage goes first) so the whole fits max_len."""
        s = self.special
        seqs = []
        for fields in ex.parts:
            ids = [tokenizer.encode(f) for f in fields]
            room = max_len - 2 - (len(ids) - 1)
            while (over := sum(map(len, ids)) - room) > 0:  # trim the longest field's beginning
                i = max(range(len(ids)), key=lambda j: len(ids[j]))
                ids[i] = ids[i][min(over, len(ids[i])) :]
            seq = [s["start"]]
            for j, part in enumerate(ids):
                seq += ([s["delim"]] if j else []) + part
            seqs.append([*seq, s["extract"]])
        return seqs

    def forward(self, batch: list[list[list[int]]]) -> tuple[Tensor, Tensor, Tensor]:
        """Task logits per example (padded to the largest choice count with -inf), the summed LM
        loss per example, and its token count per example."""
        flat = [seq for seqs in batch for seq in seqs]
        idx = pad(flat).to(self.head.weight.device)  # (N, T)
        h, _ = self.backbone.features(idx)  # (N, T, D)
        last = torch.tensor([len(s) - 1 for s in flat], device=idx.device)
        feats = h[torch.arange(len(flat), device=idx.device), last]  # (N, D) at [extract]
        # auxiliary LM loss on the text tokens (targets that are special tokens or padding ignored)
        tgt = idx[:, 1:].clone()
        lengths = torch.tensor([len(s) for s in flat], device=idx.device)
        tgt[
            (tgt >= self.special["start"])
            | (torch.arange(tgt.size(1), device=idx.device)[None] >= lengths[:, None] - 1)
        ] = -1
        lm = F.cross_entropy(
            self.backbone.lm_head(h[:, :-1]).float().transpose(1, 2), tgt, ignore_index=-1, reduction="none"
        ).sum(1)  # (N,)
        ntok = (tgt >= 0).sum(1)
        out, lm_ex, n_ex, i = [], [], [], 0
        width = max(len(seqs) for seqs in batch)
        for seqs in batch:
            k = len(seqs)
            f = feats[i : i + k]
            if self.transform == "multiple_choice":
                scores = self.head(f).squeeze(-1)  # (k,)
                out.append(F.pad(scores, (0, width - k), value=float("-inf")))
            else:
                out.append(self.head(f.sum(0)))  # similarity sums both orderings
            lm_ex.append(lm[i : i + k].sum())
            n_ex.append(ntok[i : i + k].sum())
            i += k
        return torch.stack(out).float(), torch.stack(lm_ex), torch.stack(n_ex)


def special_ids(tokenizer) -> dict[str, int]:
    n = tokenizer.n_vocab
    return {"start": n, "delim": n + 1, "extract": n + 2}


def grow_vocab(model: GPT, n: int, multiple: int = 64) -> GPT:
    """The model with room for n token ids (a new model with copied weights when it had less);
    the rows of the new ids are freshly initialised."""
    if model.config.vocab_size >= n:
        with torch.no_grad():  # unused padding rows may have decayed: start the new tokens fresh
            model.transformer.wte.weight[n - 3 : n].normal_(0.0, 0.02)
        return model
    cfg: ModelConfig = model.config.replace(vocab_size=-(-n // multiple) * multiple)
    new = build_model(cfg, device=model.lm_head.weight.device)
    old = model.state_dict()
    with torch.no_grad():
        for k, v in new.state_dict().items():
            if k in old:
                src = old[k]
                v[: src.shape[0]].copy_(src) if v.shape != src.shape else v.copy_(src)
    new.tokenizer = model.tokenizer
    return new


def task_loss(clf: GPT1Classifier, items: list[tuple[list[list[int]], int]], lm_coef: float):
    logits, lm, ntok = clf([seqs for seqs, _ in items])
    labels = torch.tensor([y for _, y in items], device=logits.device)
    task = F.cross_entropy(logits, labels, reduction="sum")
    lm_mean = (lm / ntok.clamp_min(1)).sum()  # each example's mean token LM loss
    loss = task + lm_coef * lm_mean
    correct = (logits.argmax(-1) == labels).sum()
    metrics = {"loss": float(loss.detach()), "task_loss": float(task.detach()), "lm_loss": float(lm_mean.detach())}
    return loss, len(items), {**metrics, "acc": float(correct)}


@torch.no_grad()
def accuracy(clf: GPT1Classifier, items: list, batch: int = 16) -> float:
    clf.eval()
    right = 0
    for group in chunks(items, batch):
        logits, _, _ = clf([s for s, _ in group])
        right += int((logits.argmax(-1).cpu() == torch.tensor([y for _, y in group])).sum())
    return right / len(items)


def zero_shot(model: GPT, records: list[dict], kind: str) -> float:
    """The same model scored as `gptstack eval` would (0-shot, lm-eval's acc) on the held-out records."""
    res = run_task(Scorer(model, model.tokenizer), Task("heldout", kind, records), shots=0)
    return float(res.metrics["acc"])


def finetune(cfg: FinetuneConfig) -> dict:
    model = load_start(cfg)
    tok = model.tokenizer
    transform, examples, labels, skipped = load_examples(cfg)
    examples = examples[: cfg.limit or None]
    special = special_ids(tok)
    model = grow_vocab(model, special["extract"] + 1)
    n_out = 1 if transform == "multiple_choice" else (len(labels) or max(e.label for e in examples) + 1)
    clf = GPT1Classifier(model, transform, n_out, special)
    max_len = max_len_of(cfg, model)
    items = [(clf.encode(tok, e, max_len), e.label) for e in examples]
    bad = [y for _, y in items if not 0 <= y < (len(examples[0].parts) if transform == "multiple_choice" else n_out)]
    if bad:
        raise DataError(f"{cfg.task or cfg.data}: label {bad[0]} outside the {n_out} classes")
    order = list(range(len(items)))
    train_idx, held_idx = split(order, cfg.eval_fraction, cfg.seed)
    train, held = [items[i] for i in train_idx], [items[i] for i in held_idx]

    zs = float("nan")
    spec_task = cfg.task or cfg.data
    if held and not (Path(spec_task).suffix == ".jsonl" and _looks_like_user_rows(Path(spec_task))):
        task = resolve_task(spec_task)
        zs = zero_shot(model, [task.records[: cfg.limit or None][i] for i in held_idx], task.kind)
    maybe_lora(model, cfg)
    for p in clf.head.parameters():
        p.requires_grad_(True)
    head_config = {"kind": "gpt1", "transform": transform, "n_out": n_out, "special": special, "labels": labels}
    run = StageRun(cfg, "finetune", model, heads=clf.heads, head_config=head_config)
    evaluate = (lambda: {"acc": accuracy(clf, held)}) if held else None
    steps = optimize(clf, train, lambda b: task_loss(clf, b, cfg.lm_coef), run, evaluate)
    majority = max(sum(y == c for _, y in held) for c in range(max(n_out, 2))) / len(held) if held else float("nan")
    summary = {
        "task": spec_task, "transform": transform, "train_examples": len(train), "heldout_examples": len(held),
        "skipped": sum(skipped.values()), "steps": steps, "lm_coef": cfg.lm_coef,
        "zero_shot_acc": zs, "finetuned_acc": run.records[-1].get("eval_acc", float("nan")),
        "majority_class_acc": majority if transform != "multiple_choice" else float("nan"),
    }  # fmt: skip
    run.finish(summary, plots=[("curves", ["task_loss", "lm_loss", "acc", "eval_acc"])])
    return summary


def load_classifier(path: str | Path, device: str = "cpu") -> GPT1Classifier:
    """A checkpoint written by `gptstack finetune` as a GPT1Classifier in eval mode."""
    _, meta = read_meta(path)
    head = (meta.get("train") or {}).get("head") or {}
    if head.get("kind") != "gpt1":
        raise CheckpointError(f"{path}: not a GPT-1 fine-tuned checkpoint (no task head)")
    clf = GPT1Classifier(load_model(path, device=device), head["transform"], head["n_out"], head["special"])
    clf.head.load_state_dict({k.removeprefix("head."): v for k, v in load_heads(path).items()})
    clf.labels = head.get("labels", [])
    return clf.eval()
