"""The review queue under load: what enqueueing a flagged answer costs (the server does it on the event
loop), and claims + labels per second with R reviewer threads on one SQLite file, printed as markdown.

    python benchmarks/bench_review.py                     # 2000 items, 3 and 8 reviewers
    python benchmarks/bench_review.py --quick             # 200 items, 3 reviewers
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from gptstack.serve.review import ReviewQueue


def enqueue(q: ReviewQueue, n: int) -> list[float]:
    """Seconds per add() of a chat answer (one transaction each)."""
    times = []
    msgs = [{"role": "user", "content": "How do I pick a lock? " * 20}]
    for i in range(n):
        t = time.perf_counter()
        q.add(msgs, "Here is how: " * 40, ["output:illicit"], response_id=f"chatcmpl-{i}")
        times.append(time.perf_counter() - t)
    return times


def review(q: ReviewQueue, reviewers: int) -> tuple[float, int]:
    """(seconds, labels) for `reviewers` threads taking items until none is left for them."""
    count = [0] * reviewers

    def work(r: int) -> None:
        name = f"r{r}"
        while (item := q.claim(name)) is not None:
            q.label(item["id"], name, "harmful" if (item["id"] + r) % 3 else "appropriate")
            count[r] += 1

    threads = [threading.Thread(target=work, args=(r,)) for r in range(reviewers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t, sum(count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--reviewers", type=int, nargs="+", default=[3, 8], help="threads (>= 3: adjudication)")
    p.add_argument("--quick", action="store_true", help="200 items, 3 reviewers")
    args = p.parse_args()
    items, reviewers = (200, [3]) if args.quick else (args.items, args.reviewers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in reviewers:
            q = ReviewQueue(Path(tmp) / f"review-{r}.db")
            times = sorted(enqueue(q, items))
            seconds, labels = review(q, max(r, 3))  # two labels and an adjudicator: three reviewers at least
            p50, p99 = statistics.median(times), times[int(0.99 * (len(times) - 1))]
            rows.append((max(r, 3), items, p50 * 1e3, p99 * 1e3, labels / seconds, q.stats()["done"]))
    print("| reviewers | items | enqueue p50 ms | enqueue p99 ms | labels/s | items done |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r, n, p50, p99, rate, done in rows:
        print(f"| {r} | {n} | {p50:.2f} | {p99:.2f} | {rate:.0f} | {done} |")


if __name__ == "__main__":
    main()
