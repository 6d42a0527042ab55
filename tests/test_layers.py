"""The package's import direction: faces → workflows → labelstudio → core, never back.

Reads every module's imports with ``ast`` (function-local imports included: hiding an import inside
a function does not change which layer depends on which) and checks each against the table below.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # pure logic, no server: `make test-fast`

ROOT = Path(__file__).resolve().parents[1]

# layer -> the layers it may import (itself always allowed). `config` and `errors` are the base of all.
BASE = {"config", "errors"}
ALLOWED = {
    "config": set(),
    "errors": set(),
    "core": BASE,
    "labelstudio": BASE | {"core"},
    "workflows": BASE | {"core", "labelstudio"},
    "tasks": BASE | {"core", "labelstudio", "workflows"},            # Celery jobs: thin, call workflows
    "fo": BASE | {"core", "labelstudio", "workflows"},               # never Celery: the fold runner is injected
    "service": BASE | {"core", "labelstudio", "workflows", "tasks"},
    "dev": BASE | {"core", "labelstudio", "workflows", "tasks", "fo", "service"},
    "cli": BASE | {"core", "labelstudio", "workflows", "tasks", "fo", "service", "dev"},
    "plugin": BASE | {"core", "labelstudio", "workflows", "tasks", "fo"},
}


def layer_of_module(dotted: str) -> str | None:
    """'labelloop.core.scoring' -> 'core'; None for modules outside the package."""
    parts = dotted.split(".")
    if parts[0] != "labelloop":
        return None
    if len(parts) == 1:
        return "package"
    return parts[1]


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "tasks":
        return "tasks"
    if rel.parts[0] == "fiftyone_plugins":
        return "plugin"
    if len(rel.parts) == 2:  # backend/cli.py, backend/config.py, backend/errors.py
        return rel.stem
    return rel.parts[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno}: use absolute imports (labelloop.…)")
            if node.module == "labelloop":  # from labelloop import core -> the named subpackages
                found += [(node.lineno, f"labelloop.{alias.name}" if alias.name in ALLOWED else "labelloop")
                          for alias in node.names]
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def package_files() -> list[Path]:
    files = [*sorted((ROOT / "backend").rglob("*.py")), *sorted((ROOT / "tasks").rglob("*.py")),
             *sorted((ROOT / "fiftyone_plugins").rglob("*.py"))]
    return [f for f in files if f.name != "__init__.py" or f.parent.name == "labelloop"]


def test_every_layer_is_known():
    layers = {layer_of_file(f) for f in package_files()}
    assert layers <= set(ALLOWED), f"files outside a known layer: {sorted(layers - set(ALLOWED))}"


def test_imports_point_down():
    wrong = []
    for path in package_files():
        mine = layer_of_file(path)
        for lineno, module in imported_modules(path):
            theirs = layer_of_module(module)
            if theirs is None or theirs == mine or theirs == "package":
                continue
            if theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{lineno} ({mine}) imports {module} ({theirs})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The checker itself: a core module importing the service is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from labelloop.service.app import create_app\n")
    assert imported_modules(bad) == [(2, "labelloop.service.app")]
    assert layer_of_module("labelloop.service.app") not in ALLOWED["core"]
