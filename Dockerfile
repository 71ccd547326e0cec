# covipal on a GPU host: the pipeline flow as the entry point.
#   docker build -t covipal .
#   docker run --gpus all -v "$PWD:/work" covipal            # whole pipeline (dvc repro via Prefect)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 covipal
WORKDIR /opt/covipal
COPY --chown=covipal pyproject.toml ./
COPY --chown=covipal covipal ./covipal
# torch from PyPI on Linux is the CUDA build; pinned like the rest in pyproject.toml
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install torch==2.13.0 \
 && /opt/venv/bin/pip install -e .
ENV PATH=/opt/venv/bin:$PATH

USER covipal
# The project folder (git + DVC workspace) is mounted at /work.
WORKDIR /work
ENTRYPOINT ["python", "pipelines/flow.py"]
