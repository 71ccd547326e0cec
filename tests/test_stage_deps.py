"""Each stage's code dependencies in dvc.yaml are exactly its import closure; scratch state is no output;
the pruning methods are imported by name on first use."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from covipal.config import load_params
from covipal.deps import code_digest, import_closure, method_modules

ROOT = Path(__file__).resolve().parents[1]
CODE = ("covipal", "pipelines")


def stage_methods(name: str, params) -> list[str]:
    """The pruning methods stage ``name`` resolves by a name from its parameters."""
    if name == "evaluate":
        e = params.evaluate
        return sorted({e.variants.get(m, {}).get("method", m) for m in e.methods})
    if name == "profile":
        return sorted({*params.profile.methods, params.pruning.method})
    return []


def code_deps(deps: list) -> list[str]:
    return [d for d in deps if isinstance(d, str) and d.split("/")[0] in CODE]


def covered(dep: str) -> set[str]:
    path = ROOT / dep
    if path.is_dir():
        return {p.relative_to(ROOT).as_posix() for p in path.rglob("*.py") if "__pycache__" not in p.parts}
    return {dep}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", list(stages()))
def test_code_deps_are_the_import_closure(name):
    stage = stages()[name]
    script = stage["cmd"].split()[1]
    closure = {p.as_posix() for p in import_closure(script, stage_methods(name, load_params(ROOT / "params.yaml")))}
    deps = code_deps(stage["deps"])
    listed = set().union(*map(covered, deps))
    missing, extra = sorted(closure - listed), sorted(listed - closure)
    assert not missing and not extra, (
        f"stage {name}: dvc.yaml's code deps differ from what {script} imports; "
        f"add {missing} and remove {extra} (its closure: {sorted(closure)})")
    assert all((ROOT / d).exists() for d in deps), f"stage {name}: a dep does not exist: {deps}"


def test_scratch_folders_are_no_outputs():
    """Checkpoints and shards in progress are git-ignored scratch; the resumable stages' outputs are
    ordinary cached outputs (no ``persist``, which would keep DVC's run cache from them)."""
    for name, stage in stages().items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        assert not [o for o in outs if o.startswith("checkpoints")], name
        if name in ("targets", "stage1", "stage2"):
            options = [v for o in stage.get("outs", []) if isinstance(o, dict) for k, v in o.items()
                       if k != "metrics/register.json"]  # a registration: persist, never from the run cache
            assert not [o for o in options if o.get("persist") or o.get("cache") is False], name
    assert "/checkpoints/" in (ROOT / ".gitignore").read_text().split()


def test_a_baselines_file_is_no_dependency_of_the_ppm_stages():
    """A comment in fastv.py reruns evaluate (which runs FastV) and no PPM stage; a change to the
    attention code the base model's grounding loss uses reruns base."""
    deps = {name: set().union(*map(covered, code_deps(s["deps"]))) for name, s in stages().items()}
    assert [n for n, d in deps.items() if "covipal/pruning/fastv.py" in d] == ["evaluate"]
    assert "covipal/pruning/guide.py" in deps["base"]
    assert "covipal/training/hf_inputs.py" in deps["targets"] & deps["stage2"] & deps["evaluate"]


def test_closure_follows_lazy_imports_packages_method_names_and_shipped_files(tmp_path):
    (tmp_path / "covipal" / "pruning").mkdir(parents=True)
    (tmp_path / "pipelines").mkdir()
    files = {
        "covipal/__init__.py": "",
        "covipal/pruning/__init__.py": "from covipal.pruning.registry import get_method\n",
        "covipal/pruning/registry.py": ("METHOD_MODULES = {'fast': 'covipal.pruning.fast',\n"
                                        "                  'slow': 'covipal.pruning.slow'}\n"),
        "covipal/pruning/fast.py": "import torch\n",
        "covipal/pruning/slow.py": "",
        "covipal/lazy.py": "def f():\n    from covipal import shipped\n    return 'model_code.py'\n",
        "covipal/shipped.py": "", "covipal/model_code.py": "", "covipal/unused.py": "",
        "pipelines/common.py": "import json\n",
        "pipelines/run.py": ("from common import json\nimport covipal.lazy\n"
                             "def g():\n    from covipal.pruning import get_method\n    get_method('fast')\n"),
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    closure = [p.as_posix() for p in import_closure("pipelines/run.py", root=tmp_path)]
    assert closure == ["covipal/__init__.py", "covipal/lazy.py", "covipal/model_code.py", "covipal/pruning/__init__.py",
                       "covipal/pruning/fast.py", "covipal/pruning/registry.py", "covipal/shipped.py",
                       "pipelines/common.py", "pipelines/run.py"]
    assert "covipal/pruning/slow.py" in {p.as_posix() for p in import_closure("pipelines/run.py", ["slow"], tmp_path)}
    with pytest.raises(ValueError, match=r"unknown pruning methods \['nope'\]; built-in methods: \['fast', 'slow'\]"):
        import_closure("pipelines/run.py", ["nope"], tmp_path)
    before = code_digest(closure, tmp_path)
    (tmp_path / "covipal/unused.py").write_text("# a comment\n")
    assert code_digest(closure, tmp_path) == before
    (tmp_path / "covipal/shipped.py").write_text("# a comment\n")
    assert code_digest(closure, tmp_path) != before


def test_pruning_methods_are_imported_on_first_use():
    code = ("import sys\nfrom covipal.pruning import available_methods, get_method, registry\n"
            "loaded = lambda: sorted(m for m in sys.modules if m.startswith('covipal.pruning.') and m.split('.')[-1]"
            " in {v.split('.')[-1] for v in registry.METHOD_MODULES.values()})\n"
            "assert loaded() == [], loaded()\n"
            "assert available_methods() == sorted(registry.METHOD_MODULES), available_methods()\n"
            "assert loaded() == []\n"
            "assert get_method('fastv', reserve_ratio=0.5).name == 'fastv'\n"
            "assert loaded() == ['covipal.pruning.fastv'], loaded()\n"
            "from covipal.pruning import VisionZipPruner\n"
            "assert VisionZipPruner.name == 'visionzip'\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_each_method_module_registers_its_name():
    from covipal.pruning import registry

    assert method_modules() == registry.METHOD_MODULES
    for name, module in registry.METHOD_MODULES.items():
        cls = registry.method_class(name)
        assert cls.name == name and cls.__module__ == module
    with pytest.raises(ValueError, match="already exists"):
        registry.register("fastv")(type("Other", (registry.Pruner,), {}))



def test_targets_resume_in_the_scratch_folder_and_publish_when_done(tmp_path):
    """An interrupted targets run left in the scratch folder resumes shard by shard; the finished shards
    are moved to the output (the scratch folder is gone) and equal those of an uninterrupted run."""
    import json

    from test_user_data import files, save_vqa
    from tiny_lvlms import save_checkpoint

    from covipal.base_model import build_base
    from covipal.config import DataConfig, parse_params
    from covipal.training.pipeline import RESUME_FILE, make_targets
    from covipal.world.dataset import prepare

    quiet = {"log": lambda *_: None}
    params = parse_params({"model": {"source": str(save_checkpoint("llava", tmp_path / "lvlm"))},
                           "targets": {"guide_layer": 1, "shard_size": 2, "rows": {"train": 6, "validation": 3}}})
    build_base(params, tmp_path / "world", tmp_path / "base", **quiet)
    prepare(DataConfig(source=str(save_vqa(tmp_path / "vqa"))), tmp_path / "world", **quiet)
    make_targets(params, tmp_path / "world", tmp_path / "base", tmp_path / "whole", tmp_path / "work", **quiet)
    assert not (tmp_path / "work").exists() and (tmp_path / "whole" / "train").is_dir()

    shutil.copytree(tmp_path / "whole", tmp_path / "work")  # as a run killed after 2 of 3 train shards leaves it
    for name in ("shard-00002.safetensors", "shard-00002.json"):
        (tmp_path / "work" / "train" / name).unlink()
    marker = json.loads((tmp_path / "work" / RESUME_FILE).read_text())
    (tmp_path / "work" / RESUME_FILE).write_text(json.dumps({**marker, "complete": False}))
    logged = []
    out = make_targets(params, tmp_path / "world", tmp_path / "base", tmp_path / "out", tmp_path / "work",
                       log=logged.append)
    assert any("resuming the target shards" in line for line in logged), logged
    assert out["train"]["written"] == 1 and out["train"]["skipped"] == 2 and out["validation"]["written"] == 0
    assert not (tmp_path / "work").exists()
    shards = lambda folder: {k: v for k, v in files(folder).items() if "shard-" in k}  # noqa: E731
    assert shards(tmp_path / "out") == shards(tmp_path / "whole") and len(shards(tmp_path / "out")) == 10
