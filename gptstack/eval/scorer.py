"""Scoring a model: the three requests every evaluation reduces to (lm-eval's interface).

    scorer = Scorer(model, tokenizer)
    scorer.loglikelihood([(context_ids, continuation_ids), ...])  # → [(sum log p, is_greedy), ...]
    scorer.loglikelihood_rolling(ids)                              # → sum log p of every token
    scorer.generate_until(prompts, stop=["\\n\\n"], max_tokens=256) # → greedy texts (inference engine)

Log-likelihood requests are sorted by length and batched by a token budget, right-padded (padding sits
after every real token, so causal attention never sees it), and the head is computed only at the positions
that predict a continuation token. A request longer than the context loses tokens from the
left of its context; `truncated` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptstack.model import GPT

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def rolling_windows(tokens: list[int], prefix: int, max_len: int, stride: int | None = None):
    """lm-eval's loglikelihood_rolling windows: every token is predicted exactly once, the first from
    `prefix` (end-of-text) alone, each window's input at most `max_len` tokens. `stride` (≤ max_len):
    tokens newly predicted per window, the rest of the window being context (stride = max_len: disjoint
    windows, lm-eval's default; a smaller stride gives each token more context at more compute).
    Yields (input ids, the tokens its last positions predict)."""
    stride = stride or max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}], got {stride}")
    seq = [prefix, *tokens]
    start = 0  # index into tokens of the next token to predict
    while start < len(tokens):
        end = min(start + stride, len(tokens))
        lo = max(0, end - max_len)
        yield seq[lo:end], tokens[start:end]  # seq[lo:end] predicts seq[lo+1 : end+1], which ends in these
        start = end


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Token ids of a (context, continuation) pair as lm-eval encodes them: the context's trailing
    whitespace moves to the continuation, the whole text is encoded and split after the context's
    tokens (so the continuation is tokenized as it would be in running text); an empty context
    becomes end-of-text."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx) :] or tokenizer.encode(continuation)  # (merged into the context's last token)


class Scorer:
    """Batched log-likelihoods and greedy generation for one model and tokenizer."""

    def __init__(self, model: GPT, tokenizer, batch_tokens: int = 8192, max_batch: int = 64, progress: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.context = model.config.block_size
        self.device = model.transformer.wte.weight.device
        self.batch_tokens, self.max_batch, self.progress = batch_tokens, max_batch, progress
        self.truncated = 0  # requests that lost context tokens on the left
        self.scored_tokens = 0  # continuation tokens scored
        self.forward_tokens = 0  # tokens run through the model (padding excluded)

    # ---- log-likelihood ----------------------------------------------------------------------------

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], int]:
        """The model input (context + continuation minus its last token) and the continuation length,
        truncated from the left to the context window."""
        if not cont:
            raise ValueError("a continuation must have at least one token")
        if not ctx:
            raise ValueError("a context must have at least one token (use end-of-text for none)")
        full = ctx + cont
        if len(full) - 1 > self.context:
            self.truncated += 1
            full = full[-(self.context + 1) :]
        return full[:-1], min(len(cont), len(full) - 1)

    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool, list[float]]]:
        """One batch: for each row, the log-probs of `targets` (the last len(target) positions)."""
        B, T = len(inputs), max(len(x) for x in inputs)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, : len(x)] = torch.tensor(x)
        n = max(len(t) for t in targets)
        at = torch.zeros(B, n, dtype=torch.long)  # (B, n): the positions whose next token is a target
        for i, (x, t) in enumerate(zip(inputs, targets, strict=True)):
            at[i] = torch.arange(len(x) - len(t), len(x) - len(t) + n).clamp(max=len(x) - 1)
        logits = self.model(ids.to(self.device), logits_at=at.to(self.device))  # (B, n, V): the head runs on these only
        logp = F.log_softmax(logits.float(), dim=-1)
        out = []
        for i, t in enumerate(targets):
            rows = logp[i, : len(t)]  # (len(t), V)
            tgt = torch.tensor(t, device=self.device)
            lp = rows.gather(1, tgt[:, None])[:, 0]
            out.append((lp.sum().item(), bool((rows.argmax(-1) == tgt).all()), lp.tolist()))
        self.scored_tokens += sum(len(t) for t in targets)
        self.forward_tokens += sum(len(x) for x in inputs)
        return out

    def _batched(self, inputs: list[list[int]], targets: list[list[int]], desc: str) -> list:
        from tqdm.auto import tqdm

        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # longest first: padding is minimal
        results: list = [None] * len(inputs)
        bar = tqdm(total=len(inputs), desc=desc, unit="req", disable=not self.progress, leave=False)
        i = 0
        while i < len(order):
            width = len(inputs[order[i]])
            n = max(1, min(self.max_batch, self.batch_tokens // width))
            chunk = order[i : i + n]
            for j, r in zip(chunk, self._score([inputs[j] for j in chunk], [targets[j] for j in chunk]), strict=True):
                results[j] = r
            i += n
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests: Sequence[Request], per_token: bool = False) -> list:
        """Σ log p(continuation | context) and whether greedy decoding would produce the continuation,
        per request (+ the per-token log-probs with per_token=True)."""
        fitted = [self._fit(list(c), list(x)) for c, x in requests]
        inputs = [inp for inp, _ in fitted]
        targets = [(list(c) + list(x))[-n:] for (c, x), (_, n) in zip(requests, fitted, strict=True)]
        results = self._batched(inputs, targets, "loglikelihood")
        return [r if per_token else r[:2] for r in results]

    def loglikelihood_rolling(self, tokens: list[int], stride: int | None = None) -> float:
        """Σ log p over every token of a document, with windows of the model's context (see
        rolling_windows); the first token is predicted from end-of-text."""
        return sum(self.loglikelihood_rolling_batch([tokens], stride)[0])

    def loglikelihood_rolling_batch(self, docs: list[list[int]], stride: int | None = None) -> list[list[float]]:
        """Per document, the log-prob of each of its tokens (windows of all documents batched together)."""
        inputs, targets, owner = [], [], []
        for d, tokens in enumerate(docs):
            for inp, tgt in rolling_windows(tokens, self.tokenizer.eot_id, self.context, stride):
                inputs.append(inp)
                targets.append(tgt)
                owner.append(d)
        results = self._batched(inputs, targets, "rolling")
        per_doc: list[list[float]] = [[] for _ in docs]
        for d, r in zip(owner, results, strict=True):
            per_doc[d].extend(r[2])
        return per_doc

    # ---- generation --------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[list[int]], stop: Sequence[str] = (), max_tokens: int = 256) -> list:
        """Greedy continuations through the inference engine (continuous batching), cut at the first
        stop string, at most `max_tokens` tokens each, so a generation that never stops is bounded.
        Prompts longer than the context minus `max_tokens` lose tokens on the left (counted).
        Returns engine Completions (text, token_ids, finish_reason "stop" | "length")."""
        from gptstack.infer.engine import Engine, EngineConfig
        from gptstack.infer.sampling import SamplingParams

        if max_tokens >= self.context:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt in a {self.context}-token context")
        room = self.context - max_tokens
        fitted = []
        for p in prompts:
            if len(p) > room:
                self.truncated += 1
                p = p[-room:]
            fitted.append(list(p))
        engine = Engine(self.model, EngineConfig(max_seqs=min(32, max(1, len(fitted)))), tokenizer=self.tokenizer)
        return engine.generate(fitted, SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=tuple(stop)))

    def generate_until(self, prompts: Sequence[list[int]], stop: Sequence[str] = (), max_tokens: int = 256) -> list:
        """The texts of generate()."""
        return [c.text for c in self.generate(prompts, stop, max_tokens)]


# ---- a whole evaluation --------------------------------------------------------------------------


def evaluate(
    scorer: Scorer, tasks: list, shots: int = 0, limit: int | None = None, seed: int = 1234,
    contamination: str | None = None, max_gen_tokens: int = 256, exec_timeout: float = 10.0,
) -> dict:  # fmt: skip
    """Run `tasks` (tasks.Task) and gather the results: per task its metrics, the CORE-style centred
    accuracy averaged over tasks, calibration over the multiple-choice answers, and with a shard folder
    `contamination`, accuracy on the items whose 13-grams are not in its training split (GPT-3 §4)."""
    from tqdm.auto import tqdm

    from gptstack.eval.calibration import choice_probs, reliability
    from gptstack.eval.tasks import run_task

    results, items = {}, {}
    for task in tqdm(tasks, desc="tasks", unit="task", disable=not scorer.progress):
        r = run_task(scorer, task, shots, limit, seed, max_gen_tokens, exec_timeout)
        results[task.name], items[task.name] = r.metrics | {"kind": r.kind, "shots": shots}, r.items
    out: dict = {"shots": shots, "seed": seed, "tasks": results}
    if results:
        out["core"] = float(np.mean([m["centered"] for m in results.values()]))
    mc = [it for t in tasks if t.kind in ("mc", "schema") for it in items[t.name]]
    if mc:
        probs = [choice_probs(it["logliks"]) for it in mc]
        out["calibration"] = reliability(np.array([p.max() for p in probs]), np.array([it["correct"] for it in mc]))
    if contamination:
        out["contamination"] = contamination_split(contamination, tasks, items)
    out["truncated_requests"] = scorer.truncated
    out["items"] = items
    return out


def contamination_split(shards: str, tasks: list, items: dict[str, list[dict]]) -> dict:
    from gptstack.data.contamination import contamination_report, item_text, shard_documents

    report = contamination_report(shard_documents(shards), {t.name: [item_text(r) for r in t.records] for t in tasks})
    out = {}
    for t in tasks:
        dirty = set(report[t.name]["dirty_items"])
        scored = items[t.name]
        clean = [it["correct"] for it in scored if it["index"] not in dirty]
        out[t.name] = {
            "ngram": report[t.name]["ngram"], "items": len(scored), "dirty": len(scored) - len(clean),
            "acc_all": float(np.mean([it["correct"] for it in scored])) if scored else float("nan"),
            "acc_clean": float(np.mean(clean)) if clean else float("nan"), "clean_items": len(clean),
        }  # fmt: skip
    return out


def markdown(results: dict, title: str = "") -> str:
    """The results as a markdown table (+ contamination and calibration lines when present)."""
    lines = [f"### {title}", ""] if title else []
    if results.get("tasks"):
        lines += ["| task | kind | shots | items | acc | acc_norm | random | centred |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, m in results.get("tasks", {}).items():
        norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else ""
        lines.append(f"| {name} | {m['kind']} | {m['shots']} | {m['items']} | {m['acc']:.4f} | {norm} "
                     f"| {m['random']:.4f} | {m['centered']:+.4f} |")  # fmt: skip
    if "core" in results:
        lines += ["", f"CORE-style centred accuracy (mean over tasks): **{results['core']:+.4f}**"]
    if "calibration" in results:
        c = results["calibration"]
        lines += [f"Calibration over {c['items']:,} multiple-choice answers: ECE {c['ece']:.4f} "
                  f"(mean confidence {c['mean_confidence']:.3f}, accuracy {c['accuracy']:.3f})"]  # fmt: skip
    if results.get("contamination"):
        lines += ["", "| task | n-gram | dirty | acc (all) | acc (clean) |", "|---|---:|---:|---:|---:|"]
        for name, c in results["contamination"].items():
            lines.append(f"| {name} | {c['ngram']} | {c['dirty']}/{c['items']} | {c['acc_all']:.4f} "
                         f"| {c['acc_clean']:.4f} |")  # fmt: skip
    if results.get("perplexity"):
        lines += ["", "| text | documents | tokens | bytes | nats/token | perplexity | bits/byte |",
                  "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, p in results["perplexity"].items():
            lines.append(f"| {name} | {p['documents']} | {p['tokens']:,} | {p['bytes']:,} | {p['nll']:.4f} "
                         f"| {p['perplexity']:.3f} | {p['bpb']:.4f} |")  # fmt: skip
    if results.get("truncated_requests"):
        lines += ["", f"{results['truncated_requests']} requests were longer than the context and lost tokens "
                      "on the left."]  # fmt: skip
    return "\n".join(lines)


def load_scorer(checkpoint: str | Path, tokenizer=None, device: str = "cpu", **kwargs) -> Scorer:
    """A Scorer over a checkpoint; `tokenizer` (a spec or Tokenizer) overrides the one it names."""
    from gptstack.checkpoint import load_model

    model = load_model(checkpoint, device=device, tokenizer=tokenizer, require_tokenizer=True)
    return Scorer(model, model.tokenizer, **kwargs)


def run_report_of(checkpoint: str | Path) -> Path | None:
    """RUN/report.md for a checkpoint at RUN/checkpoints/step-N (or RUN itself), else None."""
    from gptstack.checkpoint import resolve

    folder = resolve(checkpoint)
    for run in (folder.parent.parent, folder.parent, folder):
        if (run / "checkpoints").is_dir() or (run / "report.md").is_file():
            return run / "report.md"
    return None


def eval_checkpoint(
    checkpoint: str | Path, tasks: list[str] = (), shots: int = 0, limit: int | None = None,
    out: str | Path | None = None, tokenizer=None, texts: list[str] = (), stride: int | None = None,
    contamination: str | None = None, calibration_plot: str | Path | None = None,
    samples: str | Path | None = None, report: str | Path | None = None, seed: int = 1234,
    batch_tokens: int = 8192, max_gen_tokens: int = 256, progress: bool = True,
) -> dict:  # fmt: skip
    """`gptstack eval`: tasks and/or perplexity on a checkpoint, written as JSON (+ per-item JSONL,
    reliability PNG) and as a section of the run report."""
    import json

    from gptstack.eval.calibration import plot_reliability
    from gptstack.eval.perplexity import perplexity, read_documents
    from gptstack.eval.tasks import resolve_task
    from gptstack.report import write_section

    if not tasks and not texts:
        raise ValueError("nothing to evaluate: give --tasks and/or --perplexity")
    loaded = [resolve_task(t) for t in tasks]  # every task file is checked before any scoring
    if len({t.name for t in loaded}) < len(loaded):
        raise ValueError("two tasks have the same name")
    scorer = load_scorer(checkpoint, tokenizer, batch_tokens=batch_tokens, progress=progress)
    results = evaluate(scorer, loaded, shots, limit, seed, contamination, max_gen_tokens) if loaded else {}
    if texts:
        results["perplexity"] = {str(t): perplexity(scorer, read_documents(t), stride) for t in texts}
    results["checkpoint"] = str(checkpoint)
    items = results.pop("items", {})
    if samples:
        with open(samples, "w", encoding="utf-8") as f:
            for name, rows in items.items():
                for row in rows:
                    f.write(json.dumps({"task": name, **row}) + "\n")
    if calibration_plot and "calibration" in results:
        plot_reliability(results["calibration"], calibration_plot)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    report = Path(report) if report else run_report_of(checkpoint)
    if report is not None:
        body = "## Evaluation\n\n" + markdown(results, f"{Path(str(checkpoint)).name}, {shots}-shot")
        if calibration_plot and "calibration" in results and Path(calibration_plot).parent == report.parent:
            body += f"\n\n![reliability diagram]({Path(calibration_plot).name})"
        write_section(report, f"eval-{shots}shot", body)
        results["report"] = str(report)
    return results
