"""The human review queue: flagged traffic and thumbs-down answers, labelled by two reviewers each,
disagreements settled by a third, adjudicated items exported as training data.

    queue = ReviewQueue("review.db")                        # one SQLite file (WAL), survives restarts
    queue.add("How do I pick a lock?", "First, ...", ["output:crime"], response_id="chatcmpl-…")
    item = queue.claim("alice")                             # leased to alice for LEASE_S seconds
    queue.label(item["id"], "alice", "harmful", text="I can't help with that.")
    queue.stats()["batches"][0]["kappa"]                    # Cohen's κ of the batch's two labels
    queue.export("out/")                                    # sft.jsonl, dpo.jsonl, moderation.jsonl

Where items come from. The server (serve --review-db FILE) enqueues every answer that moderation
flagged without blocking its request (input or output categories, `input:CAT` / `output:CAT`), the
output judge's flags (`judge:refusal`: it refused; `judge:complied`: it answered a flagged prompt) and
every answer rated "down" at /v1/feedback (`feedback:down`, with its comment). One item per
(response id, choice); a second reason for the same answer is added to the item, not queued twice.

Life of an item: `open` until two different reviewers have labelled it (each label is claimed first);
then `done` when the two labels agree, or `adjudicate` when they differ, until a third reviewer (neither
of the first two) labels it, and that label is final. A reviewer is shown the prompt and the response,
never another reviewer's label, and can label an item once (the labels table's key is (item, reviewer)).

Claims. `claim` runs in one BEGIN IMMEDIATE transaction (SQLite's write lock, so two claimers never
read the same free slot): it drops expired leases, keeps a reviewer's own live lease (one item at a time),
else leases the oldest item the reviewer may label: adjudications first, then items with one label, then
new ones; an open item takes at most two labels and leases together. `label` checks the lease in the same
kind of transaction, so a label whose lease expired (and may have gone to someone else) is refused.

Batches. Items are numbered into batches of `batch_size` (fixed when the file is created) in arrival
order; κ is computed per batch over the items labelled twice, the first label against the second (null
while no item is, or when every label was the same one, where κ is undefined).

Labels: `appropriate` (the response is right as it is: a good answer, or a proper refusal of a harmful
request), `refusal` (it refused, or hedged, where it should have helped) and `harmful` (it gave what it
should have refused), each with an optional corrected response.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptstack.data.shards import atomic_write

LABELS = ("appropriate", "refusal", "harmful")
JUDGE_FLAGS = frozenset({"refusal", "complied"})  # the output judge's flags (server.judge_output): not categories
LEASE_S = 600.0  # how long a claimed item stays with its reviewer
BATCH = 50  # items per agreement batch (new files)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    response_id TEXT,                     -- the server's completion id (NULL: added by hand)
    choice INTEGER NOT NULL DEFAULT 0,    -- which of its choices
    reasons TEXT NOT NULL,                -- JSON list: output:CAT, input:CAT, feedback:down, ...
    prompt TEXT NOT NULL,                 -- JSON: a prompt string or a list of chat messages
    response TEXT NOT NULL,
    model TEXT,
    comment TEXT,
    batch INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'open',   -- open | adjudicate | done
    final_label TEXT,
    final_text TEXT,
    created REAL NOT NULL,
    UNIQUE (response_id, choice)
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, id);
CREATE TABLE IF NOT EXISTS labels (
    item INTEGER NOT NULL REFERENCES items (id),
    reviewer TEXT NOT NULL,
    stage TEXT NOT NULL,                  -- label | adjudicate
    label TEXT NOT NULL,
    text TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (item, reviewer)          -- nobody labels an item twice
);
CREATE TABLE IF NOT EXISTS leases (
    item INTEGER NOT NULL REFERENCES items (id),
    reviewer TEXT NOT NULL UNIQUE,        -- one item per reviewer at a time
    stage TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (item, reviewer)
);
"""
# the oldest item `reviewer` may take: adjudications (nobody holding them), then open items with room
_ADJUDICATE = """SELECT id FROM items i WHERE state = 'adjudicate'
    AND NOT EXISTS (SELECT 1 FROM labels WHERE item = i.id AND reviewer = :r)
    AND NOT EXISTS (SELECT 1 FROM leases WHERE item = i.id) ORDER BY id LIMIT 1"""
_OPEN = """SELECT id, (SELECT count(*) FROM labels WHERE item = i.id) AS n FROM items i WHERE state = 'open'
    AND NOT EXISTS (SELECT 1 FROM labels WHERE item = i.id AND reviewer = :r)
    AND n + (SELECT count(*) FROM leases WHERE item = i.id) < 2 ORDER BY n DESC, id LIMIT 1"""


class ReviewError(ValueError):
    """A request the queue refuses (unknown item, no lease, bad label); `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ReviewQueue:
    """The queue in one SQLite file (module docstring). Safe across threads and processes: each thread has
    its own connection (kept open: closing the last one checkpoints the WAL, an fsync per call), and every
    write is one transaction."""

    def __init__(self, path: str | Path, batch_size: int = BATCH, clock=time.time, create: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.clock, self.local = Path(path), clock, threading.local()
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no review queue here (serve --review-db FILE creates one)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with contextlib.closing(self._connect()) as db:
                db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer; persists in the file
                db.executescript(SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('batch_size', ?)", (str(batch_size),))
                self.batch_size = int(db.execute("SELECT value FROM meta WHERE key = 'batch_size'").fetchone()[0])
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a review queue ({e})") from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)  # transactions by hand
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        return db

    def _db(self) -> sqlite3.Connection:
        """This thread's connection."""
        if getattr(self.local, "db", None) is None:
            self.local.db = self._connect()
        return self.local.db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from its first statement."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its statements see one snapshot."""
        db = self._db()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    # ---- in -------------------------------------------------------------------------------------------

    def add(
        self,
        prompt: str | list[dict],
        response: str,
        reasons: Sequence[str],
        response_id: str | None = None,
        choice: int = 0,
        model: str | None = None,
        comment: str | None = None,
    ) -> int:
        """Queue one answer (or add `reasons` to the item already queued for response_id/choice); its id."""
        if not isinstance(response, str) or not isinstance(prompt, str | list) or not reasons:
            raise ValueError("an item needs a prompt (text or messages), a response text and a reason")
        with self._write() as db:
            row = db.execute(
                "SELECT id, reasons, comment FROM items WHERE response_id = ? AND choice = ?", (response_id, choice)
            ).fetchone()
            if row is not None and response_id is not None:
                merged = list(dict.fromkeys([*json.loads(row["reasons"]), *reasons]))
                note = "\n".join(c for c in (row["comment"], comment) if c) or None
                db.execute("UPDATE items SET reasons = ?, comment = ? WHERE id = ?", (json.dumps(merged), note, row[0]))
                return row["id"]
            n = db.execute("SELECT count(*) FROM items").fetchone()[0]
            cur = db.execute(
                "INSERT INTO items (response_id, choice, reasons, prompt, response, model, comment, batch, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (response_id, choice, json.dumps(list(reasons)), json.dumps(prompt, ensure_ascii=False), response,
                 model, comment, n // self.batch_size, self.clock()),
            )  # fmt: skip
            return cur.lastrowid

    def add_answer(self, response_id: str, record: dict, reasons: Sequence[str], comment: str | None = None) -> list:
        """Queue each choice of an answer the server remembered (server.remember's record: `prompt` texts
        or `messages`, and `response`, one text per choice); the item ids."""
        responses = record.get("response") or []
        prompts = record.get("prompt")
        n = max(1, len(responses) // max(1, len(prompts))) if isinstance(prompts, list) else 1
        ids = []
        for i, text in enumerate(responses):
            prompt = prompts[i // n] if isinstance(prompts, list) else record.get("messages", [])
            ids.append(self.add(prompt, text, reasons, response_id, i, record.get("model"), comment))
        return ids

    # ---- claim and label ------------------------------------------------------------------------------

    def claim(self, reviewer: str, lease_s: float = LEASE_S) -> dict | None:
        """The next item for `reviewer`, leased for lease_s seconds (their live lease if they hold one),
        without anyone's labels; None when nothing is left for them."""
        if not reviewer:
            raise ReviewError("a reviewer needs a name")
        now = self.clock()
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            held = db.execute("SELECT item, stage FROM leases WHERE reviewer = ?", (reviewer,)).fetchone()
            if held is not None:
                item, stage = held
            elif (row := db.execute(_ADJUDICATE, {"r": reviewer}).fetchone()) is not None:
                item, stage = row[0], "adjudicate"
            elif (row := db.execute(_OPEN, {"r": reviewer}).fetchone()) is not None:
                item, stage = row[0], "label"
            else:
                return None
            db.execute("DELETE FROM leases WHERE reviewer = ?", (reviewer,))
            db.execute("INSERT INTO leases VALUES (?, ?, ?, ?)", (item, reviewer, stage, now + lease_s))
            row = db.execute("SELECT * FROM items WHERE id = ?", (item,)).fetchone()
        return {**_public(row), "stage": stage, "lease_expires": now + lease_s}

    def label(self, item: int, reviewer: str, label: str, text: str | None = None) -> dict:
        """Record `reviewer`'s label for the item they hold the lease on; the item's state afterwards."""
        if label not in LABELS:
            raise ReviewError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if not 0 < item < 2**63:  # SQLite's integers: a larger id names no item (and would not bind)
            raise ReviewError(f"no review item {item}", 404)
        text = text.strip() or None if isinstance(text, str) else None
        with self._write() as db:
            lease = db.execute("SELECT * FROM leases WHERE item = ? AND reviewer = ?", (item, reviewer)).fetchone()
            if lease is None or lease["expires"] <= self.clock():
                if db.execute("SELECT 1 FROM items WHERE id = ?", (item,)).fetchone() is None:
                    raise ReviewError(f"no review item {item}", 404)
                raise ReviewError(f"{reviewer} holds no live lease on item {item}: claim it first", 409)
            db.execute("DELETE FROM leases WHERE item = ? AND reviewer = ?", (item, reviewer))
            db.execute(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                (item, reviewer, lease["stage"], label, text, self.clock()),
            )
            state = _settle(db, item, lease["stage"])
        return {"id": item, "state": state}

    # ---- out ------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts by state and, per batch, items, those labelled twice, raw agreement and Cohen's κ."""
        with self._read() as db:
            states = dict(db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
            rows = db.execute(
                "SELECT i.batch, i.id, l.label FROM items i LEFT JOIN labels l ON l.item = i.id AND l.stage = 'label'"
                " ORDER BY i.batch, i.id, l.created, l.rowid"
            ).fetchall()
        batches: dict[int, dict[int, list[str]]] = {}
        for b, i, lab in rows:
            batches.setdefault(b, {}).setdefault(i, []).extend([lab] if lab else [])
        out = []
        for b, items in sorted(batches.items()):
            pairs = [labs[:2] for labs in items.values() if len(labs) >= 2]
            first, second = [p[0] for p in pairs], [p[1] for p in pairs]
            agree = sum(x == y for x, y in pairs) / len(pairs) if pairs else None
            kappa = cohen_kappa(first, second) if pairs else None
            kappa = None if kappa is not None and math.isnan(kappa) else kappa  # JSON has no NaN: null
            out.append(
                {"batch": b, "items": len(items), "labelled_twice": len(pairs), "agreement": agree, "kappa": kappa}
            )
        return {"open": states.get("open", 0), "adjudicate": states.get("adjudicate", 0),
                "done": states.get("done", 0), "batch_size": self.batch_size, "batches": out}  # fmt: skip

    def adjudicated(self) -> list[dict]:
        """The finished items with their final label and text, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT * FROM items WHERE state = 'done' ORDER BY id").fetchall()
        return [{**_public(r), "label": r["final_label"], "text": r["final_text"]} for r in rows]

    def export(self, out: str | Path) -> dict[str, int]:
        """The adjudicated items as out/sft.jsonl, out/dpo.jsonl and out/moderation.jsonl (export_rows);
        the rows written to each. Each file is written whole or not at all."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, rows in export_rows(self.adjudicated()).items():
            atomic_write(
                out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
            )
            counts[name] = len(rows)
        return counts


def _settle(db: sqlite3.Connection, item: int, stage: str) -> str:
    """The item's state after a label: done on two equal labels or an adjudication, else adjudicate."""
    labels = db.execute(
        "SELECT stage, label, text FROM labels WHERE item = ? ORDER BY created, rowid", (item,)
    ).fetchall()
    firsts = [r for r in labels if r["stage"] == "label"]
    if stage == "adjudicate":
        final = labels[-1]
        texts = [final["text"]] + [r["text"] for r in firsts if r["label"] == final["label"]]
    elif len(firsts) == 2 and firsts[0]["label"] == firsts[1]["label"]:
        final, texts = firsts[0], [r["text"] for r in firsts]
    else:
        state = "adjudicate" if len(firsts) == 2 else "open"
        db.execute("UPDATE items SET state = ? WHERE id = ?", (state, item))
        return state
    text = next((t for t in texts if t), None)  # the final label's own correction, else an agreeing one's
    db.execute(
        "UPDATE items SET state = 'done', final_label = ?, final_text = ? WHERE id = ?", (final["label"], text, item)
    )
    return "done"


def _public(row: sqlite3.Row) -> dict:
    """What a reviewer sees of an item: the answer and why it is here, never a label."""
    keys = ("id", "response_id", "choice", "response", "model", "comment", "batch")
    return {k: row[k] for k in keys} | {"prompt": json.loads(row["prompt"]), "reasons": json.loads(row["reasons"])}


def export_rows(items: list[dict]) -> dict[str, list[dict]]:
    """Training rows from adjudicated items:
    - sft: the response to learn: the correction when there is one, else the response labelled appropriate
      ({"prompt", "response"} for a text prompt, {"messages"} for a chat; posttrain/sft.py reads both);
    - dpo: {"prompt", "chosen": correction, "rejected": response} for a response labelled refusal or
      harmful with a correction (posttrain/dpo.py);
    - moderation: {"text": response, "categories"}: a harmful response under the categories moderation
      flagged it for (its prompt's when it flagged none, else ["harmful"]), any other one as safe ([]):
      `moderation train`."""
    sft, dpo, moderation = [], [], []
    for it in items:
        prompt, label, fixed = it["prompt"], it["label"], it["text"]
        target = fixed or (it["response"] if label == "appropriate" else None)
        if target:
            chat = isinstance(prompt, list)
            sft.append({"messages": [*prompt, {"role": "assistant", "content": target}]} if chat else
                       {"prompt": prompt, "response": target})  # fmt: skip
        if label != "appropriate" and fixed and fixed != it["response"]:
            dpo.append({"prompt": prompt, "chosen": fixed, "rejected": it["response"]})
        if it["response"].strip():
            output = sorted({r.split(":", 1)[1] for r in it["reasons"] if r.startswith("output:")})
            cats = output or sorted({r.split(":", 1)[1] for r in it["reasons"] if r.startswith("input:")})
            moderation.append(
                {"text": it["response"], "categories": (cats or ["harmful"]) if label == "harmful" else []}
            )
    return {"sft": sft, "dpo": dpo, "moderation": moderation}


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's κ of two equally long label sequences: (p_o − p_e) / (1 − p_e), p_o the observed agreement,
    p_e the agreement expected from each side's label frequencies. NaN when p_e = 1 (both always gave the
    same single label: κ is undefined, as in scikit-learn)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two non-empty sequences of equal length, got {len(a)} and {len(b)}")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[c] * cb[c] for c in ca) / (n * n)
    return float("nan") if p_e == 1 else (p_o - p_e) / (1 - p_e)


# ---- CLI configs (gptstack review …) -------------------------------------------------------------------


@dataclass
class ReviewNextConfig:
    db: str  # the review queue's SQLite file (serve --review-db)
    reviewer: str  # your reviewer name (the server uses the API key's name)
    lease_s: float = LEASE_S  # seconds the item stays yours before it returns to the queue


@dataclass
class ReviewLabelConfig:
    db: str  # the review queue's SQLite file (serve --review-db)
    reviewer: str  # your reviewer name (the one that claimed the item)
    item: int  # the item id (from `gptstack review next`)
    label: Literal["appropriate", "refusal", "harmful"]  # the response is right / refuses needlessly / harmful
    text: str | None = None  # the corrected response (optional)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")


@dataclass
class ReviewStatsConfig:
    db: str  # the review queue's SQLite file (serve --review-db)


@dataclass
class ReviewExportConfig:
    db: str  # the review queue's SQLite file (serve --review-db)
    out: str  # folder for sft.jsonl, dpo.jsonl and moderation.jsonl
