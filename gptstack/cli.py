"""`gptstack <command>`: parses arguments and calls library functions; no logic lives here."""

from __future__ import annotations

import argparse
import sys
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


def cmd_generate(args: argparse.Namespace) -> None:
    from gptstack.checkpoint import load_model
    from gptstack.infer.generate import generate
    from gptstack.infer.layout import decode_layout
    from gptstack.infer.sampling import SamplingParams
    from gptstack.tokenizer import get_tokenizer

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = load_model(args.checkpoint, tokenizer=get_tokenizer(args.tokenizer) if args.tokenizer else None)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{args.checkpoint} names no tokenizer: pass --tokenizer cl100k_base|o200k_base|bytes|DIR")
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.n_vocab} tokens, the model only {model.config.vocab_size}")
    prompt = tok.encode(args.prompt)
    model = decode_layout(model)  # CPU GEMV-friendly weights (see infer/layout.py)
    stream = tok.stream_decoder()
    out = sys.stdout
    out.write(args.prompt)
    allowed = tok.decodable_mask(model.config.vocab_size)
    stops = frozenset({tok.eot_id})
    for token in generate(model, prompt, args.max_new_tokens, params, stop_tokens=stops, allowed=allowed):
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")


def cmd_convert(args: argparse.Namespace) -> None:
    from gptstack.interop import hf

    if args.direction == "hf-import":
        path = hf.hf_import(args.src, args.dst, tokenizer=args.tokenizer)
    else:
        path = hf.hf_export(args.src, args.dst)
    print(f"wrote {path}")


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

    s = sub.add_parser("generate", help="stream a completion of --prompt")
    s.add_argument("checkpoint", help="checkpoint folder, run folder, or …/latest")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--tokenizer", help="override the checkpoint's: cl100k_base | o200k_base | bytes | DIR")
    s.set_defaults(func=cmd_generate)

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
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
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
