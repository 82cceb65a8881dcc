#!/usr/bin/env bash
# Build the submission image and write the two files grand-challenge takes:
#
#   <out>/<name>_<date>.tar.gz   docker save | gzip   -> Algorithm > Containers > Upload a container
#   <out>/model.tar.gz           the weights           -> Algorithm > Models > Upload a model
#                                (grand-challenge unpacks it to /opt/ml/model/, which the CLI prefers
#                                 over the weights bundled in the image)
#
# usage: ./export.sh [-n NAME] [-b BASE_IMAGE] [-o OUT_DIR] [-w WEIGHTS] [--no-build] [--no-model] [--no-image]
#   -n, --name NAME        image name (env IMAGE_NAME; default acouslic-fetalclipseg)
#   -b, --base IMAGE       base image build-arg (env BASE_IMAGE; default: the Dockerfile's)
#   -o, --out DIR          output folder (env OUTPUT_DIR; default build/export)
#   -w, --weights FILE     checkpoint for model.tar.gz (env WEIGHTS; default: the single
#                          algorithm/weights/*.safetensors)
#   --no-build             export the existing NAME:latest image without rebuilding
#   --no-model             do not write model.tar.gz
#   --no-image             do not write the image tarball (model tarball only)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

NAME="${IMAGE_NAME:-acouslic-fetalclipseg}"
BASE="${BASE_IMAGE:-}"
OUT="${OUTPUT_DIR:-build/export}"
WEIGHTS="${WEIGHTS:-}"
BUILD=1 MODEL=1 SAVE=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--name) NAME="$2"; shift 2;;
        -b|--base) BASE="$2"; shift 2;;
        -o|--out) OUT="$2"; shift 2;;
        -w|--weights) WEIGHTS="$2"; shift 2;;
        --no-build) BUILD=0; shift;;
        --no-model) MODEL=0; shift;;
        --no-image) SAVE=0; shift;;
        -h|--help) usage 0;;
        *) echo "export.sh: unknown option $1" >&2; usage 2 >&2;;
    esac
done

log() { echo "[export] $*"; }
die() { echo "[export] error: $*" >&2; exit 1; }
human() { numfmt --to=si --suffix=B "$1" 2>/dev/null || echo "$1 bytes"; }

command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd / Docker Desktop)"
mkdir -p "$OUT"
STAMP="$(date +%Y%m%d)"
IMAGE="$NAME:latest"

# ------------------------------------------------------------------------------------ weights
if [ "$MODEL" = 1 ]; then
    if [ -z "$WEIGHTS" ]; then
        shopt -s nullglob; found=(algorithm/weights/*.safetensors); shopt -u nullglob
        [ "${#found[@]}" = 1 ] || die "pass -w WEIGHTS (found ${#found[@]} files in algorithm/weights/)"
        WEIGHTS="${found[0]}"
    fi
    [ -f "$WEIGHTS" ] || die "weights file $WEIGHTS does not exist"
fi

# -------------------------------------------------------------------------------------- image
if [ "$BUILD" = 1 ]; then
    args=(--tag "$IMAGE" --tag "$NAME:$STAMP")
    [ -z "$BASE" ] || args+=(--build-arg "BASE_IMAGE=$BASE")
    # grand-challenge runs linux/amd64; only pass --platform where BuildKit/buildx is available.
    if docker buildx version >/dev/null 2>&1; then args+=(--platform linux/amd64); fi
    log "docker build ${args[*]} ."
    docker build "${args[@]}" .
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE not found"
arch="$(docker image inspect -f '{{.Os}}/{{.Architecture}}' "$IMAGE")"
[ "$arch" = linux/amd64 ] || log "WARNING: $IMAGE is $arch; grand-challenge needs linux/amd64"

if [ "$SAVE" = 1 ]; then
    IMAGE_TAR="$OUT/${NAME}_${STAMP}.tar.gz"
    log "docker save $IMAGE | gzip > $IMAGE_TAR (several minutes for a multi-GB image)"
    if command -v pigz >/dev/null; then zip=(pigz -c); else zip=(gzip -c); fi
    docker save "$IMAGE" | "${zip[@]}" >"$IMAGE_TAR.partial"
    mv "$IMAGE_TAR.partial" "$IMAGE_TAR"
fi

# ---------------------------------------------------------------------------------- model.tar.gz
if [ "$MODEL" = 1 ]; then
    MODEL_TAR="$OUT/model.tar.gz"
    stage="$(mktemp -d)"; trap 'rm -rf "$stage"' EXIT
    cp "$WEIGHTS" "$stage/"
    # Readable by the container's non-root user whatever the local file mode (save_checkpoint writes 0600).
    tar --create --gzip --file "$MODEL_TAR.partial" --directory "$stage" \
        --owner=0 --group=0 --numeric-owner --mode='a+rX,u+w' "$(basename "$WEIGHTS")"
    mv "$MODEL_TAR.partial" "$MODEL_TAR"
fi

# ------------------------------------------------------------------------------------- summary
echo
log "image: $IMAGE ($arch, $(human "$(docker image inspect -f '{{.Size}}' "$IMAGE")") unpacked)"
if [ "$SAVE" = 1 ]; then
    log "  $IMAGE_TAR  $(human "$(stat -c %s "$IMAGE_TAR")")"
    log "  -> grand-challenge: your algorithm > Containers > Upload a container (image tarball)"
fi
if [ "$MODEL" = 1 ]; then
    log "  $MODEL_TAR  $(human "$(stat -c %s "$MODEL_TAR")")  (contents: $(tar -tzf "$MODEL_TAR" | tr '\n' ' '))"
    log "  -> grand-challenge: your algorithm > Models > Upload a model (unpacked to /opt/ml/model/)"
fi
log "sockets: input stacked-fetal-ultrasound; outputs fetal-abdomen-segmentation, fetal-abdomen-frame-number"
log "settings: GPU required (T4, 16 GB), memory >= 16 GB; the container needs no network"
