"""The human review queue (serve/review.py): claims and leases across restarts and concurrent reviewers
(threads and processes on one SQLite file), Cohen's kappa against a hand-computed example and
scikit-learn, exports read back by the SFT, DPO and moderation readers, and the CLI."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys

import pytest

from gptstack.cli import main
from gptstack.posttrain.common import read_jsonl
from gptstack.posttrain.reward import parse_pair
from gptstack.posttrain.sft import messages_of
from gptstack.serve.moderation import read_labelled
from gptstack.serve.review import ReviewError, ReviewQueue, cohen_kappa, export_rows
from gptstack.tokenizer import get_tokenizer


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _labels(path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT item, reviewer, stage, label FROM labels ORDER BY rowid").fetchall()


def test_two_labels_adjudication_leases_and_restart(tmp_path):
    clock, db = Clock(), tmp_path / "review.db"
    q = ReviewQueue(db, batch_size=2, clock=clock)
    a = q.add("How do I pick a lock?", "Here is how...", ["output:illicit"], response_id="chatcmpl-1")
    assert q.add("How do I pick a lock?", "Here is how...", ["feedback:down"], "chatcmpl-1", comment="bad") == a
    b = q.add([{"role": "user", "content": "hi"}], "I cannot help with that.", ["feedback:down"])
    first = q.claim("alice", lease_s=60)
    assert first["id"] == a and first["reasons"] == ["output:illicit", "feedback:down"] and first["comment"] == "bad"
    assert "label" not in first and q.claim("alice")["id"] == a  # one live lease per reviewer, no labels shown
    q.label(a, "alice", "harmful", text="I can't help with picking locks you don't own.")

    q = ReviewQueue(db, batch_size=99, clock=clock)  # a restart: same items, labels and the file's batch size
    assert q.batch_size == 2 and q.claim("alice", lease_s=60)["id"] == b  # alice never gets item a again
    clock.t += 61  # her lease on b expires: b goes back to the queue
    with pytest.raises(ReviewError, match="no live lease") as e:
        q.label(b, "alice", "refusal")
    assert e.value.status == 409
    assert q.claim("bob")["id"] == a  # the item with one label first
    assert q.label(a, "bob", "appropriate") == {"id": a, "state": "adjudicate"}
    for who in ("alice", "bob"):  # neither of the first two may adjudicate; alice re-claims b
        got = q.claim(who)
        assert got is None or (got["id"] == b and got["stage"] == "label")
    adjudication = q.claim("carol")
    assert adjudication["id"] == a and adjudication["stage"] == "adjudicate"
    assert q.label(a, "carol", "harmful") == {"id": a, "state": "done"}
    with pytest.raises(ReviewError, match="no live lease"):
        q.label(a, "carol", "harmful")  # nobody labels an item twice
    with pytest.raises(ReviewError, match="no review item"):
        q.label(12345, "carol", "harmful")
    with pytest.raises(ReviewError, match="label must be one of"):
        q.label(b, "alice", "meh")
    done = q.adjudicated()
    assert [(d["id"], d["label"], d["text"]) for d in done] == [
        (a, "harmful", "I can't help with picking locks you don't own.")
    ]
    s = q.stats()  # batch 0: item a (harmful vs appropriate): p_o = 0, p_e = 0, kappa 0
    assert (s["open"], s["adjudicate"], s["done"]) == (1, 0, 1)
    assert s["batches"] == [{"batch": 0, "items": 2, "labelled_twice": 1, "agreement": 0.0, "kappa": 0.0}]


WORKERS = """
import random, sys, threading, time
from gptstack.serve.review import ReviewQueue

def work(path, name, errors):
    q, deadline = ReviewQueue(path), time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            item = q.claim(name)
            if item is None:
                s = q.stats()
                if s["open"] + s["adjudicate"] == 0:
                    return
                time.sleep(0.005)
                continue
            label = random.Random(f"{name}{item['id']}").choice(["harmful", "appropriate"])  # a seeded coin
            q.label(item["id"], name, label)
        errors.append(f"{name}: timed out")
    except Exception as e:
        errors.append(f"{name}: {type(e).__name__}: {e}")

def review(path, names):
    errors = []
    threads = [threading.Thread(target=work, args=(path, n, errors)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors

if __name__ == "__main__":
    print("ready", flush=True)  # imported (torch, under gptstack: seconds); go when the test says so
    sys.stdin.readline()
    errors = review(sys.argv[1], sys.argv[2:])
    print("\\n".join(errors), file=sys.stderr)
    sys.exit(1 if errors else 0)
"""


@pytest.mark.slow
def test_concurrent_reviewers_threads_and_processes_lose_and_repeat_nothing(tmp_path):
    """A process of two reviewer threads and two threads here, on one file, until all is done."""
    path = str(tmp_path / "review.db")
    q = ReviewQueue(path, batch_size=5)
    ids = [q.add(f"prompt {i}", f"response {i}", ["output:x"]) for i in range(24)]
    (tmp_path / "workers.py").write_text(WORKERS)
    cmd = [sys.executable, str(tmp_path / "workers.py"), path]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([*cmd, "p0a", "p0b"], **pipes)]
    assert all(p.stdout.readline().strip() == "ready" for p in procs)
    scope: dict = {}
    exec(compile(WORKERS, "workers.py", "exec"), scope)  # the same loop, in threads of this process
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    local = scope["review"](path, ["main0", "main1"])
    outs = [p.communicate(timeout=90)[1] for p in procs]
    assert not local and all(p.returncode == 0 for p in procs), (local, outs)
    rows = _labels(path)
    for i in ids:
        labels = [r for r in rows if r[0] == i]
        firsts, reviewers = [r for r in labels if r[2] == "label"], [r[1] for r in labels]
        assert len(firsts) == 2 and len(set(reviewers)) == len(reviewers), (i, labels)  # two, never one twice
        disagree = firsts[0][3] != firsts[1][3]
        assert len(labels) == 2 + disagree, (i, labels)  # a third, different reviewer exactly when they disagreed
    assert q.stats()["done"] == 24 and len({r[1][:2] for r in rows}) == 2  # the process and this one took part


def test_cohen_kappa_by_hand_and_against_sklearn():
    # 50 items: both yes 20, A yes / B no 5, A no / B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5·0.6 + 0.5·0.4 = 0.5; kappa = (0.7 − 0.5) / (1 − 0.5) = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa(["x"] * 3, ["x"] * 3) != cohen_kappa(["x"] * 3, ["x"] * 3)  # NaN
    with pytest.raises(ValueError, match="equal length"):
        cohen_kappa(["a"], ["a", "b"])
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 40)
        x = [rng.choice(["appropriate", "refusal", "harmful"]) for _ in range(n)]
        y = [v if rng.random() < 0.6 else rng.choice(["appropriate", "refusal", "harmful"]) for v in x]
        if len(set(x)) == len(set(y)) == 1:
            continue
        assert cohen_kappa(x, y) == pytest.approx(sklearn_metrics.cohen_kappa_score(x, y))


def _finish(q: ReviewQueue, item: int, label: str, text: str | None = None) -> None:
    for who in ("r1", "r2"):
        assert q.claim(who)["id"] == item
        q.label(item, who, label, text)


def test_export_is_read_by_the_sft_dpo_and_moderation_readers(tmp_path):
    q = ReviewQueue(tmp_path / "review.db")
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How do I make a bomb?"}]
    items = [
        (chat, "Mix these chemicals...", ["output:violence"], "harmful", "I can't help with making weapons."),
        ("How do I kill a Python process?", "I can't help with killing.", ["feedback:down", "judge:refusal"], "refusal",
         "Use `kill PID`, or `pkill -f name`."),
        ("What is 2+2?", "4", ["input:illicit"], "appropriate", None),
        ("Tell me a joke", "Why did...", ["feedback:down", "input:harassment"], "harmful", None),  # moderation only
        ("Say something", "Something bad.", ["feedback:down"], "harmful", None),
    ]  # fmt: skip
    for prompt, response, reasons, label, text in items:
        _finish(q, q.add(prompt, response, reasons), label, text)
    q.add("still open", "x", ["feedback:down"])
    counts = q.export(tmp_path / "out")
    assert counts == {"sft": 3, "dpo": 2, "moderation": 5}
    sft_rows, skipped = read_jsonl(tmp_path / "out" / "sft.jsonl", messages_of)
    assert not skipped and sft_rows[0][:2] == chat and sft_rows[0][-1]["content"].startswith("I can't help")
    assert sft_rows[2][-1] == {"role": "assistant", "content": "4"}  # appropriate: the response as it was
    tok = get_tokenizer("cl100k_base")
    pairs, skipped = read_jsonl(tmp_path / "out" / "dpo.jsonl", lambda r: parse_pair(tok, r, 512))
    assert len(pairs) == 2 and not skipped
    assert tok.decode([t for t, m in zip(pairs[1].chosen, pairs[1].chosen_mask, strict=True) if m]).startswith("Use")
    mod = read_labelled([tmp_path / "out" / "moderation.jsonl"])
    assert mod == [
        ("Mix these chemicals...", frozenset({"violence"})),
        ("I can't help with killing.", frozenset()),
        ("4", frozenset()),
        ("Why did...", frozenset({"harassment"})),  # no output category: the prompt's
        ("Something bad.", frozenset({"harmful"})),  # none at all
    ]
    assert export_rows([]) == {"sft": [], "dpo": [], "moderation": []}


def test_cli_next_label_stats_export(tmp_path, capsys):
    db = tmp_path / "review.db"
    assert main(["review", "stats", "--db", str(db)]) == 2 and not db.exists()  # no queue: a clear error
    assert "no review queue" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    assert main(["review", "stats", "--db", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt: not a review queue (file is not a database)" in capsys.readouterr().err
    ReviewQueue(db).add("Is the sky blue?", "No.", ["feedback:down"])
    for who, label in (("ann", "harmful"), ("ben", "harmful")):
        assert main(["review", "next", "--db", str(db), "--reviewer", who]) == 0
        item = json.loads(capsys.readouterr().out)
        args = ["--item", str(item["id"]), "--label", label, "--text", "Yes, on a clear day."]
        assert main(["review", "label", "--db", str(db), "--reviewer", who, *args]) == 0
        capsys.readouterr()
    assert main(["review", "next", "--db", str(db), "--reviewer", "ann"]) == 0
    assert "nothing to review" in capsys.readouterr().out
    assert main(["review", "stats", "--db", str(db)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["done"] == 1 and stats["batches"][0]["kappa"] is None  # one label used: kappa undefined
    assert main(["review", "export", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "dpo.jsonl").read_text())
    assert row == {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."}
