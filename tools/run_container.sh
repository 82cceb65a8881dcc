#!/usr/bin/env bash
# Container test (run by `make test`, hence by CI): build the submission image in its exec and invoke
# variants and run each the way grand-challenge runs it, then check every output and compare it with
# `python -m algorithm` run outside the container on the same case and weights.
#
# It changes nothing on the machine unless asked: without a Docker engine that answers (or without the base
# image and a way to pull it) it prints why it is skipped and exits 0. INSTALL_DOCKER=1 (CI sets it; needs
# root) lets it install Debian's docker.io, start dockerd and build the base image with debootstrap.
#
# Phases (each one timed):
#   1. docker   - a Docker engine that answers; with INSTALL_DOCKER=1, install docker.io and start dockerd
#   2. base     - the Dockerfile's BASE_IMAGE if present or pullable, else (INSTALL_DOCKER=1) a local
#                 stand-in built by tools/container/build_base.sh (debootstrap bookworm + venv with the
#                 runtime dependencies of pyproject.toml at constraints.txt's versions), cached by a hash of
#                 those files and the recipe
#   3. build    - docker build --build-arg API=exec|invoke; checks the non-root USER, that the label
#                 org.grand-challenge.api-method and the entrypoint agree, that the installed package is
#                 the working tree's algorithm/ and nothing else of the repository, no weights inside
#   4. weights  - $TEST_WEIGHTS, else the bundled algorithm/weights/*.safetensors, else a random small
#                 checkpoint; staged as the model tarball's contents (mounted at /opt/ml/model), and baked
#                 into a copy of the exec image by ./export.sh -w
#   5. cases    - one 840-frame replica case, one without abdomen, one broken file, each laid out as a job's
#                 inputs (the image in the input socket's folder + inputs.json); the host runs
#   6. exec     - the image as PID 1 (docker run): without weights it refuses (exit 3); `docker stop` in the
#                 middle of a case ends it within STOP_LIMIT seconds; then tools/container/shim.py plays the
#                 platform's shim in the container (as its PID 1, root): per job /input re-pointed as a
#                 symbolic link to /opt/ml/input/data/<job>-input, the entrypoint run as the image's user
#                 once per job (image with baked weights, no model mount)
#   7. invoke   - the shim starts the invoke image once (model mounted at /opt/ml/model), waits for
#                 GET /health = 200, POSTs /invoke for the three jobs in a row, checks the model was loaded
#                 once, sends SIGTERM and checks the server exits within the 5 s grace period
#   Every run: --network none (the shim talks to the server inside the container's own network namespace),
#   memory limit, every capability dropped but those the shim needs (the algorithm runs with none),
#   no-new-privileges, a fresh /tmp volume, --gpus all only where nvidia-smi works; outputs checked by
#   tools/check_outputs.py (contract + identical to the host run), the shim's record by
#   tools/container/check_shim.py, and `docker diff` must show no file written outside /output and /tmp.
#
# Environment knobs:
#   INSTALL_DOCKER=0|1 (1: may install docker.io, start dockerd, debootstrap the base image; needs root)
#   API=both|exec|invoke               IMAGE=acouslic-fetalclipseg:test (exec; invoke: IMAGE-invoke)
#   BASE_IMAGE=<override>              CONTAINER_TEST_PULL=0 (never try to pull)
#   TEST_WEIGHTS=path.safetensors      CASES_DIR=test/cases     CONTAINER_MEMORY=15g
#   EXPECT_NORMAL=any|found            EXPECT_EMPTY=none|any    CASE_TIMEOUT=1200 (seconds per job)
#   PYTHON=.venv/bin/python            NO_ABDOMEN_FRAMES_PER_SWEEP=50 (140 = full size)
#   STOP_LIMIT=3 (seconds docker stop may take; without an init it takes the 10 s of -t 10)
#   HEALTH_INTERVAL=2 (seconds between health polls; the platform polls every 10 s)
# Outputs and logs of the last run stay under CASES_DIR/ (results-<api>/<job>/output, <api>.log, host runs).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

API="${API:-both}"
case "$API" in both) APIS=(exec invoke);; exec|invoke) APIS=("$API");; *) echo "API must be exec, invoke or both" >&2; exit 2;; esac
IMAGE="${IMAGE:-acouslic-fetalclipseg:test}"
CASES_DIR="$(mkdir -p "${CASES_DIR:-test/cases}" && cd "${CASES_DIR:-test/cases}" && pwd)"
MEMORY="${CONTAINER_MEMORY:-15g}"
CASE_TIMEOUT="${CASE_TIMEOUT:-1200}"
STOP_LIMIT="${STOP_LIMIT:-3}"
HEALTH_INTERVAL="${HEALTH_INTERVAL:-2}"
PY="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DOCKERD_LOG="${DOCKERD_LOG:-/var/log/acouslic-dockerd.log}"
LABEL_FILTER="label=org.opencontainers.image.title=acouslic-ai-fetalclipseg"
API_LABEL="org.grand-challenge.api-method"

image_of() { if [ "$1" = exec ]; then echo "$IMAGE"; else echo "$IMAGE-invoke"; fi; }
entrypoint_of() { if [ "$1" = exec ]; then echo '["dumb-init","--single-child","--","python","-m","algorithm"]'; \
                  else echo '["dumb-init","--single-child","--","python","-m","algorithm.serve"]'; fi; }

# ------------------------------------------------------------------------------------------ helpers
T_START=$SECONDS
PHASE_NAMES=()
PHASE_SECS=()
PHASE_NAME=""
PHASE_T0=0
log()  { echo "[container-test] $*"; }
die()  { echo "[container-test] FAIL: $*" >&2; exit 1; }
skip() { trap - EXIT; echo "container test skipped: $*"; exit 0; }
INSTALL_DOCKER="${INSTALL_DOCKER:-0}"
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
    if [ -n "$RUNNING" ]; then docker rm -f "$RUNNING" >/dev/null 2>&1 || true; docker volume rm -f "$RUNNING-tmp" "$RUNNING-data" >/dev/null 2>&1 || true; fi
    phase ""
    echo "[container-test] ---- timings (s) ----"
    local i
    for i in "${!PHASE_NAMES[@]}"; do printf '[container-test] %6s  %s\n' "${PHASE_SECS[$i]}" "${PHASE_NAMES[$i]}"; done
    printf '[container-test] %6s  total\n' "$((SECONDS - T_START))"
    if [ "$status" = 0 ]; then echo "[container-test] PASSED"; else echo "[container-test] FAILED (exit $status)" >&2; fi
}
trap summary EXIT
trap 'exit 130' INT TERM

# Hash of the algorithm package as the image gets it (.dockerignore drops caches, bytecode and weights).
TREE_HASH_CMD='find algorithm -type f ! -path "*/__pycache__/*" ! -name "*.py[cod]" ! -path "*/.pytest_cache/*" ! -name "*.tar.gz" ! -path "algorithm/weights/*" ! -name "*.safetensors" -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16'
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
    [ "$INSTALL_DOCKER" = 1 ] || skip "no Docker engine answers; INSTALL_DOCKER=1 make test installs and starts one (needs root)"
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
    [ "$INSTALL_DOCKER" = 1 ] || skip "base image $BASE_IMAGE is not present and cannot be pulled; INSTALL_DOCKER=1 make test builds a local stand-in with debootstrap (needs root)"
    log "cannot pull $BASE_IMAGE: building the local stand-in (debootstrap + venv; cached per pyproject.toml and constraints.txt)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        apt_install debootstrap
    fi
    BASE_IMAGE="$(as_root bash tools/container/build_base.sh | tail -n1)"
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || die "local base image was not built"
fi

# ----------------------------------------------------------------------------- 3. algorithm images
BUILT_HASH="$(tree_hash)"
for api in "${APIS[@]}"; do
    phase "image build ($api)"
    tag="$(image_of "$api")"
    BUILD_LOG="$CASES_DIR/docker-build-$api.log"
    if ! docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg API="$api" --tag "$tag" . >"$BUILD_LOG" 2>&1; then
        tail -40 "$BUILD_LOG" >&2
        die "docker build (API=$api) failed (full log: $BUILD_LOG)"
    fi
    grep -E '^(base image provides|WARNING|torch )' "$BUILD_LOG" | sed 's/^/[container-test]   build: /' || true
    USER_SPEC="$(docker image inspect -f '{{.Config.User}}' "$tag")"
    ENTRYPOINT="$(docker image inspect -f '{{json .Config.Entrypoint}}' "$tag")"
    LABEL="$(docker image inspect -f "{{index .Config.Labels \"$API_LABEL\"}}" "$tag")"
    [ -n "$USER_SPEC" ] || die "the image has no USER (grand-challenge expects a non-root user)"
    case "${USER_SPEC%%:*}" in 0|root) die "the image's USER is root ($USER_SPEC)";; esac
    [ "$LABEL" = "$api" ] || die "$tag: label $API_LABEL='$LABEL', expected '$api'"
    [ "$ENTRYPOINT" = "$(entrypoint_of "$api")" ] || die "$tag: ENTRYPOINT $ENTRYPOINT does not match its label $api"
    UID_IN="$(docker run --rm --network none --entrypoint id "$tag" -u)"
    GID_IN="$(docker run --rm --network none --entrypoint id "$tag" -g)"
    [ "$UID_IN" != 0 ] || die "the container runs as root (id -u = 0)"
    # Where pip installed the package (site-packages), from a neutral working folder.
    SITE="$(docker run --rm --network none --entrypoint python -w / "$tag" -c \
            'import algorithm, os; print(os.path.dirname(os.path.dirname(os.path.abspath(algorithm.__file__))))')"
    [ -n "$SITE" ] || die "$tag: python cannot import the algorithm package"
    CONTENTS="$(docker run --rm --network none --entrypoint sh "$tag" -c "ls -A /opt/app '$SITE'")"
    for unwanted in training tools test .venv .git data runs; do
        if printf '%s\n' "$CONTENTS" | grep -qx "$unwanted"; then die "$tag holds $unwanted in /opt/app or $SITE (.dockerignore)"; fi
    done
    IMAGE_HASH="$(docker run --rm --network none --entrypoint sh -w "$SITE" "$tag" -c "$TREE_HASH_CMD")"
    [ "$IMAGE_HASH" = "$BUILT_HASH" ] \
        || die "the image's $SITE/algorithm differs from the working tree's algorithm/ (hash $IMAGE_HASH != $BUILT_HASH): check .dockerignore and pyproject.toml's package data"
    BAKED="$(docker run --rm --network none --entrypoint sh "$tag" -c \
             'find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "*.safetensors" -print 2>/dev/null; ls -A /opt/ml 2>/dev/null' || true)"
    [ -z "$BAKED" ] || die "$tag contains weights: $BAKED (the submission image must hold none)"
    IMAGE_BYTES="$(docker image inspect -f '{{.Size}}' "$tag")"
    BASE_BYTES="$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")"
    log "image $tag: $((IMAGE_BYTES / 1000000)) MB (base $BASE_IMAGE: $((BASE_BYTES / 1000000)) MB); USER $USER_SPEC (uid $UID_IN); $API_LABEL=$LABEL; ENTRYPOINT $ENTRYPOINT; no weights inside"
done
# Old builds of these images (now untagged) only take disk space.
docker image prune -f --filter "$LABEL_FILTER" >/dev/null 2>&1 || true

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
    "$PY" tools/container/random_checkpoint.py --out "$MODEL_DIR/random-small.safetensors" \
        || die "could not write a random checkpoint (algorithm.model not ready?)"
    WEIGHTS_KIND="random"
fi
chmod 0755 "$MODEL_DIR"; chmod 0644 "$MODEL_DIR"/*.safetensors  # save_checkpoint writes 0600; uid 1001 must read it
WEIGHTS="$(ls "$MODEL_DIR"/*.safetensors)"
log "weights ($WEIGHTS_KIND): $WEIGHTS ($(du -h "$WEIGHTS" | cut -f1))"
# Random weights choose frames arbitrarily: only the contract is checked then, not the decision.
EXPECT_NORMAL="${EXPECT_NORMAL:-any}"
if [ "$WEIGHTS_KIND" = random ]; then EXPECT_EMPTY="${EXPECT_EMPTY:-any}"; else EXPECT_EMPTY="${EXPECT_EMPTY:-none}"; fi
if [[ " ${APIS[*]} " == *" exec "* ]]; then
    # What a participant uploads with `./export.sh -w`: the exec image with the weights in /opt/ml/model/.
    ./export.sh --api exec --tag "$IMAGE" --no-build --no-image -w "$WEIGHTS" >"$CASES_DIR/export.log" 2>&1 \
        || { tail -20 "$CASES_DIR/export.log" >&2; die "./export.sh -w failed (log: $CASES_DIR/export.log)"; }
    docker run --rm --network none --entrypoint ls "$IMAGE-weights" /opt/ml/model | grep -qx "$(basename "$WEIGHTS")" \
        || die "$IMAGE-weights does not hold $(basename "$WEIGHTS") in /opt/ml/model"
    log "baked: $IMAGE-weights (./export.sh -w $(basename "$WEIGHTS")), same label and entrypoint as $IMAGE"
fi

# ------------------------------------------------------------------------------------------ 5. cases
phase "cases and host runs"
make_case() {  # make_case NAME SEED [replica args...]; reuses a case generated by the same code and args
    local name="$1" seed="$2"; shift 2
    local dir="$CASES_DIR/$name" stamp
    stamp="$( (cat training/*.py training/data/*.py algorithm/config.py algorithm/biometry.py tools/container/make_case.py; echo "seed=$seed $*") \
              | sha256sum | cut -c1-16)"
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] && [ -f "$dir/input/inputs.json" ]; then
        log "case $name: reusing $dir"
        return 0
    fi
    local src="$CASES_DIR/.replica-$name"
    rm -rf "$src" "$dir"
    local t0=$SECONDS
    "$PY" -m training replica --out "$src" --cases 1 --seed "$seed" "$@" >"$CASES_DIR/replica-$name.log" 2>&1 \
        || { tail -20 "$CASES_DIR/replica-$name.log" >&2; die "training.data.replica failed for case $name"; }
    "$PY" tools/container/make_case.py --source "$src" --case-dir "$dir" >/dev/null
    chmod -R a+rX "$dir"   # readable by the container's user whatever the umask
    rm -rf "$src"
    echo "$stamp" >"$dir/.stamp"
    log "case $name: generated in $((SECONDS - t0)) s ($(du -sh "$dir/input" | cut -f1))"
}
# The normal case has the challenge's full size (6 sweeps x 140 frames); the no-abdomen case is shorter by
# default (6 x 50 frames) to save CI minutes, which also exercises a stack of another depth.
make_case normal 11 --frames-per-sweep 140
make_case no-abdomen 12 --no-abdomen --frames-per-sweep "${NO_ABDOMEN_FRAMES_PER_SWEEP:-50}"
# Bad input: a file that claims to be an image and is not (exit 2 in exec mode, 422 in invoke mode).
INPUT_FOLDER="$("$PY" -c 'from algorithm.contract import INPUT_FOLDER; print(INPUT_FOLDER)')"
rm -rf "$CASES_DIR/broken"; mkdir -p "$CASES_DIR/broken/input/$INPUT_FOLDER"
printf 'ObjectType = Image\nNDims = 3\nthis is not an image\n' >"$CASES_DIR/broken/input/$INPUT_FOLDER/broken.mha"
cp "$CASES_DIR/normal/input/inputs.json" "$CASES_DIR/broken/input/inputs.json"
chmod -R a+rX "$CASES_DIR/broken"
JOB_CASES=(normal no-abdomen broken)

# Reference: the same cases and weights outside the container, on the CPU.
for name in normal no-abdomen; do
    dir="$CASES_DIR/$name"; t0=$SECONDS
    rm -rf "$dir/output-host"
    "$PY" -m algorithm --input "$dir/input" --output "$dir/output-host" --weights "$WEIGHTS" --device cpu \
        >"$dir/host.log" 2>&1 || { tail -30 "$dir/host.log" >&2; die "case $name: host run failed (log: $dir/host.log)"; }
    log "case $name: host run $((SECONDS - t0)) s"
done

# --------------------------------------------------------------------------------- containers, shared
GPU_ARGS=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU_ARGS=(--gpus all)
    log "GPU present: containers get --gpus all"
fi
RESTRICTIONS=(--network none "${GPU_ARGS[@]}" --memory "$MEMORY" --memory-swap "$MEMORY" --security-opt no-new-privileges)

prepare_output() {  # a fresh output folder writable by the image's user only (as on grand-challenge)
    rm -rf "$1"; mkdir -p "$1"
    if [ "$(id -u)" = 0 ]; then chown "$UID_IN:$GID_IN" "$1"; else chmod 0777 "$1"; fi
}

check_diff() {  # check_diff CONTAINER: nothing written outside the mounts and the shim's own folders
    local unexpected
    unexpected="$(docker diff "$1" | awk '{print $2}' \
        | grep -vxE '/input|/output|/opt|/opt/ml|/opt/ml/model|/opt/ml/input(/data(/[^/]+-input)?)?|/shim|/cases|/results' || true)"
    [ -z "$unexpected" ] || die "the container wrote outside /output and /tmp: $(echo $unexpected)"
}

play_shim() {  # play_shim API IMAGE MOUNT_MODEL(1|0) [algorithm args...]: three jobs through tools/container/shim.py
    local api="$1" tag="$2" mount_model="$3"; shift 3
    local name="acouslic-test-$$-$api" results="$CASES_DIR/results-$api" logfile="$CASES_DIR/$api.log" status=0
    local extra=() jobs="$CASES_DIR/jobs-$api.json" cmd_json
    [ "$mount_model" = 0 ] || extra+=(--volume "$MODEL_DIR:/opt/ml/model:ro")
    rm -rf "$results"; mkdir -p "$results"
    "$PY" - "$jobs" "$@" <<'PY'
import json, sys
path, args = sys.argv[1], sys.argv[2:]
jobs = [{"pk": f"job{i + 1}-{name}", "source": f"/cases/{name}/input", "args": args,
         "expect": "failure" if name == "broken" else "success"} for i, name in enumerate(["normal", "no-abdomen", "broken"])]
json.dump(jobs, open(path, "w"), indent=2)
PY
    # The image's ENTRYPOINT + CMD, as the platform reads them from the image's configuration.
    mapfile -t cmd_json < <(docker image inspect -f '{{range .Config.Entrypoint}}{{println .}}{{end}}{{range .Config.Cmd}}{{println .}}{{end}}' "$tag" | sed '/^$/d')
    [ "$api" = invoke ] && cmd_json+=("$@")
    RUNNING="$name"
    docker volume create "$name-tmp" >/dev/null
    docker volume create "$name-data" >/dev/null
    timeout --kill-after=30 "$((CASE_TIMEOUT * 3 + 300))" docker run --name "$name" "${RESTRICTIONS[@]}" \
        --user 0:0 --cap-drop ALL \
        --cap-add SETUID --cap-add SETGID --cap-add KILL --cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER \
        --volume "$name-tmp:/tmp" --volume "$name-data:/opt/ml/input/data" \
        --volume "$CASES_DIR:/cases:ro" --volume "$results:/results" \
        --volume "$REPO_ROOT/tools/container:/shim:ro" \
        "${extra[@]}" \
        --entrypoint python "$tag" /shim/shim.py --api "$api" --user "$UID_IN:$GID_IN" \
        --jobs "/cases/$(basename "$jobs")" --results /results --results-owner "$(id -u):$(id -g)" \
        --health-interval "$HEALTH_INTERVAL" --job-timeout "$CASE_TIMEOUT" \
        -- "${cmd_json[@]}" >"$logfile" 2>&1 || status=$?
    check_diff "$name"
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker volume rm -f "$name-tmp" "$name-data" >/dev/null 2>&1 || true
    RUNNING=""
    "$PY" tools/container/check_shim.py --results "$results" --log "$logfile" \
        || { grep -E '^\[shim\]|error' "$logfile" | tail -30 >&2; die "$api: the platform's protocol was not followed (log: $logfile)"; }
    [ "$status" = 0 ] || { tail -30 "$logfile" >&2; die "$api: the shim exited with $status (log: $logfile)"; }
    grep -q "weights /opt/ml/model/" "$logfile" || die "$api: the weights did not come from /opt/ml/model (log: $logfile)"
}

compare_with_host() {  # compare_with_host API: each successful job's uploaded outputs against the host run
    local api="$1" results="$CASES_DIR/results-$1" name expect reference truth_args truth
    for name in normal no-abdomen; do
        local job; job="$(ls -d "$results"/job*-"$name" 2>/dev/null | head -n1)"
        [ -n "$job" ] || die "$api: no outputs uploaded for case $name"
        truth_args=()
        for truth in "$CASES_DIR/$name"/reference/*.mha; do [ -f "$truth" ] && truth_args=(--truth "$truth"); done
        reference=(--reference "$CASES_DIR/$name/output-host")
        [ "${#GPU_ARGS[@]}" = 0 ] || reference=()   # GPU numerics differ from the CPU host run: contract only
        "$PY" tools/check_outputs.py --input "$CASES_DIR/$name/input" --output "$job/output" \
            "${reference[@]}" "${truth_args[@]}" --label "$api: $name (container vs host)" \
            || die "$api: case $name: container outputs violate the contract or differ from the host run"
        expect="$EXPECT_NORMAL"; [ "$name" = normal ] || expect="$EXPECT_EMPTY"
        if [ "$expect" != any ]; then
            "$PY" tools/check_outputs.py --input "$CASES_DIR/$name/input" --output "$job/output" \
                --expect "$expect" --label "$api: $name (expected: $expect)" \
                || die "$api: case $name: wrong decision with $WEIGHTS_KIND weights (container and host agree; EXPECT_$( [ "$name" = normal ] && echo NORMAL || echo EMPTY)=any relaxes this)"
        fi
    done
}

# --------------------------------------------------------------------------------------------- 6. exec
if [[ " ${APIS[*]} " == *" exec "* ]]; then
    phase "exec: no weights, docker stop"
    # The image alone, as `docker run` starts it (its init as PID 1), restricted as far as Docker allows.
    name="acouslic-test-$$-plain"; out="$CASES_DIR/output-plain"
    prepare_output "$out"
    status=0
    docker run --rm --name "$name" "${RESTRICTIONS[@]}" --cap-drop ALL --read-only --tmpfs /tmp \
        --volume "$CASES_DIR/normal/input:/input:ro" --volume "$out:/output" "$IMAGE" \
        >"$CASES_DIR/no-weights.log" 2>&1 || status=$?
    [ "$status" = 3 ] || { tail -5 "$CASES_DIR/no-weights.log" >&2; die "without weights the image exited $status, expected 3"; }
    grep -q '^error: ' "$CASES_DIR/no-weights.log" || die "without weights: no one-line 'error:' (log: $CASES_DIR/no-weights.log)"
    log "no weights: exit 3, $(grep '^error: ' "$CASES_DIR/no-weights.log" | head -n1)"

    prepare_output "$out"
    RUNNING="$name"
    docker run -d --name "$name" "${RESTRICTIONS[@]}" --cap-drop ALL --read-only --tmpfs /tmp \
        --volume "$CASES_DIR/normal/input:/input:ro" --volume "$out:/output" \
        --volume "$MODEL_DIR:/opt/ml/model:ro" "$IMAGE" >/dev/null
    # The whole log in one string: `docker logs | grep -q` under pipefail fails when grep's early exit
    # SIGPIPEs docker logs, so a log that holds the line could read as one that does not.
    reached_network() { [[ "$(docker logs "$name" 2>&1)" == *" INFO weights "* ]]; }
    for _ in $(seq 600); do reached_network && break; sleep 0.5; done
    reached_network || die "docker stop: the case did not reach its network pass"
    sleep 1
    t0="$(date +%s.%N)"
    docker stop -t 10 "$name" >/dev/null
    took="$(echo "$(date +%s.%N) - $t0" | bc)"
    code="$(docker inspect -f '{{.State.ExitCode}}' "$name")"
    docker logs "$name" >"$CASES_DIR/docker-stop.log" 2>&1 || true
    docker rm -f "$name" >/dev/null; RUNNING=""
    log "docker stop during a case: exit code $code after $took s (limit $STOP_LIMIT s)"
    awk -v t="$took" -v l="$STOP_LIMIT" 'BEGIN { exit !(t < l) }' \
        || die "docker stop took $took s: SIGTERM did not end the algorithm (is the init PID 1?)"
    leftovers="$(find "$out" -mindepth 1 \( -name '*partial*' -o -name output.mha -o -name '*.json' \) -print)"
    [ -z "$leftovers" ] || die "docker stop left $leftovers"

    phase "exec: three jobs through the shim"
    play_shim exec "$IMAGE-weights" 0
    compare_with_host exec
    if [ "${#GPU_ARGS[@]}" -gt 0 ]; then  # the GPU run was checked against the contract; compare a CPU run too
        GPU_ARGS=(); RESTRICTIONS=(--network none --memory "$MEMORY" --memory-swap "$MEMORY" --security-opt no-new-privileges)
        play_shim exec "$IMAGE-weights" 0 --device cpu
        compare_with_host exec
    fi
fi

# ------------------------------------------------------------------------------------------- 7. invoke
if [[ " ${APIS[*]} " == *" invoke "* ]]; then
    phase "invoke: three jobs through the shim"
    play_shim invoke "$(image_of invoke)" 1
    compare_with_host invoke
fi
phase ""
docker system df 2>/dev/null | sed 's/^/[container-test]   /' || true
