"""The project code a script runs: its import closure, read statically, and a hash of it.

A stage's code dependencies (``dvc.yaml``) and the resume key of its scratch state are the
files :func:`import_closure` finds from the stage's script: every ``import`` and ``from ...
import`` statement of every file reached, those inside functions included (a lazy import
runs when its function does), followed to the project's own files. Importing a submodule
runs its packages' ``__init__.py`` files, so they count too. Two more kinds of reference
count as imports, since the code they name runs:

- a call ``get_method("name")`` with a literal name imports the module that registers that
  pruning method (the table ``METHOD_MODULES`` of ``covipal/pruning/registry.py``);
- a string literal naming a sibling ``.py`` file (code a module ships or runs, such as the
  MLflow model-from-code file ``covipal/ppm_pyfunc.py``);
- ``covipal.<name>`` or ``from covipal import <name>`` for a top-level name that the package
  resolves on first use (the table ``API`` of ``covipal/__init__.py``) imports its module.

Methods a stage resolves from parameters (``evaluate.methods``) are given as ``methods``.
Nothing here imports the project or any third-party package: files are parsed with :mod:`ast`.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = Path("covipal") / "pruning" / "registry.py"  # holds METHOD_MODULES: method name -> module
SIBLING = re.compile(r"[A-Za-z_]\w*\.py")


def method_modules(root: Path = ROOT) -> dict[str, str]:
    """The built-in pruning methods' modules by method name, read from the registry's source."""
    return _table(root / REGISTRY, "METHOD_MODULES")


def api_modules(root: Path = ROOT) -> dict[str, str]:
    """The package's lazily resolved top-level names and their modules, read from ``covipal/__init__.py``
    (none when it has no ``API`` table)."""
    try:
        return _table(root / "covipal" / "__init__.py", "API")
    except (FileNotFoundError, LookupError):
        return {}


def _table(path: Path, name: str) -> dict[str, str]:
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                        else None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise LookupError(f"{path} defines no {name} table")


def module_files(name: str, paths: list[Path]) -> list[Path]:
    """The project files that ``import name`` runs: each package's ``__init__.py`` on the way and the module.

    ``paths`` are searched in order (as ``sys.path``); a name found in none is not the project's: ``[]``.
    """
    parts = name.split(".")
    for base in paths:
        files, folder = [], base
        for i, part in enumerate(parts):
            if (folder / part / "__init__.py").is_file():
                folder = folder / part
                files.append(folder / "__init__.py")
            elif (folder / f"{part}.py").is_file():
                files.append(folder / f"{part}.py")
                break
            else:
                break  # an attribute of the package, or not in this path entry
        if files:
            return files
    return []


def references(path: Path, paths: list[Path], root: Path, methods: dict[str, str],
               api: dict[str, str] | None = None) -> set[Path]:
    """Project files that the code of ``path`` imports or names (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[Path] = set()
    api = api or {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "covipal" and not node.level:
            for alias in node.names:
                if alias.name in api:
                    found.update(module_files(api[alias.name], paths))
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "covipal"
                and node.attr in api):
            found.update(module_files(api[node.attr], paths))
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(module_files(alias.name, paths))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of ``path``
                package = path.relative_to(root).parent.parts
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.update(module_files(base, paths))
            for alias in node.names:  # a name may be a submodule
                found.update(f for f in module_files(f"{base}.{alias.name}", paths)
                             if f.stem == alias.name or f.parent.name == alias.name)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get_method"
              and node.args[0].value in methods):
            found.update(module_files(methods[node.args[0].value], paths))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SIBLING.fullmatch(node.value):
            sibling = path.with_name(node.value)
            if sibling.is_file() and sibling != path:
                found.add(sibling)
    return found


def import_closure(script: str | Path, methods: Iterable[str] = (), root: str | Path = ROOT) -> list[Path]:
    """The project's ``.py`` files that running ``script`` imports, relative to ``root``, sorted.

    ``script`` runs as ``python script``: its folder comes first on the import path, then
    ``root``. ``methods``: pruning methods the script resolves by a name from its parameters.
    """
    root = Path(root).resolve()
    script = (root / script).resolve()
    paths = [script.parent, root]
    table, api = method_modules(root), api_modules(root)
    unknown = sorted(set(methods) - set(table))
    if unknown:
        raise ValueError(f"unknown pruning methods {unknown}; built-in methods: {sorted(table)}")
    todo = [script, *(f for m in methods for f in module_files(table[m], paths))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(references(path, paths, root, table, api) - seen)
    return sorted(p.relative_to(root) for p in seen if p.is_relative_to(root))


def code_digest(files: Iterable[str | Path], root: str | Path = ROOT) -> str:
    """SHA-256 (first 16 hex digits) of ``files`` (relative to ``root``): their names and bytes."""
    digest = hashlib.sha256()
    for rel in sorted(Path(f).as_posix() for f in files):
        digest.update(rel.encode() + b"\0" + (Path(root) / rel).read_bytes() + b"\0")
    return digest.hexdigest()[:16]
