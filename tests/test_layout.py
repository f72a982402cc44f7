"""The package's arrows point down (DESIGN.md): importing a layer never loads a layer above it.

cli → speedrun | safety.run → serve | posttrain → safety → eval | train | rag → infer | data | interop.convert |
info → checkpoint → interop (formats) → transforms → model | tokenizer | report | options → config | template →
files (RANKS below).

Checked twice: statically over every `import` in the source (module level and inside functions, so a
cycle cannot hide in a function), and at run time by importing each module in a fresh set of
gptstack modules and looking at what got loaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import gptstack

ROOT = Path(gptstack.__file__).parent
# The layers, bottom to top. A module may import modules of a lower rank and its own subpackage; a
# module of the same rank in another subpackage, or of a higher rank, is an arrow that points up or sideways.
RANKS = {
    "gptstack.files": 0,
    "gptstack.config": 1, "gptstack.template": 1,
    "gptstack.model": 2, "gptstack.tokenizer": 2, "gptstack.report": 2, "gptstack.options": 2,
    "gptstack.transforms": 3, "gptstack.vision": 3,  # the vision tower is applied around a built model
    "gptstack.interop.convert": 6, "gptstack.interop": 4,  # formats (hf, gguf) below checkpoint; file commands above
    "gptstack.checkpoint": 5,
    "gptstack.info": 6, "gptstack.data": 6, "gptstack.infer": 6,
    "gptstack.train": 7, "gptstack.eval": 7, "gptstack.rag": 7,
    "gptstack.safety.run": 10, "gptstack.safety": 8,  # suites, wrappers, judges below; the eval runner on top
    "gptstack.posttrain": 9, "gptstack.serve": 9, "gptstack.interp": 9,  # interp ablates heads under eval
    "gptstack.speedrun": 10,
    "gptstack.cli": 11,
}  # fmt: skip
# the sweep trains runs and hands them to the fits and the capability scorer
ALLOWED = {("gptstack.train.sweep", "gptstack.eval.scaling"), ("gptstack.train.sweep", "gptstack.eval.capability")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    """The RANKS prefix `module` belongs to (None for the package root)."""
    return next((p for p in RANKS if module == p or module.startswith(f"{p}.")), None)


def imported(tree: ast.AST, module: str) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join([*module.split(".")[: -node.level], node.module])
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("gptstack")}


def violations(module: str, names: set[str]) -> list[str]:
    home = layer(module)
    if home is None:
        return []
    found = []
    for name in sorted(names):
        there = layer(name)
        allowed = any(module == a and (name == b or name.startswith(f"{b}.")) for a, b in ALLOWED)
        if there is None or there == home or allowed:
            continue
        if RANKS[there] >= RANKS[home]:
            found.append(f"{module} (rank {RANKS[home]}) imports {name} (rank {RANKS[there]})")
    return found


def test_no_module_imports_a_layer_above_it_even_inside_a_function():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        found += violations(module, imported(ast.parse(path.read_text()), module))
    assert not found, "\n".join(found)


RUNTIME = """
import importlib, json, sys
import gptstack  # the package root (config, model, the `load` shortcut) comes with every import
root = {m for m in sys.modules if m.startswith("gptstack.")}
out = {}
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "gptstack" or m.startswith("gptstack.")]:
        del sys.modules[m]
    importlib.import_module(name)
    out[name] = sorted(m for m in sys.modules if m.startswith("gptstack.") and m not in root)
print(json.dumps(out))
"""


def test_importing_each_layer_loads_nothing_above_it():
    targets = ["gptstack.config", "gptstack.model", "gptstack.report", "gptstack.transforms.quantize",
               "gptstack.checkpoint", "gptstack.infer.engine", "gptstack.infer.load", "gptstack.data.pipeline",
               "gptstack.train.loop", "gptstack.eval.run", "gptstack.posttrain.ppo"]  # fmt: skip
    run = subprocess.run([sys.executable, "-c", RUNTIME, *targets], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout)
    found = []
    for module, names in loaded.items():
        found += [v for v in violations(module, set(names)) if not any(a in v for _, a in ALLOWED)]
    assert not found, "\n".join(found)
    assert "gptstack.infer.engine" not in loaded["gptstack.checkpoint"]
