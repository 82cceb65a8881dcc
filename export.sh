#!/usr/bin/env bash
# Build the submission image and write the files grand-challenge takes:
#
#   <out>/<name>_<api>[-weights]_<date>.tar.gz   docker save | gzip -> Algorithm > Containers > Upload a container
#   <out>/model.tar.gz (with -m)                  the weights          -> Algorithm > Models > Upload a model
#                                                 (unpacked to /opt/ml/model/, where the algorithm looks)
#
# The image holds no weights unless -w bakes them in (into /opt/ml/model/, in a layer on top of the image).
# Give the weights one way only: baked in (-w), or as the model tarball (-m) uploaded beside the image;
# both at once put two checkpoints in /opt/ml/model/, which the algorithm refuses.
#
# usage: ./export.sh [--api exec|invoke] [-w WEIGHTS] [-m MODEL] [-n NAME | -t TAG] [-b BASE_IMAGE] [-o OUT_DIR]
#                    [--no-build] [--no-image]
#   --api exec|invoke      how grand-challenge runs the image (env API; default exec): exec starts the
#                          container once per job; invoke starts it once and sends each job to its
#                          server (label org.grand-challenge.api-method; see the README)
#   -w, --weights FILE     bake FILE into the image at /opt/ml/model/ (env WEIGHTS)
#   -m, --model FILE       write model.tar.gz holding FILE (env MODEL)
#   -n, --name NAME        image name (env IMAGE_NAME; default acouslic-fetalclipseg); tags NAME:API,
#                          NAME:API-<date> and, with -w, NAME:API-weights
#   -t, --tag TAG          the image's tag instead of NAME:API (with -w, the baked one is TAG-weights)
#   -b, --base IMAGE       base image build-arg (env BASE_IMAGE; default: the Dockerfile's)
#   -o, --out DIR          output folder (env OUTPUT_DIR; default build/export)
#   --no-build             use the existing image (NAME:API or TAG) instead of building it
#   --no-image             do not write the image tarball (build and bake only, or the model tarball only)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

NAME="${IMAGE_NAME:-acouslic-fetalclipseg}"
API="${API:-exec}"
BASE="${BASE_IMAGE:-}"
OUT="${OUTPUT_DIR:-build/export}"
WEIGHTS="${WEIGHTS:-}"
MODEL="${MODEL:-}"
TAG=""
BUILD=1 SAVE=1
# The algorithm's sockets as algorithm/contract.py names them (INPUT_SLUG, MASK_SLUG, FRAME_SLUG), for the summary
SOCKETS="input stacked-fetal-ultrasound; outputs fetal-abdomen-segmentation, fetal-abdomen-frame-number"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --api) API="${2:-}"; shift 2;;
        --api=*) API="${1#--api=}"; shift;;
        -w|--weights) WEIGHTS="$2"; shift 2;;
        -m|--model) MODEL="$2"; shift 2;;
        -n|--name) NAME="$2"; shift 2;;
        -t|--tag) TAG="$2"; shift 2;;
        -b|--base) BASE="$2"; shift 2;;
        -o|--out) OUT="$2"; shift 2;;
        --no-build) BUILD=0; shift;;
        --no-image) SAVE=0; shift;;
        -h|--help) usage 0;;
        *) echo "export.sh: unknown option $1" >&2; usage 2 >&2;;
    esac
done

log() { echo "[export] $*"; }
provenance() {  # provenance FILE: the provenance our checkpoints carry in their safetensors header
    python3 -c 'import json, struct, sys
with open(sys.argv[1], "rb") as fh:
    header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
print(header.get("__metadata__", {}).get("provenance", "(none recorded)"))' "$1" 2>/dev/null || echo "(unreadable)"
}
die() { echo "[export] error: $*" >&2; exit 1; }
human() { numfmt --to=si --suffix=B "$1" 2>/dev/null || echo "$1 bytes"; }

case "$API" in exec|invoke) ;; *) die "--api must be exec or invoke, not '$API'";; esac
for file in "$WEIGHTS" "$MODEL"; do
    [ -z "$file" ] || [ -f "$file" ] || die "weights file $file does not exist"
    case "$file" in ''|*.safetensors) ;; *) die "$file: expected a .safetensors checkpoint";; esac
done
command -v docker >/dev/null || die "docker not found"
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd / Docker Desktop)"
mkdir -p "$OUT"
STAMP="$(date +%Y%m%d)"
IMAGE="${TAG:-$NAME:$API}"

# -------------------------------------------------------------------------------------- image
if [ "$BUILD" = 1 ]; then
    args=(--tag "$IMAGE" --build-arg "API=$API")
    [ -n "$TAG" ] || args+=(--tag "$NAME:$API-$STAMP")
    [ -z "$BASE" ] || args+=(--build-arg "BASE_IMAGE=$BASE")
    # grand-challenge runs linux/amd64; only pass --platform where BuildKit/buildx is available.
    if docker buildx version >/dev/null 2>&1; then args+=(--platform linux/amd64); fi
    log "docker build ${args[*]} ."
    docker build "${args[@]}" .
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "image $IMAGE not found"
label="$(docker image inspect -f '{{index .Config.Labels "org.grand-challenge.api-method"}}' "$IMAGE")"
[ "$label" = "$API" ] || die "$IMAGE is labelled api-method '$label', not '$API'"

# ------------------------------------------------------------------------------- baked weights
if [ -n "$WEIGHTS" ]; then
    # A layer on top of the image: COPY from a context that holds only the checkpoint, so the main
    # Dockerfile never sees weights. The label, entrypoint and user are inherited.
    stage="$(mktemp -d)"; trap 'rm -rf "$stage"' EXIT
    cp "$WEIGHTS" "$stage/"; chmod 0644 "$stage/$(basename "$WEIGHTS")"  # save_checkpoint writes 0600
    printf 'FROM %s\nCOPY %s /opt/ml/model/\n' "$IMAGE" "$(basename "$WEIGHTS")" >"$stage/Dockerfile"
    log "baking $(basename "$WEIGHTS") into $IMAGE-weights at /opt/ml/model/"
    docker build --quiet --tag "$IMAGE-weights" "$stage" >/dev/null
    IMAGE="$IMAGE-weights"
else
    log "NOTE: $IMAGE holds no weights: upload a model tarball (-m) beside it, or bake them in with -w"
fi
arch="$(docker image inspect -f '{{.Os}}/{{.Architecture}}' "$IMAGE")"
[ "$arch" = linux/amd64 ] || log "WARNING: $IMAGE is $arch; grand-challenge needs linux/amd64"

if [ "$SAVE" = 1 ]; then
    IMAGE_TAR="$OUT/$(basename "${IMAGE%:*}")_${IMAGE##*:}_${STAMP}.tar.gz"
    log "docker save $IMAGE | gzip > $IMAGE_TAR (several minutes for a multi-GB image)"
    if command -v pigz >/dev/null; then zip=(pigz -c); else zip=(gzip -c); fi
    docker save "$IMAGE" | "${zip[@]}" >"$IMAGE_TAR.partial"
    mv "$IMAGE_TAR.partial" "$IMAGE_TAR"
fi

# ---------------------------------------------------------------------------------- model.tar.gz
if [ -n "$MODEL" ]; then
    MODEL_TAR="$OUT/model.tar.gz"
    model_stage="$(mktemp -d)"
    cp "$MODEL" "$model_stage/"
    # Readable by the container's non-root user whatever the local file mode (save_checkpoint writes 0600).
    tar --create --gzip --file "$MODEL_TAR.partial" --directory "$model_stage" \
        --owner=0 --group=0 --numeric-owner --mode='a+rX,u+w' "$(basename "$MODEL")"
    rm -rf "$model_stage"
    mv "$MODEL_TAR.partial" "$MODEL_TAR"
fi

# ------------------------------------------------------------------------------------- summary
echo
log "image: $IMAGE ($arch, $(human "$(docker image inspect -f '{{.Size}}' "$IMAGE")") unpacked), api-method $API"
log "  entrypoint $(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")"
if [ "$SAVE" = 1 ]; then
    log "  $IMAGE_TAR  $(human "$(stat -c %s "$IMAGE_TAR")")"
    log "  -> grand-challenge: your algorithm > Containers > Upload a container (image tarball)"
fi
if [ -n "$MODEL" ]; then
    log "  $MODEL_TAR  $(human "$(stat -c %s "$MODEL_TAR")")  (contents: $(tar -tzf "$MODEL_TAR" | tr '\n' ' '))"
    log "  -> grand-challenge: your algorithm > Models > Upload a model (unpacked to /opt/ml/model/)"
fi
log "sockets: $SOCKETS"
log "settings: GPU required (T4, 16 GB), memory >= 16 GB; the container needs no network"
for file in "$WEIGHTS" "$MODEL"; do
    [ -z "$file" ] || log "weights $(basename "$file"): $(provenance "$file")"
done
log "licences: the code is Apache-2.0; weights made from the FetalCLIP weights (CC BY-NC 4.0) or the"
log "  ACOUSLIC-AI data (CC BY-NC-SA 4.0) inherit their non-commercial terms (README, Licences)"
