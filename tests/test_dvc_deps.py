"""The import graph of ``facemarks``, read from the code with ``ast`` (nothing is imported, no subprocess).

- Every stage of ``dvc.yaml`` lists, as deps, its stage script and every ``facemarks`` module the script imports
  transitively through module-level imports (the ``train`` foreach: its ``do`` template), so an edit of any module a
  stage runs makes that stage stale; the test names each missing file.
- No import cycle among ``facemarks`` modules, and no ``facemarks`` import inside a function: the module-level
  imports *are* the dependency graph (the optional extras dlib and onnxruntime, which are not ``facemarks``
  modules, are imported on first use behind :mod:`facemarks.core.extras`).

A package ``__init__.py`` runs on every import of its package; one that holds only a docstring decides nothing and
is not demanded as a dep.
"""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "facemarks"


def module_file(name: str) -> Path | None:
    """The file of module ``name`` (``facemarks.x`` → ``src/facemarks/x.py`` or ``src/facemarks/x/__init__.py``)."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    """``src/facemarks/x.py`` → ``facemarks.x``; ``src/facemarks/__init__.py`` → ``facemarks``."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _packages_of(name: str) -> list[str]:
    """Every package whose ``__init__`` runs when ``name`` is imported: ``facemarks.a.b`` → facemarks, facemarks.a."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(node: ast.AST, importer: str, is_package: bool, in_function: bool, out: list) -> None:
    """Collect ``(module name, line, in_function)`` for every ``facemarks`` import below ``node``."""
    for child in ast.iter_child_nodes(node):
        inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(child, ast.Import):
            out += [(a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: resolved against the importer's package
                anchor = importer.split(".") if is_package else importer.split(".")[:-1]
                anchor = anchor[:len(anchor) - (child.level - 1)]
                base = ".".join(anchor + ([child.module] if child.module else []))
            else:
                base = child.module or ""
            if base.split(".")[0] != PACKAGE:
                continue
            out.append((base, child.lineno, in_function))
            for alias in child.names:  # `from facemarks import x`: x may be a module
                if module_file(f"{base}.{alias.name}") is not None:
                    out.append((f"{base}.{alias.name}", child.lineno, in_function))
        else:
            _imports(child, importer, is_package, inside, out)


@functools.lru_cache(maxsize=None)
def imports_of(path: Path) -> tuple[tuple[str, int, bool], ...]:
    """Every ``facemarks`` import of the file at ``path``: ``(module, line, inside a function)``."""
    name = module_name(path) if SRC in path.parents else "__main__"
    out: list = []
    _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", False, out)
    return tuple(out)


def module_level_deps(path: Path, with_packages: bool = True) -> set[str]:
    """The ``facemarks`` modules a module-level import of ``path`` names (``with_packages``: and the packages whose
    ``__init__`` runs on the way)."""
    found = set()
    for name, _, in_function in imports_of(path):
        if not in_function:
            found.update([name, *(_packages_of(name) if with_packages else [])])
    return found


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def transitive_files(script: Path) -> set[Path]:
    """Every file of a ``facemarks`` module ``script`` imports transitively through module-level imports."""
    seen: set[str] = set()
    todo = list(module_level_deps(script))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        assert path is not None, f"{script}: imports {name}, which has no file under src/"
        todo += module_level_deps(path) - seen
    files = {module_file(n) for n in seen}
    return {f for f in files if not (f.name == "__init__.py" and _only_docstring(f))}


def library_modules() -> list[Path]:
    return sorted((SRC / PACKAGE).rglob("*.py"))


def dvc_stages() -> dict[str, dict]:
    """Each stage of ``dvc.yaml`` by name (a foreach stage: its ``do`` template)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (spec["do"] if "foreach" in spec else spec) for name, spec in stages.items()}


def stage_script(spec: dict) -> Path:
    match = re.search(r"\bpython3?\s+(\S+\.py)", spec["cmd"])
    assert match, f"no `python <script>.py` in cmd {spec['cmd']!r}"
    return ROOT / match.group(1)


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_dvc_yaml_lists_every_module_the_stage_script_imports(stage):
    spec = dvc_stages()[stage]
    script = stage_script(spec)
    listed = {str(d) for d in spec.get("deps", [])}
    needed = {script, *transitive_files(script)}
    missing = sorted(str(p.relative_to(ROOT)) for p in needed if str(p.relative_to(ROOT)) not in listed)
    assert not missing, f"dvc.yaml stage {stage!r} misses deps its script imports (transitively): {missing}"
    absent = sorted(d for d in listed if d.startswith(("src/", "stages/")) and not (ROOT / d).exists())
    assert not absent, f"dvc.yaml stage {stage!r} lists deps that do not exist: {absent}"


def test_the_deps_check_sees_transitive_imports():
    """The check is not vacuous: the evaluate stage reaches the landmarks module only through other modules."""
    script = stage_script(dvc_stages()["evaluate"])
    assert SRC / PACKAGE / "core" / "landmarks.py" in transitive_files(script)
    assert "facemarks.core.landmarks" not in module_level_deps(script)


def test_no_facemarks_import_inside_a_function():
    files = library_modules() + sorted((ROOT / "stages").glob("*.py"))
    inside = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in files for name, line, fn in imports_of(p) if fn]
    assert not inside, "facemarks imports inside functions (move them to the top of the module):\n" + "\n".join(inside)


def test_no_import_cycle_among_facemarks_modules():
    graph = {module_name(p): module_level_deps(p, with_packages=False) - {module_name(p)} for p in library_modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name] = 2
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
