"""The package's arrows point down (DESIGN.md): importing a layer never loads a layer above it.

cli → speedrun → serve | posttrain | eval | train → infer | data → checkpoint → transforms → model → config.
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
# module prefix → the gptstack prefixes it must never import (directly, inside a function, or through others)
ABOVE = {
    "gptstack.config": ["gptstack.model", "gptstack.checkpoint", "gptstack.transforms", "gptstack.infer"],
    "gptstack.model": ["gptstack.checkpoint", "gptstack.transforms", "gptstack.infer", "gptstack.tokenizer"],
    "gptstack.report": ["gptstack.checkpoint", "gptstack.infer", "gptstack.train", "gptstack.eval"],
    "gptstack.transforms": ["gptstack.checkpoint", "gptstack.infer", "gptstack.posttrain", "gptstack.train"],
    "gptstack.checkpoint": ["gptstack.infer", "gptstack.data", "gptstack.train", "gptstack.eval", "gptstack.serve"],
    "gptstack.infer": ["gptstack.serve", "gptstack.posttrain", "gptstack.eval", "gptstack.train", "gptstack.data"],
    "gptstack.data": ["gptstack.infer", "gptstack.serve", "gptstack.posttrain", "gptstack.eval", "gptstack.train"],
    "gptstack.train": ["gptstack.serve", "gptstack.posttrain", "gptstack.cli", "gptstack.speedrun"],
    "gptstack.eval": ["gptstack.serve", "gptstack.posttrain", "gptstack.train", "gptstack.cli", "gptstack.speedrun"],
    "gptstack.posttrain": ["gptstack.serve", "gptstack.cli", "gptstack.speedrun"],
    "gptstack.serve": ["gptstack.posttrain", "gptstack.train", "gptstack.eval", "gptstack.cli", "gptstack.speedrun"],
    "gptstack.speedrun": ["gptstack.cli", "gptstack.serve"],
}
ALLOWED = {("gptstack.train.sweep", "gptstack.eval.scaling")}  # the sweep trains runs and hands them to the fits


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rules_for(module: str) -> list[str]:
    return [
        bad for prefix, bads in ABOVE.items() if module == prefix or module.startswith(prefix + ".") for bad in bads
    ]


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
    return [
        f"{module} imports {name}"
        for name in sorted(names)
        for bad in rules_for(module)
        if (name == bad or name.startswith(bad + ".")) and (module, name) not in ALLOWED
    ]


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
