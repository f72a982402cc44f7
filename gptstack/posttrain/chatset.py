"""The built-in chat set: questions about the Python standard library, each with a known answer, read
from the stdlib's own sources (the default pretraining corpus), so SFT has real data on every machine.

    rows = stdlib_chat_set()        # [{"messages": [user, assistant], "kind": ..., "answer": ...}, ...]
    write_chat_set("chat.jsonl")    # the same rows as SFT's JSONL

Each public top-level function with a docstring in a fixed list of modules (parsed with `ast`, never
imported) gives one conversation of each kind:

    summary     What does `json.dumps` do?           → the docstring's first sentence
    signature   What are the parameters of `json.dumps`?  → `dumps(obj, *, skipkeys=False, …)`
    import      How do I import `json.dumps`?       → from json import dumps
    module      Which module defines `dumps`?        → `json`   (names defined in one listed module only)

The kinds span what a small model can learn from SFT: `import` only rearranges words of the question,
`module` and `signature` recall what pretraining read, `summary` recalls prose. The rows are in a
fixed order and depend only on the running Python's sources.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from gptstack.data.sources import default_corpus

# Mostly pure-Python modules whose functions have one-line docstring summaries; those a Python
# version lacks are skipped.
MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "difflib", "filecmp", "fnmatch", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "html", "inspect", "json", "keyword", "linecache", "locale",
    "mimetypes", "operator", "os", "platform", "posixpath", "pprint", "quopri", "random", "secrets", "shlex",
    "shutil", "statistics", "string", "subprocess", "sysconfig", "tempfile", "textwrap", "timeit", "tokenize",
    "traceback", "types", "urllib.parse", "uuid", "warnings", "webbrowser", "email.utils", "dataclasses",
)  # fmt: skip
KINDS = ("summary", "signature", "import", "module")
MAX_SUMMARY_CHARS = 160
MAX_SIGNATURE_CHARS = 72


@dataclass(frozen=True)
class Fact:
    module: str  # dotted module name
    name: str  # function name
    signature: str  # `name(args)` as written in the source
    summary: str  # the docstring's first sentence


def module_path(stdlib: Path, module: str) -> Path | None:
    """The source file of a stdlib module (`a/b.py` or `a/b/__init__.py`), or None."""
    base = stdlib.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def first_sentence(doc: str) -> str | None:
    """The docstring's first paragraph up to its first full stop, on one line; None when it has no
    short sentence (too long, or not ending in a full stop)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?\.)(\s|$)", para)
    if not m or len(m.group(1)) > MAX_SUMMARY_CHARS or not m.group(1)[0].isalpha():
        return None
    return m.group(1)


def module_facts(module: str, source: str) -> list[Fact]:
    """A Fact per public top-level function of `source` with a short signature and docstring summary."""
    facts = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        summary = first_sentence(doc) if doc else None
        signature = f"{node.name}({ast.unparse(node.args)})"
        if summary and len(signature) <= MAX_SIGNATURE_CHARS:
            facts.append(Fact(module, node.name, signature, summary))
    return facts


def stdlib_facts(stdlib: Path | None = None, modules: tuple[str, ...] = MODULES) -> list[Fact]:
    """The facts of every listed module found under `stdlib` (default: the running Python's)."""
    stdlib = stdlib or default_corpus()
    facts = []
    for module in modules:
        path = module_path(stdlib, module)
        if path is not None:
            facts += module_facts(module, path.read_text(encoding="utf-8"))
    return facts


def conversations(facts: list[Fact]) -> list[dict]:
    """The rows of the chat set: per fact, one conversation of each kind (KINDS)."""
    defined_in: dict[str, set[str]] = {}
    for f in facts:
        defined_in.setdefault(f.name, set()).add(f.module)
    rows = []
    for f in facts:
        qualified = f"{f.module}.{f.name}"
        pairs = [
            ("summary", f"What does `{qualified}` do?", f.summary),
            ("signature", f"What are the parameters of `{qualified}`?", f"`{f.signature}`"),
            ("import", f"How do I import `{qualified}`?", f"from {f.module} import {f.name}"),
        ]
        if len(defined_in[f.name]) == 1:
            pairs.append(("module", f"Which module defines `{f.name}`?", f"`{f.module}`"))
        for kind, question, answer in pairs:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            rows.append({"messages": messages, "kind": kind, "answer": answer})
    return rows


def stdlib_chat_set(stdlib: Path | None = None) -> list[dict]:
    """The built-in chat set (see module docstring)."""
    return conversations(stdlib_facts(stdlib))


def write_chat_set(path: str | Path, stdlib: Path | None = None) -> Path:
    """The built-in chat set as JSONL (SFT's format; `kind` and `answer` are extra keys SFT ignores)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stdlib_chat_set(stdlib)))
    tmp.replace(path)
    return path
