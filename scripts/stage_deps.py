"""Rewrite the code deps of each stage in dvc.yaml to its import closure (folders where complete).

    python scripts/stage_deps.py    # then review `git diff dvc.yaml`; tests/test_stage_deps.py checks the result
"""

import re, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_stage_deps import stage_methods, stages, ROOT, CODE
from covipal.config import load_params
from covipal.deps import import_closure

params = load_params(ROOT / "params.yaml")

def compress(files):
    files = set(files)
    out = set(files)
    folders = sorted({p.parent for p in map(Path, files) if p.parent.as_posix() not in CODE}, key=lambda p: len(p.parts))
    chosen = []
    for folder in folders:
        if any(folder.is_relative_to(c) for c in chosen):
            continue
        allpy = {q.relative_to(ROOT).as_posix() for q in (ROOT / folder).rglob("*.py") if "__pycache__" not in q.parts}
        if allpy <= files:
            chosen.append(folder)
    for c in chosen:
        out = {f for f in out if not Path(f).is_relative_to(c)} | {c.as_posix()}
    pipes = sorted(f for f in out if f.startswith("pipelines/"))
    return pipes + sorted(f for f in out if not f.startswith("pipelines/"))

text = (ROOT / "dvc.yaml").read_text().splitlines(keepends=True)
result, i, stage = [], 0, None
while i < len(text):
    line = text[i]
    m = re.match(r"^  (\w+):\s*(#.*)?$", line)
    if m:
        stage = m.group(1)
    result.append(line)
    if line.strip() == "deps:" and stage in stages():
        i += 1
        block = []
        while i < len(text) and re.match(r"^      - ", text[i]):
            block.append(text[i]); i += 1
        other = [l for l in block if l.strip()[2:].split("/")[0] not in CODE]
        st = stages()[stage]
        files = [p.as_posix() for p in import_closure(st["cmd"].split()[1], stage_methods(stage, params))]
        result += [f"      - {d}\n" for d in compress(files)] + other
        continue
    i += 1
(ROOT / "dvc.yaml").write_text("".join(result))
