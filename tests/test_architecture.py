"""The package's imports follow docs/architecture.md, and importing a module changes nothing."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.runs import REPO

PACKAGE = REPO / "lora_dist"
DOC = REPO / "docs" / "architecture.md"
# Named in the table, being written in other branches right now; delete a name here once its
# module has landed.
IN_PROGRESS: set[str] = set()


def layer_table() -> tuple[dict[str, str], dict[str, set[str]]]:
    """({module or package name: layer}, {layer: layers it may import}) from the doc's table."""
    owner: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\|\s*\d\.", line)]
    assert rows, "docs/architecture.md has no layer table"
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        layer = cells[0].split(".", 1)[1].strip()
        for name in re.findall(r"`([\w/]+)`", cells[1]):
            owner[name.rstrip("/")] = layer
        allowed[layer] = {w.strip() for w in cells[3].split(",")} | {layer}
    for layer, targets in allowed.items():
        assert targets <= set(allowed), (
            f"{layer} may import unknown layers {targets - set(allowed)}"
        )
    return owner, allowed


def modules() -> dict[str, Path]:
    """lora_dist's modules by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str, owner: dict[str, str]) -> str:
    """The layer of `lora_dist.x.y`: the table's entry for `x` (the package itself is core)."""
    parts = module.split(".")
    return owner["errors"] if len(parts) == 1 else owner[parts[1]]


def imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported lora_dist module, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    found = []
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                package = package[: len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "lora_dist" or name.startswith("lora_dist."):
                found.append((node.lineno, name, id(node) in inside))
    return found


def test_the_table_names_every_module_and_only_real_ones() -> None:
    owner, _ = layer_table()
    present = {m.split(".")[1] for m in modules() if m != "lora_dist"}
    assert present - set(owner) == set(), "modules the table does not name"
    missing = set(owner) - present - IN_PROGRESS
    assert missing == set(), "names in the table with no module"


def test_imports_point_down_the_layers() -> None:
    owner, allowed = layer_table()
    known = modules()
    wrong = []
    for module, path in known.items():
        source_layer = layer_of(module, owner)
        for line, name, _ in imports(path, module):
            target = name
            while target not in known:  # `from lora_dist.x import name`: the module is x
                target = target.rsplit(".", 1)[0]
            target_layer = layer_of(target, owner)
            if target_layer not in allowed[source_layer]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({source_layer}) imports "
                             f"{target} ({target_layer})")  # fmt: skip
    assert wrong == []


def test_no_lora_dist_import_hides_in_a_function() -> None:
    hidden = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for module, path in modules().items()
        for line, name, in_function in imports(path, module)
        if in_function
    ]
    assert hidden == []


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Statements that run on import: the module body outside functions and classes."""
    todo, out = list(tree.body), []
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def test_no_environment_or_warning_changes_at_import_time() -> None:
    changes = []
    for path in modules().values():
        for node in _module_level(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign)) else ""
            if re.match(
                r"(os\.environ(\.\w+)?\(|os\.putenv|warnings\.(filterwarnings|simplefilter))", text
            ):
                changes.append(f"{path.relative_to(REPO)}:{node.lineno} {text}")
            if isinstance(node, ast.Assign) and "os.environ[" in text:
                changes.append(f"{path.relative_to(REPO)}:{node.lineno} {text}")
    assert changes == []


IMPORT_ALL = """
import importlib, json, os, sys, sysconfig, traceback, warnings

calls = []  # (what, the file that asked) for every warning filter and environment change
STDLIB = sysconfig.get_paths()["stdlib"]

def asker():
    # the innermost caller that is not the standard library (os.environ.setdefault is)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith((STDLIB, "<")):
            return frame.filename
    return "?"

def recorded(what, original):
    def wrapper(*args, **kwargs):
        calls.append((what, asker()))
        return original(*args, **kwargs)
    return wrapper

warnings.filterwarnings = recorded("warnings.filterwarnings", warnings.filterwarnings)
warnings.simplefilter = recorded("warnings.simplefilter", warnings.simplefilter)
class Environ(type(os.environ)):
    __setitem__ = recorded("os.environ[]=", type(os.environ).__setitem__)
    __delitem__ = recorded("del os.environ[]", type(os.environ).__delitem__)
os.environ.__class__ = Environ
os.putenv = recorded("os.putenv", os.putenv)
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
print(json.dumps([c for c in calls if "/lora_dist/" in c[1]]))
"""


def test_importing_every_module_leaves_environ_and_warnings_alone() -> None:
    """The same, observed: import every module in a fresh process, recording who asks for a
    warning filter or an environment change (the libraries we import may; we may not)."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(sorted(modules()))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
