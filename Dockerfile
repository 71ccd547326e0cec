# covipal on a GPU host: the pipeline flow as the entry point (docs/operations.md).
#   docker build -t covipal .
#   docker run --gpus all -v "$PWD:/work" covipal            # whole pipeline once (dvc repro via Prefect)
#   docker run --gpus all -v "$PWD:/work" -e PREFECT_API_URL=http://prefect:4200/api \
#       -e MLFLOW_TRACKING_URI=http://mlflow:5000 covipal serve   # the scheduled deployment
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
WORKDIR /opt/covipal
COPY --chown=1000:1000 pyproject.toml ./
COPY --chown=1000:1000 docker/constraints.txt docker/
COPY --chown=1000:1000 covipal ./covipal
# torch from PyPI on Linux is the CUDA build, and torchvision 0.28.0 is the CUDA build made for it (transformers
# needs torchvision for the Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision video processors); every other package at
# the version of docker/constraints.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c docker/constraints.txt torch==2.13.0 torchvision==0.28.0 . \
 && /opt/venv/bin/python -c "import torchvision.ops"
# The project folder (git + DVC workspace) is mounted at /work; its covipal package comes first.
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/work PREFECT_HOME=/work/.prefect

USER 1000:1000
WORKDIR /work
ENTRYPOINT ["python", "pipelines/flow.py"]
CMD ["run"]
