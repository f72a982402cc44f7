"""Peak memory under issue 24's two bombs, for this tree and for a baseline tree, each in a fresh child.

- config bomb: a ~700-byte config.json (RoPE, context 25,000,000, head_dim 32) and no weights, loaded
  with `checkpoint.load_model`; the issue measured 11.3 GB allocated before the refusal.
- gzip bomb: a 2 MB `.txt.gz` that inflates to 2 GB of zeros, run through `data prepare` (with the
  default 8 MB document limit); the issue measured a 4.5 GB peak.
- floor: a child that imports the same modules and does nothing, the RSS every child starts from.

Each measurement is one child process (PYTHONPATH = the tree) whose peak RSS comes from `os.wait4`
(the kernel's ru_maxrss of that child alone). This driver imports nothing heavy, so what a child
inherits at fork is small. Medians over --repeats.

    nice python benchmarks/bench_bombs.py --baseline /tmp/base24g   # a worktree of the code before
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {  # every ModelConfig field of 95ffbcf, as a checkpoint's config.json nests them: 700 bytes
    "vocab_size": 50257, "block_size": 25_000_000, "n_layer": 4, "n_head": 4, "n_embd": 128, "n_kv_head": 4,
    "head_dim": 32, "d_ff": 344, "mlp": "swiglu", "norm": "rmsnorm", "norm_eps": 1e-05, "prenorm": True,
    "pos": "rope", "rope_theta": 10000.0, "rope_scaling": 1.0, "bias": False, "tie_embeddings": False,
    "attn_pattern": "dense", "attn_window": 256, "n_expert": 0, "n_expert_active": 2, "moe_aux_loss_coef": 0.01,
    "moe_z_loss_coef": 0.0, "dropout": 0.0,
}  # fmt: skip
CHILD = {  # each prints the file it imported first, so a run shows which tree it measured
    "floor": "import gptstack.checkpoint, gptstack.data.pipeline\nprint(gptstack.checkpoint.__file__)",
    "config": """
import sys
from gptstack.checkpoint import load_model
try:
    load_model(sys.argv[1])
except ValueError as e:
    print(str(e)[:300])
""",
    "gzip": """
import sys
from gptstack.data.pipeline import LocalExecutor, PrepareConfig, prepare
try:
    prepare(PrepareConfig(out=sys.argv[2], inputs=[sys.argv[1]], tokenizer="bytes"), LocalExecutor(1), False)
except ValueError as e:
    print(str(e)[:300])
""",
}


def make_bombs(folder: Path, gzip_mb: int) -> dict[str, Path]:
    ck = folder / "config-bomb"
    ck.mkdir()
    meta = {"format": "gptstack-checkpoint", "version": 1, "model": CONFIG, "tokenizer": "bytes", "files": {}}
    (ck / "config.json").write_text(json.dumps(meta, indent=2))  # as save_checkpoint writes it
    (folder / "gz").mkdir()
    with gzip.open(folder / "gz" / "bomb.txt.gz", "wb", compresslevel=9) as f:
        zeros = bytes(1 << 20)
        for _ in range(gzip_mb):
            f.write(zeros)
    return {"config": ck, "gzip": folder / "gz"}


def peak_of_child(tree: Path, code: str, args: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GiB, wall seconds, the child's last output line) of one child run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=tree,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip (cwd: `-c` puts it first on sys.path)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = out.strip().splitlines() or [f"exit {proc.returncode}"]
    return usage.ru_maxrss / 2**20, time.time() - t0, lines[-1]  # ru_maxrss is in KB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="a tree of the code before (git worktree add DIR 95ffbcf)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gzip-mb", type=int, default=2048, help="inflated size of the gzip bomb")
    args = ap.parse_args()
    trees = {"after": ROOT, **({"before": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        bombs = make_bombs(Path(tmp), args.gzip_mb)
        sizes = {"config": (bombs["config"] / "config.json").stat().st_size,
                 "gzip": (bombs["gzip"] / "bomb.txt.gz").stat().st_size}  # fmt: skip
        print(f"config.json {sizes['config']} bytes; bomb.txt.gz {sizes['gzip'] / 1e6:.2f} MB → {args.gzip_mb} MiB")
        rows = []
        for bomb in ("floor", "config", "gzip"):
            for name, tree in trees.items():
                runs = []
                for i in range(args.repeats):
                    extra = [str(bombs["gzip"]), str(Path(tmp) / f"out-{name}-{i}")] if bomb == "gzip" else []
                    runs.append(peak_of_child(tree, CHILD[bomb], [str(bombs["config"])] if bomb == "config" else extra))
                gb, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                rows.append((bomb, name, gb, wall, runs[-1][2]))
                print(f"| {bomb} | {name} | {gb:.3f} GiB | {wall:.1f} s | {runs[-1][2][:140]} |", flush=True)
    print(json.dumps([dict(zip(("bomb", "tree", "peak_gib", "wall_s", "message"), r, strict=True)) for r in rows]))


if __name__ == "__main__":
    main()
