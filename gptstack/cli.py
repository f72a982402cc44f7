"""`gptstack <command>`: parses arguments and calls library functions; no logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path


def cmd_info(args: argparse.Namespace) -> None:
    from gptstack.report import describe_model

    print(describe_model(args.model, context=args.context))


def cmd_init(args: argparse.Namespace) -> None:
    from gptstack.checkpoint import save_checkpoint
    from gptstack.config import load_config, parse_overrides
    from gptstack.model import build_model
    from gptstack.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(args.tokenizer)
    cfg = load_config(args.model, **{"vocab_size": tokenizer.n_vocab, **parse_overrides(args.set)})
    if cfg.vocab_size < tokenizer.n_vocab:
        raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.n_vocab}")
    model = build_model(cfg, seed=args.seed)
    path = save_checkpoint(model, args.out, step=0, tokenizer=tokenizer, train_config={"init_seed": args.seed})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote a freshly initialised {args.model} ({n_params:,} parameters) to {path}")


def _sampling(args: argparse.Namespace, **extra):
    from gptstack.infer.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, stop=tuple(args.stop), **extra,
    )  # fmt: skip


def _engine(args: argparse.Namespace):
    from gptstack.infer.engine import load_engine

    return load_engine(
        args.checkpoint, tokenizer=args.tokenizer, quantize=args.quantize, group_size=args.group_size,
        speculative=args.speculative, num_speculative=args.num_speculative,
    )  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> None:
    engine = _engine(args)
    params = _sampling(args, logprobs=1 if args.logprobs else None)
    prompt = engine.tokenizer.encode(args.prompt)
    out = sys.stdout
    out.write(args.prompt)
    start, n = time.perf_counter(), 0
    for piece in engine.stream(prompt, params):
        out.write(piece.text)
        out.flush()
        n += len(piece.token_ids)
        if args.logprobs:
            for token, (lp, _) in zip(piece.token_ids, piece.logprobs, strict=True):
                print(f"\n[{token} logprob {lp:.3f}]", end="", file=sys.stderr)
    out.write("\n")
    spec = f", {engine.acceptance_rate:.0%} of drafts accepted" if engine.config.speculative else ""
    print(f"[{n} tokens in {time.perf_counter() - start:.2f} s{spec}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from gptstack.infer.chat import chat

    engine = _engine(args)
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("user> ") if interactive else (sys.stdin.readline() or None)
        except EOFError:
            return None

    if interactive:
        print("chat: Ctrl-D to leave, /reset to clear the history", file=sys.stderr)
    chat(engine, _sampling(args), read, sys.stdout, system=args.system)


def cmd_quantize(args: argparse.Namespace) -> None:
    from gptstack.checkpoint import load_model, read_meta, save_checkpoint
    from gptstack.transforms.quantize import quantize

    model = load_model(args.checkpoint)
    _, meta = read_meta(args.checkpoint)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize(model, args.method, args.group_size)
    tok, step = model.tokenizer, meta.get("step")
    path = save_checkpoint(model, args.out, step=step, tokenizer=tok, train_config=meta.get("train"))
    after = (Path(path) / "model.safetensors").stat().st_size
    print(f"wrote {args.method} {path}: {after / 2**20:.1f} MiB of weights ({before / 2**20:.1f} MiB before)")


def cmd_convert(args: argparse.Namespace) -> None:
    from gptstack.interop import hf

    if args.direction == "hf-import":
        path = hf.hf_import(args.src, args.dst, tokenizer=args.tokenizer)
    else:
        path = hf.hf_export(args.src, args.dst)
    print(f"wrote {path}")


def cmd_tokenizer(args: argparse.Namespace) -> None:
    from gptstack import tokenizer as T
    from gptstack.data.sources import corpus_texts

    if args.action == "train":
        texts = corpus_texts(args.input, "train", args.heldout, args.max_bytes)
        t0 = time.perf_counter()
        if args.trainer == "chars":
            tok = T.train_chars(texts, name=args.out.name)
        else:
            tok = T.train_bpe(texts, args.vocab_size, args.pattern, args.trainer, name=args.out.name)
        seconds = time.perf_counter() - t0
        tok.save(args.out)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"trained {tok.n_vocab:,}-id BPE ({args.trainer}) on {mb:.1f} MB in {seconds:.1f}s; wrote {args.out}")
    elif args.action == "eval":
        texts = corpus_texts(args.input, "heldout", args.heldout, args.max_bytes)
        rows = T.bytes_per_token([T.get_tokenizer(t) for t in args.tokenizers.split(",")], texts)
        print("| tokenizer | ids | tokens | bytes/token |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['tokenizer']} | {r['n_vocab']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} |")
    else:
        tok = T.get_tokenizer(args.tokenizer)
        text = args.text if args.text is not None else sys.stdin.read()
        if args.decode:
            print(tok.decode([int(x) for x in text.replace(",", " ").split()]))
            return
        ids = tok.encode(text, allow_special=args.allow_special)
        print(" ".join(map(str, ids)))
        if args.show:
            print(" | ".join(repr(tok.decode_bytes([i]))[2:-1] for i in ids), file=sys.stderr)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from gptstack.train.loop import make_config, pretrain

    cfg = make_config(
        args.config, args.preset, args.set, data=str(args.data), out=str(args.out), max_steps=args.max_steps,
        budget=args.budget, batch_size=args.batch_size, seq_len=args.seq_len, batch_tokens=args.batch_tokens,
        lr=args.lr, device=args.device, dtype=args.dtype, distributed=args.distributed,
        compile=args.compile or None, progress=False if args.no_progress else None,
    )  # fmt: skip
    summary = pretrain(cfg, resume=args.resume)
    if "report" not in summary:  # ranks > 0 of a torchrun job
        return
    for s in summary["samples"]:
        print(f"\n--- sample: {s['prompt']!r} ---\n{s['prompt']}{s['completion']}")
    val = f", val loss {summary['val_loss']:.3f} ({summary['val_bpb']:.3f} bits/byte)" if "val_loss" in summary else ""
    print(
        f"\ntrained {summary['steps']:,} steps / {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s "
        f"at {summary['tokens_per_s']:,.0f} tokens/s (MFU {summary['mfu']:.1%}){val}\n"
        f"report:     {summary['report']}\nloss plot:  {Path(summary['run']) / 'loss.png'}\n"
        f"metrics:    {Path(summary['run']) / 'metrics.jsonl'}\ncheckpoint: {summary['checkpoint']}"
    )


POSTTRAIN = {  # command → (module, config class, entry point)
    "finetune": ("finetune", "FinetuneConfig", "finetune"),
    "sft": ("sft", "SFTConfig", "sft"),
    "reward": ("reward", "RewardConfig", "train_reward"),
    "dpo": ("dpo", "DPOConfig", "dpo"),
    "ppo": ("ppo", "PPOConfig", "ppo"),
}
POSTTRAIN_OPTIONS = (
    "init", "data", "out", "lr", "batch_size", "micro_batch_size", "epochs", "max_steps", "lora_rank", "lora_alpha",
    "lora_dropout", "device", "seed", "task", "transform", "lm_coef", "beta", "loss", "label_smoothing", "reward",
    "track", "kl_coef", "kl_target", "ptx_coef", "ptx_data", "max_new_tokens", "missing_eos_penalty", "minibatch_size",
    "ppo_epochs",
)  # fmt: skip


def cmd_posttrain(args: argparse.Namespace) -> None:
    import importlib

    from gptstack.config import parse_overrides

    module, cls_name, fn = POSTTRAIN[args.command]
    mod = importlib.import_module(f"gptstack.posttrain.{module}")
    cls = getattr(mod, cls_name)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: getattr(args, k) for k in POSTTRAIN_OPTIONS if k in fields and getattr(args, k, None) is not None}
    if args.lora_targets:
        kwargs["lora_targets"] = tuple(t for t in args.lora_targets.split(",") if t)
    if getattr(args, "adaptive_kl", False):
        kwargs["adaptive_kl"] = True
    if getattr(args, "no_pack", False):
        kwargs["pack"] = False
    kwargs["progress"] = not args.no_progress
    kwargs.update(parse_overrides(args.set, cls))
    summary = getattr(mod, fn)(cls(**kwargs))
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(
        f"checkpoint: {Path(kwargs.get('out', 'runs/posttrain')) / args.command}\nreport:     "
        f"{Path(kwargs.get('out', 'runs/posttrain')) / 'report.md'}"
    )


def _kv(pairs: list[str], what: str) -> dict[str, float]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"{what} wants NAME=NUMBER, got {pair!r}")
    return out


def cmd_data(args: argparse.Namespace) -> None:
    import json

    from gptstack.data import pipeline

    if args.action == "prepare":
        filters = {}
        if args.filters:
            text = Path(args.filters).read_text() if Path(args.filters).is_file() else args.filters
            try:
                filters = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"--filters is neither a JSON file nor JSON: {e}") from None
        cfg = pipeline.PrepareConfig(
            out=str(args.out), inputs=[str(p) for p in args.input or []], tokenizer=args.tokenizer,
            text_field=args.text_field, filters=filters, pii=not args.no_pii, quality_model=args.quality_model,
            dedup=args.dedup, mixture=_kv(args.mixture, "--mixture"), val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, seed=args.seed, keep_text=args.keep_text,
        )  # fmt: skip
        executor = pipeline.DaskExecutor(None if args.dask == "local" else args.dask) if args.dask else None
        try:
            manifest = pipeline.prepare(cfg, executor or pipeline.LocalExecutor(args.workers))
        finally:
            if executor:
                executor.close()
        print(pipeline.format_stats(manifest))
        print(f"\nwrote {args.out}")
    elif args.action == "stats":
        from gptstack.data.shards import read_manifest

        print(pipeline.format_stats(read_manifest(args.dir)))
    elif args.action == "train-quality":
        from gptstack.data.quality import QualityClassifier
        from gptstack.data.sources import corpus_texts

        pos = corpus_texts(args.positive, "train", 0.0)
        neg = corpus_texts(args.negative, "train", 0.0)
        model, report = QualityClassifier.train(pos, neg)
        model.save(args.out)
        print(f"trained on {len(pos):,} positive / {len(neg):,} negative documents; "
              f"held-out accuracy {report['heldout_accuracy']:.3f}; wrote {args.out}")  # fmt: skip
    else:
        from gptstack.data.contamination import contamination_report, read_task, shard_documents

        tasks = {Path(t).stem: read_task(t) for t in args.tasks}
        ngram = None if args.ngram == "auto" else int(args.ngram)
        report = contamination_report(shard_documents(args.dir), tasks, ngram)
        print("| task | items | n-gram | dirty | dirty % |\n|---|---:|---:|---:|---:|")
        for name, r in report.items():
            print(f"| {name} | {r['items']:,} | {r['ngram']} | {r['dirty']:,} | {r['dirty_fraction']:.1%} |")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))


def cmd_eval(args: argparse.Namespace) -> None:
    from gptstack.eval.harness import eval_checkpoint, markdown

    results = eval_checkpoint(
        args.checkpoint, tasks=[t for spec in args.tasks for t in spec.split(",") if t], shots=args.shots,
        limit=args.limit, out=args.out, tokenizer=args.tokenizer, texts=args.perplexity, stride=args.stride,
        contamination=args.contamination, calibration_plot=args.calibration_plot, samples=args.log_samples,
        report=args.report, seed=args.seed, batch_tokens=args.batch_tokens, max_gen_tokens=args.max_gen_tokens,
        progress=not args.no_progress,
    )  # fmt: skip
    print(markdown(results))
    for key in ("out", "report"):
        where = getattr(args, key) if key == "out" else results.get("report")
        if where:
            print(f"wrote {where}", file=sys.stderr)


def cmd_scaling(args: argparse.Namespace) -> None:
    from gptstack.eval.scaling import ScalingConfig, run_sweep, scaling_markdown

    fields = dict(data=str(args.data), out=str(args.out), widths=args.widths, n_layer=args.n_layer,
                  context=args.context, tokens_per_param=args.tokens_per_param, extra_ratios=args.extra_ratios,
                  heldout_compute=args.heldout_compute, batch_size=args.batch_size, lr=args.lr)  # fmt: skip
    cfg = ScalingConfig(**{k: v for k, v in fields.items() if v is not None})
    results = run_sweep(cfg, progress=not args.no_progress)
    print(scaling_markdown(results))
    print(f"wrote {Path(cfg.out) / 'scaling.json'}, scaling.png and report.md", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from gptstack.serve.api import ServeConfig
    from gptstack.serve.launch import load_engines, serve
    from gptstack.serve.moderation import parse_policy

    engines = load_engines(
        args.checkpoints, args.name, tokenizer=args.tokenizer, quantize=args.quantize, max_seqs=args.max_seqs,
        num_blocks=args.num_blocks, max_step_tokens=args.max_step_tokens,
    )  # fmt: skip
    config = ServeConfig(
        api_keys=args.api_keys, rpm=args.rpm, tpm=args.tpm, max_body_bytes=args.max_body_bytes,
        max_waiting=args.max_waiting, log_dir=args.log_dir, exact_cache=not args.no_cache,
        semantic_cache=args.semantic_cache, moderation=args.moderation,
        moderation_policy=parse_policy(args.moderation_policy), route_threshold=args.route_threshold,
    )  # fmt: skip
    serve(engines, config, host=args.host, port=args.port)


def cmd_moderation(args: argparse.Namespace) -> None:
    from gptstack.serve.gateway import Embedder
    from gptstack.serve.moderation import SEED_DATA, parse_policy, train_moderation

    spec = train_moderation(args.data or [SEED_DATA], args.out, Embedder(), holdout=args.holdout,
                            policy=parse_policy(args.policy))  # fmt: skip
    print(f"trained on {spec['rows']} rows, categories: {', '.join(spec['categories'])}")
    m = spec["held_out"]
    if m:
        print(
            f"held out ({m['held_out_rows']} rows):\n"
            "| category | precision | recall | F1 | support |\n|---|---:|---:|---:|---:|"
        )
        for c in [*spec["categories"], "flagged"]:
            r = m[c]
            print(f"| {c} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | {r['support']} |")
    print(f"wrote {Path(args.out) / 'moderation.json'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptstack", description="The whole GPT system in one package.")
    p.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters, FLOPs per token and KV-cache bytes of a preset or checkpoint")
    s.add_argument("model", help="preset name, config JSON, or checkpoint folder")
    s.add_argument("--context", type=int, help="context length for the attention FLOPs (default: the model's)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("init", help="write a freshly initialised checkpoint")
    s.add_argument("model", help="preset name or config JSON")
    s.add_argument("out", type=Path, help="checkpoint folder to write")
    s.add_argument("--tokenizer", default="cl100k_base", help="cl100k_base | o200k_base | bytes | DIR")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_init)

    for name, text in (("generate", "stream a completion of --prompt"), ("chat", "talk to a model (chat template)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("checkpoint", help="checkpoint folder, run folder, or …/latest")
        if name == "generate":
            s.add_argument("--prompt", required=True)
            s.add_argument("--logprobs", action="store_true", help="print each token's log-probability to stderr")
        else:
            s.add_argument("--system", default="", help="system prompt")
        default = 64 if name == "generate" else 256
        s.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=default)
        s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        s.add_argument("--top-k", type=int, default=None)
        s.add_argument("--top-p", type=float, default=1.0)
        s.add_argument("--min-p", type=float, default=0.0)
        s.add_argument("--presence-penalty", type=float, default=0.0)
        s.add_argument("--frequency-penalty", type=float, default=0.0)
        s.add_argument("--repetition-penalty", type=float, default=1.0)
        s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
        s.add_argument("--seed", type=int, default=None)
        s.add_argument("--tokenizer", help="override the checkpoint's: cl100k_base | o200k_base | bytes | DIR")
        s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights on load")
        s.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128)")
        s.add_argument("--speculative", help="'ngram' (prompt lookup) or a draft model's checkpoint")
        s.add_argument("--num-speculative", type=int, default=4, help="tokens drafted per round")
        s.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    s = sub.add_parser(
        "eval", help="perplexity and zero/few-shot tasks (acc, acc_norm, CORE, calibration, contamination)"
    )
    s.add_argument("checkpoint", help="checkpoint folder, run folder, or …/latest")
    s.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="FILE_OR_NAME[,…]",
        help="task files or names (looked up in $GPTSTACK_TASKS, data/eval, ../shared/data/eval)",
    )
    s.add_argument("--shots", type=int, default=0, help="in-context examples per item (drawn from the same task)")
    s.add_argument("--limit", type=int, help="score only the first N items of each task")
    s.add_argument("--out", type=Path, help="write the results as JSON")
    s.add_argument("--tokenizer", help="override the checkpoint's tokenizer: cl100k_base | o200k_base | bytes | DIR")
    s.add_argument(
        "--perplexity",
        action="append",
        default=[],
        metavar="TEXT",
        help="text file, folder of text files, or shard folder (its val split) to score",
    )
    s.add_argument("--stride", type=int, help="perplexity: tokens predicted per window (default: the context)")
    s.add_argument(
        "--contamination", metavar="SHARDS", help="also score the items clean of this shard folder's 13-grams"
    )
    s.add_argument("--calibration-plot", type=Path, metavar="PNG", help="write the reliability diagram")
    s.add_argument("--log-samples", type=Path, metavar="JSONL", help="write every item's scores and outcome")
    s.add_argument("--report", type=Path, help="report.md to append to (default: the checkpoint's run report)")
    s.add_argument("--seed", type=int, default=1234, help="few-shot example sampling")
    s.add_argument("--batch-tokens", type=int, default=8192, help="tokens per scoring batch")
    s.add_argument("--max-gen-tokens", type=int, default=256, help="bound on generated tokens (GSM8K, HumanEval)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("scaling", help="train a sweep, fit L(C) and L(N, D), predict a held-out larger run")
    s.add_argument("--data", type=Path, required=True, help="shard folder")
    s.add_argument("--out", type=Path, required=True, help="sweep folder (a rerun reuses finished runs)")
    s.add_argument("--widths", type=int, nargs="+", help="n_embd of the ladder (default 24 32 48 64 96)")
    s.add_argument("--n-layer", type=int)
    s.add_argument("--context", type=int)
    s.add_argument("--tokens-per-param", type=float, help="D/N of the ladder and the held-out run (default 10)")
    s.add_argument("--extra-ratios", type=float, nargs="+", help="other D/N at the middle widths (default 2.5 40)")
    s.add_argument("--heldout-compute", type=float, help="held-out compute / largest fitted compute (default 4)")
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_scaling)

    posttrain_help = {
        "finetune": "GPT-1 task fine-tuning: start/delim/extract tokens, a head on the extract token, L_task + λ·L_LM",
        "sft": "supervised fine-tuning on chat JSONL: assistant-only loss, packing without cross-document attention",
        "reward": "reward model: scalar head at the last token, Bradley-Terry loss on preference pairs",
        "dpo": "direct preference optimisation (sigmoid = DPO / cDPO with label smoothing, ipo)",
        "ppo": "PPO against a reward (model, rule or weighted sum) with a KL penalty to the starting model",
    }
    for name, text in posttrain_help.items():
        s = sub.add_parser(name, help=text)
        s.add_argument("--init", required=True, help="checkpoint to start from")
        s.add_argument("--data", required=name != "finetune", help="JSONL (see docs/posttrain.md for the rows)")
        s.add_argument("--out", default="runs/posttrain", help=f"run folder: <out>/{name}/step-*/, <out>/report.md")
        s.add_argument("--lr", type=float)
        s.add_argument("--batch-size", type=int, help="sequences, pairs or prompts per optimizer step")
        s.add_argument("--micro-batch-size", type=int, help="gradient accumulation: items per forward/backward")
        s.add_argument("--epochs", type=float)
        s.add_argument("--max-steps", type=int)
        s.add_argument("--seed", type=int)
        s.add_argument("--device", help="cpu | cuda")
        s.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of all weights")
        s.add_argument("--lora-alpha", type=float)
        s.add_argument("--lora-dropout", type=float)
        s.add_argument("--lora-targets", help="comma-separated module names (default c_attn,c_proj,c_fc)")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
        if name == "finetune":
            s.add_argument("--task", help="an eval task name (boolq, copa, …) or file")
            s.add_argument(
                "--transform", choices=["auto", "classification", "entailment", "similarity", "multiple_choice"]
            )
            s.add_argument("--lm-coef", type=float, help="λ of the auxiliary LM loss (default 0.5)")
        if name == "sft":
            s.add_argument("--no-pack", action="store_true", help="one conversation per row")
        if name == "dpo":
            s.add_argument("--beta", type=float, help="default 0.1")
            s.add_argument("--loss", choices=["sigmoid", "ipo"])
            s.add_argument("--label-smoothing", type=float, help="conservative DPO's ε")
        if name == "ppo":
            s.add_argument("--reward", required=True, help="rm:PATH | rule:module:function | 0.8*rm:P+0.2*rule:m:f")
            s.add_argument("--track", help="a reward spec logged but not optimised (a ground truth)")
            s.add_argument("--kl-coef", type=float, help="β of the per-token KL penalty (default 0.05)")
            s.add_argument("--adaptive-kl", action="store_true", help="adapt β toward --kl-target")
            s.add_argument("--kl-target", type=float)
            s.add_argument("--ptx-coef", type=float, help="PPO-ptx: weight of the pretraining loss")
            s.add_argument("--ptx-data", help="PPO-ptx: a shard folder")
            s.add_argument("--max-new-tokens", type=int)
            s.add_argument("--minibatch-size", type=int)
            s.add_argument("--ppo-epochs", type=int)
            s.add_argument("--missing-eos-penalty", type=float)
        s.set_defaults(func=cmd_posttrain)

    s = sub.add_parser("serve", help="OpenAI-compatible server + gateway + web chat over one or more checkpoints")
    s.add_argument("checkpoints", nargs="+", help="checkpoint folders (each served under its folder's name)")
    s.add_argument("--name", action="append", default=[], help="served name of the n-th checkpoint (repeatable)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--tokenizer", help="override the checkpoints' tokenizer")
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights on load")
    s.add_argument("--max-seqs", type=int, default=32, help="requests decoded at once per model")
    s.add_argument(
        "--num-blocks", type=int, default=None, help="KV-cache blocks per model (default: max-seqs contexts)"
    )
    s.add_argument("--max-step-tokens", type=int, default=512, help="tokens through the model per engine step")
    s.add_argument("--max-waiting", type=int, default=256, help="waiting requests per model before 503")
    s.add_argument("--api-keys", help="key file: lines 'KEY [name=N] [rpm=N] [tpm=N]' or JSON (+ $GPTSTACK_API_KEYS)")
    s.add_argument("--rpm", type=float, help="default requests per minute per key")
    s.add_argument("--tpm", type=float, help="default tokens per minute per key (prompt + max_tokens)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--log-dir", default="serve-logs", help="usage.jsonl and feedback.jsonl go here ('' = none)")
    s.add_argument("--no-cache", action="store_true", help="turn off the exact response cache")
    s.add_argument("--semantic-cache", type=float, metavar="COSINE", help="semantic cache threshold, e.g. 0.95")
    s.add_argument("--moderation", help="moderation classifier folder (gptstack moderation train)")
    s.add_argument("--moderation-policy", help="per category: 'violence=block,harassment=flag,…' (default block)")
    s.add_argument(
        "--route-threshold", type=float, default=0.25, help="'auto' difficulty at which to take the large model"
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("moderation", help="train the gateway's moderation classifier")
    msub = s.add_subparsers(dest="action", required=True)
    m = msub.add_parser("train", help="sentence embedding + logistic regression per category, from labelled JSONL")
    m.add_argument("--data", action="append", help="labelled JSONL (repeatable; default: the bundled seed set)")
    m.add_argument("--out", type=Path, required=True, help="folder to write moderation.json")
    m.add_argument("--holdout", type=float, default=0.25, help="fraction held out for the reported metrics")
    m.add_argument("--policy", help="'violence=block,harassment=flag,…' (default: block every category)")
    m.set_defaults(func=cmd_moderation)

    s = sub.add_parser("quantize", help="write an int8 or int4 weight-only quantized checkpoint")
    s.add_argument("checkpoint", help="checkpoint folder, run folder, or …/latest")
    s.add_argument("--method", choices=["int8", "int4"], default="int8")
    s.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128)")
    s.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("tokenizer", help="train, evaluate or use a BPE tokenizer")
    tsub = s.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE (default corpus: the Python stdlib)")
    t.add_argument("--input", nargs="+", help="files or folders (default: the Python standard library)")
    t.add_argument("--vocab-size", type=int, default=8192, help="ids in all, special tokens included")
    t.add_argument("--pattern", default="cl100k", help="pre-tokenization regex: gpt2 | cl100k | o200k | REGEX")
    t.add_argument(
        "--trainer",
        default="rustbpe",
        choices=["rustbpe", "hf", "chars"],
        help="rustbpe (measured faster) | hf | chars: one id per character seen, no merges",
    )
    t.add_argument("--max-bytes", type=int, default=None, help="train on at most this much text")
    t.add_argument("--heldout", type=float, default=0.1, help="fraction of documents kept out for eval")
    t.add_argument("--out", type=Path, required=True)
    t.set_defaults(func=cmd_tokenizer)
    t = tsub.add_parser("eval", help="bytes per token on held-out text")
    t.add_argument("--input", nargs="+", help="files or folders (default: the Python standard library)")
    t.add_argument("--tokenizers", default="cl100k_base,o200k_base", help="comma-separated names or folders")
    t.add_argument("--max-bytes", type=int, default=None)
    t.add_argument("--heldout", type=float, default=0.1, help="must match the value used to train")
    t.set_defaults(func=cmd_tokenizer)
    t = tsub.add_parser("encode", help="print the ids of --text (or stdin)")
    t.add_argument("tokenizer", help="cl100k_base | o200k_base | bytes | DIR")
    t.add_argument("--text")
    t.add_argument("--allow-special", action="store_true", help="parse special-token text as special tokens")
    t.add_argument("--show", action="store_true", help="also print each token's bytes on stderr")
    t.add_argument("--decode", action="store_true", help="the input is ids: print their text")
    t.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("data", help="prepare token shards from documents, and inspect them")
    dsub = s.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("prepare", help="documents → filtered, deduplicated token shards + manifest")
    d.add_argument("--input", nargs="+", help="files or folders (default: the Python standard library)")
    d.add_argument("--tokenizer", default="cl100k_base", help="cl100k_base | o200k_base | bytes | DIR")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--keep-text", action="store_true", help="also write the kept documents as documents.jsonl")
    d.add_argument("--text-field", default="text", help="JSONL/Parquet field with the text")
    d.add_argument(
        "--filters", help='JSON (or a JSON file) of overrides: {"gopher_quality": {"min_doc_words": 20}, "c4": false}'
    )
    d.add_argument("--no-pii", action="store_true", help="do not mask e-mail, IP addresses and phone numbers")
    d.add_argument("--quality-model", help="a classifier from `gptstack data train-quality`")
    d.add_argument("--dedup", default="fuzzy", choices=["fuzzy", "exact", "none"])
    d.add_argument("--mixture", nargs="+", default=[], metavar="SOURCE=WEIGHT", help="epochs of each source")
    d.add_argument("--val-fraction", type=float, default=0.01)
    d.add_argument("--shard-tokens", type=int, default=2**24)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    d.add_argument("--dask", help="run the stages on Dask: a scheduler address, or 'local' for a local cluster")
    d.set_defaults(func=cmd_data)
    d = dsub.add_parser("stats", help="print a shard folder's manifest tables")
    d.add_argument("dir", type=Path)
    d.set_defaults(func=cmd_data)
    d = dsub.add_parser("train-quality", help="train the GPT-3-style quality classifier")
    d.add_argument("--positive", nargs="+", required=True, help="reference high-quality documents")
    d.add_argument("--negative", nargs="+", required=True, help="raw documents")
    d.add_argument("--out", type=Path, required=True, help="classifier file (.npz)")
    d.set_defaults(func=cmd_data)
    d = dsub.add_parser("contamination", help="eval items whose n-grams occur in the training shards")
    d.add_argument("dir", type=Path)
    d.add_argument("--tasks", nargs="+", required=True, help="task JSONL files")
    d.add_argument("--ngram", default="13", help="n-gram length, or 'auto' for GPT-3 appendix C's per-task n")
    d.add_argument("--out", type=Path, help="write the full report (with dirty item indices) as JSON")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("pretrain", help="pretrain on token shards (GPT-3 recipe; torchrun for DDP/FSDP2)")
    s.add_argument("--data", type=Path, required=True, help="shard folder from `gptstack data prepare`")
    s.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, report)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--preset", help="model preset (see `gptstack info`), e.g. tiny, gpt2-small")
    which.add_argument("--config", help="training config JSON (a run's train_config.json works)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--budget", help="chinchilla (20 tokens/parameter, the default) or a wall-clock time: 90s, 10m, 2h")
    s.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    s.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    s.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, by gradient accumulation")
    s.add_argument("--lr", type=float, help="peak learning rate")
    s.add_argument("--device", help="auto | cpu | cuda")
    s.add_argument("--dtype", help="auto | fp32 | bf16 | fp16")
    s.add_argument("--distributed", help="ddp | fsdp (under torchrun)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training field (e.g. eval_every=100) or a model field (e.g. n_layer=6)",
    )
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("convert", help="import or export transformers checkpoints")
    s.add_argument("direction", choices=["hf-import", "hf-export"])
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--tokenizer", help="hf-import: tokenizer to record in the checkpoint")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RuntimeError) as e:
        if args.traceback:
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gptstack {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
