"""Every third-party import in pipeline/ is declared in pyproject.toml: module-level imports as core
dependencies, imports inside functions (optional features) at least in an extra; and the constraints file
pins what this environment runs."""
from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Optional imports whose distribution is not installed in the test environment, so that
# packages_distributions() cannot name it: the distribution each is published as.
NOT_INSTALLED_HERE = {"umap": "umap-learn", "hnswlib": "hnswlib"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], not in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def third_party_imports() -> dict[str, dict[str, bool]]:
    """module -> {file: imported at module level}, for modules outside the standard library and strata."""
    out: dict[str, dict[str, bool]] = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for module, top in imports(path):
            if module in sys.stdlib_module_names or module in ("pipeline", "jobs", "__future__"):
                continue
            files = out.setdefault(module, {})
            files[str(path.relative_to(REPO))] = files.get(str(path.relative_to(REPO)), False) or top
    return out


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()


def distributions_of(module: str) -> set[str]:
    dists = _installed().get(module)
    if dists:
        return {canonical(d) for d in dists}
    assert module in NOT_INSTALLED_HERE, (
        f"{module} is imported by pipeline/ but no installed distribution provides it; declare it and "
        f"install it, or name its distribution in NOT_INSTALLED_HERE if it is an optional extra")
    return {canonical(NOT_INSTALLED_HERE[module])}


def test_every_import_is_declared():
    core = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {requirement_name(r) for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs}
    modules = third_party_imports()
    assert {"numpy", "torch", "ray", "zarr", "pandas", "scipy", "threadpoolctl", "huggingface_hub"} <= set(modules)
    problems = []
    for module, files in sorted(modules.items()):
        dists = distributions_of(module)
        top_level = sorted(f for f, top in files.items() if top)
        if top_level and not dists & core:
            problems.append(f"{module} ({'/'.join(sorted(dists))}) is imported at module level by {top_level} "
                            f"but is not a core dependency")
        elif not dists & (core | extras):
            problems.append(f"{module} ({'/'.join(sorted(dists))}) is imported by {sorted(files)} but not declared")
    assert not problems, "\n".join(problems)


def test_ranges_not_pins_except_the_weights_package():
    """A library declares what it works with; the exact versions live in constraints.txt."""
    pinned = [r for r in PYPROJECT["project"]["dependencies"] if "==" in r]
    assert pinned == []
    assert any(r.startswith("ray[data]") for r in PYPROJECT["project"]["dependencies"])
    assert not any(r.startswith("ray[default]") for r in PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(r.startswith("ray[default]") for r in extras["cluster"])
    assert any(requirement_name(r) == "faiss-cpu" for r in extras["ann"])
    assert any(requirement_name(r) == "umap-learn" for r in extras["umap"])
    assert any("cluster" in r for r in extras["test"] if r.startswith("strata["))  # `ray job submit` in tests


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonical(name)] = pinned.strip()
    return pins


def test_constraints_pin_this_environment():
    pins = constraints()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    declared |= {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]
                 if not r.startswith("strata[")}
    for dist in sorted(declared):
        assert dist in pins, f"{dist} is declared but not pinned in constraints.txt"
        try:
            assert version(dist) == pins[dist], f"{dist}: installed {version(dist)}, constraints.txt {pins[dist]}"
        except PackageNotFoundError:
            pytest.fail(f"{dist} is declared but not installed")
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", makefile), "make installs with the constraints file"
