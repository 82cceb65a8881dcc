# ACOUSLIC-AI submission image: FetalCLIPSEG frame selection + abdomen segmentation.
#
#   docker build -t acouslic-fetalclipseg .                              # exec variant (default)
#   docker build -t acouslic-fetalclipseg:invoke --build-arg API=invoke .  # invoke variant
#   docker build ... --build-arg BASE_IMAGE=...                          # any image with python + torch
#
# Contract (grand-challenge): reads /input/images/stacked-fetal-ultrasound/*.mha, writes
# /output/images/fetal-abdomen-segmentation/output.mha and /output/fetal-abdomen-frame-number.json.
#
# API (build argument): how grand-challenge runs the image, announced by the label
# org.grand-challenge.api-method, which the entrypoint must agree with (the platform strips its own
# variables from our environment, so the image cannot learn the mode at run time):
#   exec    the entrypoint runs once per job: `python -m algorithm` (/input -> /output, exit code)
#   invoke  the entrypoint starts once: `python -m algorithm.serve`, the model loaded once, a job per
#           POST http://127.0.0.1:4743/invoke
# Both run under dumb-init, so that SIGTERM (`docker stop`, the platform's end of job) reaches Python
# even when the entrypoint is PID 1.
#
# Weights: none in this image. They come from grand-challenge's model tarball, unpacked to
# /opt/ml/model/, or `./export.sh -w W` bakes W into /opt/ml/model/ in a layer on top of this image.
# Locally, mount them: -v $PWD/model:/opt/ml/model:ro.
#
# Base image: official PyTorch runtime image with torch 2.14.1 (constraints.txt pins it), in its
# CUDA 12.6 build: the oldest CUDA of torch's release matrix (cu126, cu129, cu130, cu132 since torch
# 2.12; no cu128), so the one that runs on the oldest drivers: any CUDA 12.x build needs an NVIDIA
# driver >= 525 (minor-version compatibility), a CUDA 13.x build (PyPI's default torch wheel, cu130)
# needs >= 580. grand-challenge does not publish its hosts' driver; SageMaker documents R470 for
# ml.g4dn inference hosts, where no CUDA 12 build can use the GPU; if a host is below 525, the log's
# WARNING (python -m algorithm, device honesty) says so and names the driver. A T4 (sm_75) is in
# every build. tools/run_container.sh substitutes a locally built stand-in (same Python packages,
# Debian bookworm + /opt/venv) when this tag cannot be pulled.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime
ARG API=exec
FROM ${BASE_IMAGE} AS app

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib

# Non-root user (grand-challenge runs images as their USER). Fixed uid/gid 1001 so output
# folders can be prepared for it on the host; 1000 is taken by `ubuntu` in Ubuntu 24.04 bases.
RUN groupadd --system --gid 1001 user \
 && useradd --system --uid 1001 --gid 1001 --create-home --no-log-init --shell /bin/bash user

# An empty, root-owned working folder: `python -m` puts the working folder first on sys.path.
WORKDIR /opt/app

# Runtime dependencies first (a layer that code changes do not rebuild): pyproject.toml's dependencies and
# its `container` extra at constraints.txt's versions, as `pip install '.[container]' -c constraints.txt`
# would install them. The base image's torch, torchvision and CUDA wheels are kept (never a second
# multi-GB torch) and pinned, so that open_clip_torch / peft cannot upgrade them
# (tools/container/runtime_requirements.py).
COPY pyproject.toml constraints.txt tools/container/runtime_requirements.py /tmp/src/
RUN set -eu; \
    python /tmp/src/runtime_requirements.py /tmp/src/pyproject.toml /tmp/src/constraints.txt /tmp/pip; \
    python -m pip install --no-cache-dir --constraint /tmp/pip/constraints.txt --requirement /tmp/pip/requirements.txt; \
    python -c "import torch, torchvision, open_clip, peft, safetensors, SimpleITK, cv2, scipy, contourpy, numpy, PIL, rich, fastapi, uvicorn; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"; \
    command -v dumb-init; \
    rm -rf /tmp/src /tmp/pip /root/.cache

# The algorithm package, installed (and byte-compiled, since the user cannot write next to root-owned
# sources) by pip from this tree: no weights, training code, tests or data are in the build context
# (.dockerignore), so the package holds algorithm/ only and the training entry point is removed.
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY algorithm/ /tmp/src/algorithm/
RUN set -eu; \
    python -m pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src; \
    rm -f "$(dirname "$(command -v fetalclipseg)")/fetalclipseg-train"; \
    rm -rf /tmp/src /root/.cache; \
    cd /; python -m compileall -q "$(python -c 'import algorithm, os; print(os.path.dirname(algorithm.__file__))')"; \
    python -m algorithm --version

USER 1001:1001

LABEL org.opencontainers.image.title="acouslic-ai-fetalclipseg" \
      org.opencontainers.image.description="ACOUSLIC-AI: fetal abdomen frame selection and segmentation (FetalCLIPSEG)"

# The two variants differ only in their label and entrypoint; the last line picks one by API.
FROM app AS api-exec
LABEL org.grand-challenge.api-method="exec"
ENTRYPOINT ["dumb-init", "--single-child", "--", "python", "-m", "algorithm"]

FROM app AS api-invoke
LABEL org.grand-challenge.api-method="invoke"
ENTRYPOINT ["dumb-init", "--single-child", "--", "python", "-m", "algorithm.serve"]

FROM api-${API}
