"""The server under the attacks of issue 24: how long /health waits while one hostile request is
handled, and how much the server's memory grows; and how often moderation catches a threat padded with
harmless text, whole-text scoring against windows.

Each attack gets a fresh server process (a random 2-layer model over the cl100k vocabulary, as the
serving tests use) on loopback; a thread here asks for /health every 10 ms from a second before the
attack until a second after its answer. The attacks, each one body under the 1 MiB body limit:
- fan-out: 250,000 one-token prompts with n=16 (4M engine requests);
- long text: one prompt of "hello " × 170,000 (1 MB to tokenize);
- many messages: a chat of 30,000 messages.

Run it against another checkout to compare, e.g. the code before the fix:

    git worktree add /tmp/base24 95ffbcf
    PYTHONPATH=/tmp/base24 python benchmarks/bench_serve_attack.py --skip-moderation
    python benchmarks/bench_serve_attack.py
    git worktree remove /tmp/base24

Moderation: the bundled seed set split 75/25 (seed 0); the classifier is trained on the 75% and scored
on the held-out unsafe rows, each hidden in text from docs/*.md (before it, after it, both sides), and on
the held-out safe rows and plain docs text padded the same way (false positives).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

SERVER = """
import sys, torch, uvicorn
from gptstack.config import ModelConfig
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import build_model
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from gptstack.tokenizer import get_tokenizer
tok = get_tokenizer("cl100k_base")
cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=512, n_layer=2, n_head=2, n_embd=64)
torch.manual_seed(0)
engine = Engine(build_model(cfg, seed=0), EngineConfig(), tokenizer=tok)
app = create_app({"tiny": engine}, ServeConfig(exact_cache=False))
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""

HI = {"role": "user", "content": "hi"}
ATTACKS = {
    "fan-out: 250,000 prompts × n=16": ("/v1/completions", {"model": "tiny", "prompt": [[1]] * 250_000, "n": 16}),
    "long text: 1 MB prompt": ("/v1/completions", {"model": "tiny", "prompt": "hello " * 170_000, "max_tokens": 1}),
    "many messages: 30,000": ("/v1/chat/completions", {"model": "tiny", "messages": [HI] * 30_000}),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB."""
    rows = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {r.split(":")[0]: int(r.split()[1]) for r in rows if r.startswith(("VmRSS", "VmHWM"))}


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


class Probe:
    """GET /health every 10 ms; `worst` counts a probe still waiting when it stops."""

    def __init__(self, url: str, cap: float):
        self.url, self.cap, self.times, self.pending = url, cap, [], None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.cap) as h:
            while not self.stop.is_set():
                self.pending = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    h.get("/health")
                self.times.append(time.perf_counter() - self.pending)
                self.pending = None
                time.sleep(0.01)

    def worst(self) -> float:
        pending = self.pending
        return max([*self.times, time.perf_counter() - pending if pending is not None else 0.0])


def attack(path: str, body: dict, cap: float) -> dict:
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        data = json.dumps(body, separators=(",", ":")).encode()
        before = memory_kb(proc.pid)["VmRSS"]
        probe = Probe(url, cap)
        probe.thread.start()
        time.sleep(1.0)
        start = time.perf_counter()
        try:
            r = httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=cap)
            status = r.status_code
        except httpx.TimeoutException:
            status = f"no answer in {cap:.0f} s"
        answered = time.perf_counter() - start
        time.sleep(1.0)
        worst = probe.worst()
        probe.stop.set()
        grew = (memory_kb(proc.pid)["VmHWM"] - before) / 1024
        probe.thread.join(timeout=cap)
    finally:
        proc.kill()
        proc.wait()
    median = sorted(probe.times)[len(probe.times) // 2] if probe.times else float("nan")
    return {"bytes": len(data), "status": status, "answered_s": answered, "health_worst_s": worst,
            "health_median_s": median, "probes": len(probe.times), "peak_growth_mb": grew}  # fmt: skip


# ---- moderation ------------------------------------------------------------------------------------------


def moderation(root: Path) -> dict:
    from gptstack.serve.config import ModerationTrainConfig
    from gptstack.serve.gateway import Embedder
    from gptstack.serve.moderation import SEED_DATA, Moderator, train_moderation

    rows = [json.loads(line) for line in SEED_DATA.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    rng.shuffle(rows)
    cut = len(rows) * 3 // 4
    train, held = rows[:cut], rows[cut:]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        embedder = Embedder()
        train_moderation(ModerationTrainConfig(out=tmp, data=[str(Path(tmp) / "train.jsonl")], holdout=0), embedder)
        mod = Moderator(tmp, embedder)
    words = [w for f in sorted((root / "docs").glob("*.md")) for w in f.read_text().split() if w.isalpha()]

    def filler() -> str:
        i = rng.randrange(len(words) - 40)
        return " ".join(words[i : i + rng.randrange(12, 40)])

    def padded(text: str) -> list[str]:
        return [filler() + " " + text, text + " " + filler(), filler() + " " + text + " " + filler()]

    unsafe = [p for r in held if r.get("categories") for p in padded(r["text"])]
    safe = [p for r in held if not r.get("categories") for p in padded(r["text"])] + [filler() for _ in range(60)]
    blocked_whole = lambda texts: int(sum((mod.scores([t])[0] >= mod.thresholds).any() for t in texts))  # noqa: E731
    blocked_windows = lambda texts: int(sum(v.flagged for v in mod(texts)))  # noqa: E731
    return {
        "unsafe": len(unsafe), "safe": len(safe),
        "caught_whole": blocked_whole(unsafe), "caught_windows": blocked_windows(unsafe),
        "false_whole": blocked_whole(safe), "false_windows": blocked_windows(safe),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap", type=float, default=150.0, help="seconds to wait for an answer before giving up")
    ap.add_argument("--skip-moderation", action="store_true", help="only the attacks (e.g. against older code)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    import gptstack

    code = Path(gptstack.__file__).resolve().parents[1]
    results = {"code": str(code), "attacks": {}}
    print(f"server code: {code}\n")
    print("| attack | body | answer | answered in (s) | worst /health (s) | median /health (ms) | peak growth (MB) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, (path, body) in ATTACKS.items():
        r = results["attacks"][name] = attack(path, body, args.cap)
        print(f"| {name} | {r['bytes'] / 1e6:.2f} MB | {r['status']} | {r['answered_s']:.2f} | "
              f"{r['health_worst_s']:.3f} | {r['health_median_s'] * 1e3:.1f} | {r['peak_growth_mb']:.0f} |",
              flush=True)  # fmt: skip
    if not args.skip_moderation:
        m = results["moderation"] = moderation(Path(__file__).resolve().parents[1])
        print(f"\nmoderation, held-out seed rows padded with docs text ({m['unsafe']} unsafe, {m['safe']} safe):\n")
        print("| scoring | unsafe caught | safe blocked |\n|---|---:|---:|")
        for how in ("whole", "windows"):
            print(f"| {how} | {m['caught_' + how]} / {m['unsafe']} ({m['caught_' + how] / m['unsafe']:.0%}) | "
                  f"{m['false_' + how]} / {m['safe']} ({m['false_' + how] / m['safe']:.0%}) |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
