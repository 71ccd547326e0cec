import subprocess
import sys

HEAVY = ("mlflow", "prefect", "deepspeed")


def test_import_covipal_stays_light():
    code = ("import sys, covipal, covipal.config, covipal.io, covipal.tracking; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_pruning_runtime_imports_no_layer_above_it():
    """covipal/pruning (the runtime and the methods) imports no training, evaluation, registry, config
    or pipeline code, lazy imports included (every import statement of every file, read with ast)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    above = ("covipal.training", "covipal.evaluation", "covipal.registry", "covipal.config", "covipal.profiling",
             "covipal.reference", "covipal.world", "covipal.tracking", "pipelines")
    found = []
    for path in sorted((root / "covipal" / "pruning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith(above)]
    assert found == []
