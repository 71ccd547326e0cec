import subprocess
import sys

HEAVY = ("mlflow", "prefect", "deepspeed")


def test_import_covipal_stays_light():
    code = ("import sys, covipal, covipal.config, covipal.io, covipal.tracking; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
