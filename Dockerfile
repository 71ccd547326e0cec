# covipal on a GPU host: the project (code, pipeline, params, dvc.yaml and dvc.lock, git history) in
# /work and its environment in /opt/venv; a Prefect Docker work pool runs its flow runs in it
# (docs/operations.md, section 6). Built and run where Docker exists:
#   docker build -t covipal:latest .
#   docker run --gpus all covipal:latest                      # the whole pipeline once (CMD)
#   prefect work-pool create covipal --type docker --base-job-template docker/work-pool.json
# The worker replaces CMD with its own command (`prefect flow-run execute`), so there is no ENTRYPOINT.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# The CUDA image tag fixes the Ubuntu snapshot; apt versions are not pinned on top of it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
 && rm -rf /var/lib/apt/lists/*

# The ubuntu24.04 images ship a user `ubuntu` with UID 1000: it makes way for covipal's
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 covipal
WORKDIR /work
# The environment first (a layer that changes only with pyproject.toml and the constraints)
COPY --chown=1000:1000 pyproject.toml ./
COPY --chown=1000:1000 docker/constraints.txt docker/
COPY --chown=1000:1000 covipal ./covipal
# torch from PyPI on Linux is the CUDA build, and torchvision 0.28.0 is the CUDA build made for it (transformers
# needs torchvision for the Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision video processors); every other package at
# the version of docker/constraints.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c docker/constraints.txt torch==2.13.0 torchvision==0.28.0 . \
 && /opt/venv/bin/python -c "import torchvision.ops"
# Then the project itself (.dockerignore keeps out the venv, DVC outputs and caches, local databases)
COPY --chown=1000:1000 . /work
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/work PREFECT_HOME=/work/.prefect COVIPAL_PROJECT=/work

USER 1000:1000
# a project mounted over /work by another user is still a git repository to this one
RUN git config --global --add safe.directory /work
CMD ["python", "pipelines/flow.py", "run"]
