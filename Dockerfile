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
# Base image: official PyTorch runtime image with torch 2.14.1 (requirements.txt pins it), in its
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
    PYTHONPATH=/opt/app \
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

WORKDIR /opt/app

# Runtime dependencies first (cache-friendly layer). The base image already ships torch and
# torchvision: keep those (never pull a second multi-GB torch) and pin them as constraints so
# that open_clip_torch / peft cannot upgrade them; install everything else from requirements.txt.
COPY requirements.txt /opt/app/requirements.txt
RUN set -eu; \
    cp /opt/app/requirements.txt /tmp/requirements.txt; : > /tmp/constraints.txt; \
    for pkg in torch torchvision; do \
        have="$(python -m pip list --format=freeze 2>/dev/null | grep -i "^${pkg}==" || true)"; \
        if [ -n "$have" ]; then \
            want="$(grep -iE "^[[:space:]]*${pkg}[[:space:]]*==" /tmp/requirements.txt | tr -d ' ' || true)"; \
            echo "base image provides ${have} (requirements.txt: ${want:-unpinned})"; \
            if [ -n "$want" ] && [ "${have%%+*}" != "${want%%+*}" ]; then \
                echo "WARNING: ${pkg} of the base image differs from requirements.txt"; \
            fi; \
            echo "$have" >> /tmp/constraints.txt; \
            sed -i -E "/^[[:space:]]*${pkg}[[:space:]]*([=<>!~;[]|$)/Id" /tmp/requirements.txt; \
        fi; \
    done; \
    python -m pip install --no-cache-dir --constraint /tmp/constraints.txt --requirement /tmp/requirements.txt; \
    python -c "import torch, torchvision, open_clip, peft, safetensors, SimpleITK, cv2, scipy, numpy, PIL, rich, fastapi, uvicorn; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)"; \
    command -v dumb-init; \
    rm -f /tmp/requirements.txt /tmp/constraints.txt; rm -rf /root/.cache

# The algorithm package, byte-compiled because the user cannot write next to root-owned sources. No
# weights, training code, tests or data (.dockerignore).
COPY algorithm/ /opt/app/algorithm/
RUN python -m compileall -q /opt/app/algorithm \
 && chmod -R a+rX /opt/app

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
