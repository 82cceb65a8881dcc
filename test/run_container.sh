#!/usr/bin/env bash
# Container test (run by `make test`, hence by CI): build the submission image and run it on replica
# cases exactly the way grand-challenge runs an algorithm, then check every output and compare it with
# `python -m algorithm` run outside the container on the same case and weights.
#
# Phases (each one timed):
#   1. docker   - make sure a Docker engine answers: install Debian's docker.io and start dockerd if not
#   2. base     - the Dockerfile's BASE_IMAGE if present or pullable, else a local stand-in built by
#                 test/container/build_base.sh (debootstrap bookworm + venv with requirements.txt),
#                 cached by a hash of requirements.txt and the recipe
#   3. build    - docker build --build-arg BASE_IMAGE=... ; checks non-root USER, entrypoint, contents
#   4. weights  - $TEST_WEIGHTS, else the bundled algorithm/weights/*.safetensors, else a random small
#                 checkpoint; staged as the model tarball's contents and mounted at /opt/ml/model
#   5. cases    - one 840-frame replica case and one without abdomen (training.phantom), laid out as
#                 grand-challenge mounts /input (images/stacked-fetal-ultrasound/<uuid>.mha + inputs.json)
#   6. run      - per case: docker run --network none, /input read-only, read-only root fs, fresh /tmp
#                 volume, memory limit, all capabilities dropped, no-new-privileges, image's non-root user,
#                 --gpus all only where nvidia-smi works; then the host run and test/container/check_outputs.py
#
# Environment knobs:
#   IMAGE=acouslic-fetalclipseg:test   BASE_IMAGE=<override>   CONTAINER_TEST_PULL=0 (never try to pull)
#   TEST_WEIGHTS=path.safetensors      CASES_DIR=test/cases     CONTAINER_MEMORY=15g
#   EXPECT_NORMAL=any|found            EXPECT_EMPTY=none|any    CASE_TIMEOUT=1200 (seconds per docker run)
#   PYTHON=.venv/bin/python            NO_ABDOMEN_FRAMES_PER_SWEEP=50 (140 = full size)
# Outputs and logs of the last run stay under CASES_DIR/<case>/ (output-container, output-host, *.log).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

IMAGE="${IMAGE:-acouslic-fetalclipseg:test}"
CASES_DIR="$(mkdir -p "${CASES_DIR:-test/cases}" && cd "${CASES_DIR:-test/cases}" && pwd)"
MEMORY="${CONTAINER_MEMORY:-15g}"
CASE_TIMEOUT="${CASE_TIMEOUT:-1200}"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/acouslic-dockerd.log}"
LABEL_FILTER="label=org.opencontainers.image.title=acouslic-ai-fetalclipseg"

# ------------------------------------------------------------------------------------------ helpers
T_START=$SECONDS
PHASE_NAMES=()
PHASE_SECS=()
PHASE_NAME=""
PHASE_T0=0
log()  { echo "[container-test] $*"; }
die()  { echo "[container-test] FAIL: $*" >&2; exit 1; }
phase() {  # phase NAME: close the running phase (if any) and open a new one
    if [ -n "$PHASE_NAME" ]; then
        PHASE_NAMES+=("$PHASE_NAME"); PHASE_SECS+=("$((SECONDS - PHASE_T0))")
    fi
    PHASE_NAME="${1:-}"; PHASE_T0=$SECONDS
    [ -z "$PHASE_NAME" ] || log "=== $PHASE_NAME"
}
RUNNING=""   # name of the container in flight, removed if the script is interrupted
summary() {
    local status=$?
    if [ -n "$RUNNING" ]; then docker rm -f "$RUNNING" >/dev/null 2>&1 || true; docker volume rm -f "$RUNNING-tmp" >/dev/null 2>&1 || true; fi
    phase ""
    echo "[container-test] ---- timings (s) ----"
    local i
    for i in "${!PHASE_NAMES[@]}"; do printf '[container-test] %6s  %s\n' "${PHASE_SECS[$i]}" "${PHASE_NAMES[$i]}"; done
    printf '[container-test] %6s  total\n' "$((SECONDS - T_START))"
    if [ "$status" = 0 ]; then echo "[container-test] PASSED"; else echo "[container-test] FAILED (exit $status)" >&2; fi
}
trap summary EXIT
trap 'exit 130' INT TERM

# Hash of the algorithm package as the image gets it (.dockerignore drops caches and bytecode).
TREE_HASH_CMD='find algorithm -type f ! -path "*/__pycache__/*" ! -name "*.py[cod]" ! -path "*/.pytest_cache/*" ! -name "*.tar.gz" -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16'
tree_hash() { sh -c "$TREE_HASH_CMD"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else die "need root for: $*"; fi; }
apt_install() {  # apt_install PACKAGE...: Debian packages, quietly (full log in CASES_DIR/apt.log)
    local apt_log="$CASES_DIR/apt.log"
    as_root env DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 sh -c \
        "apt-get update -q && apt-get install -y -q $*" >>"$apt_log" 2>&1 \
        || { tail -20 "$apt_log" >&2; die "apt-get install $* failed (log: $apt_log)"; }
}

# ------------------------------------------------------------------------------- 1. docker engine
phase "docker engine"
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        log "no Docker engine: installing Debian's docker.io"
        apt_install docker.io
    fi
    if ! docker info >/dev/null 2>&1; then
        log "starting dockerd (log: $DOCKERD_LOG)"
        as_root sh -c "nohup dockerd >>'$DOCKERD_LOG' 2>&1 &"
        for _ in $(seq 90); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || { tail -20 "$DOCKERD_LOG" >&2 || true; die "dockerd did not come up within 90 s"; }
    fi
fi
log "docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null), root dir $(docker info --format '{{.DockerRootDir}}' 2>/dev/null)"

# --------------------------------------------------------------------------------- 2. base image
phase "base image"
DEFAULT_BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n1)"
BASE_IMAGE="${BASE_IMAGE:-$DEFAULT_BASE}"
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
elif [ "${CONTAINER_TEST_PULL:-1}" = 1 ] && timeout 1800 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    log "pulled base image $BASE_IMAGE"
else
    log "cannot pull $BASE_IMAGE: building the local stand-in (debootstrap + venv; cached per requirements.txt)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        apt_install debootstrap
    fi
    BASE_IMAGE="$(as_root bash test/container/build_base.sh | tail -n1)"
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "local base image was not built"
fi

# ------------------------------------------------------------------------------ 3. algorithm image
phase "image build"
BUILD_LOG="$CASES_DIR/docker-build.log"
if ! docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --tag "$IMAGE" . >"$BUILD_LOG" 2>&1; then
    tail -40 "$BUILD_LOG" >&2
    die "docker build failed (full log: $BUILD_LOG)"
fi
grep -E '^(base image provides|WARNING|torch )' "$BUILD_LOG" | sed 's/^/[container-test]   build: /' || true
# Old builds of this image (now untagged) only take disk space.
docker image prune -f --filter "$LABEL_FILTER" >/dev/null 2>&1 || true

USER_SPEC="$(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
ENTRYPOINT="$(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")"
[ -n "$USER_SPEC" ] || die "the image has no USER (grand-challenge expects a non-root user)"
case "${USER_SPEC%%:*}" in 0|root) die "the image's USER is root ($USER_SPEC)";; esac
[ "$ENTRYPOINT" = '["python","-m","algorithm"]' ] || die "unexpected ENTRYPOINT $ENTRYPOINT"
UID_IN="$(docker run --rm --network none --entrypoint id "$IMAGE" -u)"
GID_IN="$(docker run --rm --network none --entrypoint id "$IMAGE" -g)"
[ "$UID_IN" != 0 ] || die "the container runs as root (id -u = 0)"
CONTENTS="$(docker run --rm --network none --entrypoint sh "$IMAGE" -c 'cd /opt/app && ls -A')"
for unwanted in training test .venv .git data runs; do
    if printf '%s\n' "$CONTENTS" | grep -qx "$unwanted"; then die "/opt/app contains $unwanted (.dockerignore)"; fi
done
BUILT_HASH="$(tree_hash)"
IMAGE_HASH="$(docker run --rm --network none --entrypoint sh -w /opt/app "$IMAGE" -c "$TREE_HASH_CMD")"
[ "$IMAGE_HASH" = "$BUILT_HASH" ] \
    || die "the image's /opt/app/algorithm differs from the working tree's algorithm/ (hash $IMAGE_HASH != $BUILT_HASH): check .dockerignore"
IMAGE_BYTES="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
BASE_BYTES="$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")"
log "image $IMAGE: $((IMAGE_BYTES / 1000000)) MB (base $BASE_IMAGE: $((BASE_BYTES / 1000000)) MB); USER $USER_SPEC (uid $UID_IN); /opt/app: $(printf "%s " $CONTENTS)"

# ---------------------------------------------------------------------------------------- 4. weights
phase "weights"
MODEL_DIR="$CASES_DIR/model"   # what model.tar.gz would unpack to at /opt/ml/model
rm -rf "$MODEL_DIR"; mkdir -p "$MODEL_DIR"
shopt -s nullglob
BUNDLED=(algorithm/weights/*.safetensors)
shopt -u nullglob
WEIGHTS_KIND=""
if [ -n "${TEST_WEIGHTS:-}" ]; then
    [ -f "$TEST_WEIGHTS" ] || die "TEST_WEIGHTS=$TEST_WEIGHTS does not exist"
    cp "$TEST_WEIGHTS" "$MODEL_DIR/"
    WEIGHTS_KIND="given"
elif [ "${#BUNDLED[@]}" -ge 1 ]; then
    cp "${BUNDLED[0]}" "$MODEL_DIR/"
    WEIGHTS_KIND="bundled"
else
    "$PY" test/container/random_checkpoint.py --out "$MODEL_DIR/random-small.safetensors" \
        || die "could not write a random checkpoint (algorithm.model not ready?)"
    WEIGHTS_KIND="random"
fi
chmod 0755 "$MODEL_DIR"; chmod 0644 "$MODEL_DIR"/*.safetensors  # save_checkpoint writes 0600; uid 1001 must read it
WEIGHTS="$(ls "$MODEL_DIR"/*.safetensors)"
log "weights ($WEIGHTS_KIND): $WEIGHTS ($(du -h "$WEIGHTS" | cut -f1)), mounted read-only at /opt/ml/model"
# Random weights choose frames arbitrarily: only the contract is checked then, not the decision.
EXPECT_NORMAL="${EXPECT_NORMAL:-any}"
if [ "$WEIGHTS_KIND" = random ]; then EXPECT_EMPTY="${EXPECT_EMPTY:-any}"; else EXPECT_EMPTY="${EXPECT_EMPTY:-none}"; fi

# ------------------------------------------------------------------------------------------ 5. cases
phase "cases"
make_case() {  # make_case NAME SEED [phantom args...]; reuses a case generated by the same code and args
    local name="$1" seed="$2"; shift 2
    local dir="$CASES_DIR/$name" stamp
    stamp="$( (cat training/*.py algorithm/config.py algorithm/biometry.py test/container/make_case.py; echo "seed=$seed $*") \
              | sha256sum | cut -c1-16)"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] && [ -f "$dir/input/inputs.json" ]; then
        log "case $name: reusing $dir"
        return 0
    fi
    local src="$CASES_DIR/.phantom-$name"
    rm -rf "$src" "$dir"
    local t0=$SECONDS
    "$PY" -m training.phantom --out "$src" --cases 1 --seed "$seed" "$@" >"$CASES_DIR/phantom-$name.log" 2>&1 \
        || { tail -20 "$CASES_DIR/phantom-$name.log" >&2; die "training.phantom failed for case $name"; }
    "$PY" test/container/make_case.py --source "$src" --case-dir "$dir" >/dev/null
    chmod -R a+rX "$dir/input"   # readable by the container's user whatever the umask
    rm -rf "$src"
    echo "$stamp" >"$dir/.stamp"
    log "case $name: generated in $((SECONDS - t0)) s ($(du -sh "$dir/input" | cut -f1))"
}
# The normal case has the challenge's full size (6 sweeps x 140 frames); the no-abdomen case is shorter by
# default (6 x 50 frames) to save CI minutes, which also exercises a stack of another depth.
make_case normal 11 --frames-per-sweep 140
make_case no-abdomen 12 --no-abdomen --frames-per-sweep "${NO_ABDOMEN_FRAMES_PER_SWEEP:-50}"

# -------------------------------------------------------------------------------------------- 6. run
GPU_ARGS=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU_ARGS=(--gpus all)
    log "GPU present: containers get --gpus all"
fi

prepare_output() {  # a fresh output folder writable by the image's user only (as on grand-challenge)
    rm -rf "$1"; mkdir -p "$1"
    if [ "$(id -u)" = 0 ]; then chown "$UID_IN:$GID_IN" "$1"; else chmod 0777 "$1"; fi
}

run_container() {  # run_container CASE_DIR OUT_DIR LOG MOUNT_MODEL(1|0) [algorithm args...]
    local case_dir="$1" out="$2" logfile="$3" mount_model="$4"; shift 4
    local name="acouslic-test-$$-$RANDOM" status=0
    local model_args=()
    [ "$mount_model" = 0 ] || model_args=(--volume "$MODEL_DIR:/opt/ml/model:ro")
    RUNNING="$name"
    docker volume create "$name-tmp" >/dev/null
    prepare_output "$out"
    timeout --kill-after=30 "$CASE_TIMEOUT" docker run --rm --name "$name" \
        --network none \
        "${GPU_ARGS[@]}" \
        --memory "$MEMORY" --memory-swap "$MEMORY" \
        --cap-drop ALL --security-opt no-new-privileges \
        --read-only \
        --volume "$case_dir/input:/input:ro" \
        --volume "$out:/output" \
        --volume "$name-tmp:/tmp" \
        "${model_args[@]}" \
        "$IMAGE" "$@" >"$logfile" 2>&1 || status=$?
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker volume rm -f "$name-tmp" >/dev/null 2>&1 || true
    RUNNING=""
    return "$status"
}

check_case() {  # check_case NAME EXPECT MOUNT_MODEL(1|0)
    local name="$1" expect="$2" mount_model="$3" dir="$CASES_DIR/$1" t0 status
    t0=$SECONDS
    status=0; run_container "$dir" "$dir/output-container" "$dir/container.log" "$mount_model" || status=$?
    if [ "$status" != 0 ]; then
        tail -30 "$dir/container.log" >&2
        [ "$status" = 124 ] || [ "$status" = 137 ] && die "case $name: container exceeded ${CASE_TIMEOUT}s (or was killed: memory limit $MEMORY?)"
        die "case $name: container exited with status $status (log: $dir/container.log)"
    fi
    local t_container=$((SECONDS - t0))
    local expected_weights=/opt/ml/model/
    [ "$mount_model" = 1 ] || expected_weights=/opt/app/algorithm/weights/
    grep -q "weights $expected_weights" "$dir/container.log" \
        || die "case $name: the container did not load its weights from $expected_weights (log: $dir/container.log)"
    "$PY" test/container/check_outputs.py --input "$dir/input" --output "$dir/output-container" \
        --label "$name (container)" || die "case $name: container outputs violate the contract"

    # Reference: the same case, same weights, outside the container on the CPU.
    [ "$(tree_hash)" = "$BUILT_HASH" ] || die "algorithm/ changed in the working tree since the image was built; rerun the test"
    t0=$SECONDS
    rm -rf "$dir/output-host"
    "$PY" -m algorithm --input "$dir/input" --output "$dir/output-host" --weights "$WEIGHTS" --device cpu \
        >"$dir/host.log" 2>&1 || { tail -30 "$dir/host.log" >&2; die "case $name: host run failed (log: $dir/host.log)"; }
    local t_host=$((SECONDS - t0))

    local reference_of_container="$dir/output-container" truth_args=() truth
    for truth in "$dir"/reference/*.mha; do [ -f "$truth" ] && truth_args=(--truth "$truth"); done
    if [ "${#GPU_ARGS[@]}" -gt 0 ]; then
        # The grand-challenge-style run used the GPU; compare a CPU run of the image with the host.
        run_container "$dir" "$dir/output-container-cpu" "$dir/container-cpu.log" "$mount_model" --device cpu \
            || { tail -30 "$dir/container-cpu.log" >&2; die "case $name: container --device cpu failed"; }
        reference_of_container="$dir/output-container-cpu"
    fi
    "$PY" test/container/check_outputs.py --input "$dir/input" --output "$reference_of_container" \
        --reference "$dir/output-host" --label "$name (container vs host)" "${truth_args[@]}" \
        || die "case $name: container and host outputs differ"
    # What the case is known to contain (after the parity check, so a wrong decision is not mistaken for
    # a packaging problem).
    if [ "$expect" != any ]; then
        "$PY" test/container/check_outputs.py --input "$dir/input" --output "$dir/output-container" \
            --expect "$expect" --label "$name (expected: $expect)" \
            || die "case $name: wrong decision with $WEIGHTS_KIND weights (container and host agree; EXPECT_$( [ "$name" = normal ] && echo NORMAL || echo EMPTY)=any relaxes this)"
    fi
    log "case $name: container ${t_container} s, host ${t_host} s"
}

phase "run: normal case"
# The normal case reads the weights from /opt/ml/model (grand-challenge's model tarball, which must win over
# the image's own); with bundled weights the no-abdomen case runs without that mount (the image's fallback).
check_case normal "$EXPECT_NORMAL" 1
phase "run: no-abdomen case"
if [ "$WEIGHTS_KIND" = bundled ]; then check_case no-abdomen "$EXPECT_EMPTY" 0; else check_case no-abdomen "$EXPECT_EMPTY" 1; fi
phase ""
docker system df 2>/dev/null | sed 's/^/[container-test]   /' || true
