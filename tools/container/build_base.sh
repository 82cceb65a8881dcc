#!/usr/bin/env bash
# Build (or reuse) a local stand-in for the PyTorch CUDA runtime base image.
#
# Used by tools/run_container.sh when the Dockerfile's default BASE_IMAGE cannot be
# pulled (no registry reachable). Recipe: debootstrap a minimal Debian bookworm
# (python3 3.11, matching the cp311 wheels on the host), create /opt/venv inside it,
# pip-install the container's requirements (pyproject.toml's runtime dependencies at
# constraints.txt's versions, as tools/container/runtime_requirements.py lists them) into
# that venv with the host's pip configuration and local wheel folders bind-mounted into
# the chroot, strip caches, `docker import`. The Dockerfile's own install then finds
# everything in place and needs no network.
#
# The image is tagged by a hash of those inputs and this recipe, so it is built once per
# machine and reused afterwards. Prints the tag as the last line of stdout;
# all progress goes to stderr.
#
# usage: tools/container/build_base.sh            (needs root, debootstrap, docker)
# env:   BASE_REPO   image repository name      (default acouslic-local-base)
#        DEBIAN_MIRROR                          (default http://deb.debian.org/debian)
#        BASE_WORKDIR where the rootfs is built (default /var/tmp)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
INPUTS=("$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt" "$HERE/runtime_requirements.py")
BASE_REPO="${BASE_REPO:-acouslic-local-base}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

log() { echo "[build_base] $*" >&2; }

HASH="$(cat "${INPUTS[@]}" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)"
TAG="$BASE_REPO:$HASH"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    log "reusing cached base image $TAG"
    echo "$TAG"
    exit 0
fi

[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, chroot, mount)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap missing"; exit 1; }

WORK="$(mktemp -d "${BASE_WORKDIR:-/var/tmp}/acouslic-base.XXXXXX")"
ROOTFS="$WORK/rootfs"
MOUNTS=()

cleanup() {
    local i
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do
        umount -l "${MOUNTS[$i]}" 2>/dev/null || true
    done
    # Never delete through a bind mount that is still attached (it would reach the host's files).
    if awk -v root="$ROOTFS" 'index($2, root) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        log "mounts remain under $ROOTFS: not deleting $WORK"
    else
        rm -rf --one-file-system "$WORK"
    fi
}
trap cleanup EXIT

bind() {  # bind SRC DST [ro]
    local src="$1" dst="$ROOTFS$2"
    [ -e "$src" ] || return 0
    if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; touch "$dst"; fi
    mount --bind "$src" "$dst"
    MOUNTS+=("$dst")
    if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$dst"; fi
}

t0=$SECONDS
log "debootstrap $SUITE (minbase) into $ROOTFS from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -30 "$WORK/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
log "debootstrap done in $((SECONDS - t0)) s"

t1=$SECONDS
mount -t proc proc "$ROOTFS/proc"; MOUNTS+=("$ROOTFS/proc")
bind /dev /dev
# Host pip configuration (constraints, find-links, extra-index-url) and the local
# wheel folders it names, read-only; DNS and CA bundle for anything that must come from PyPI.
bind /etc/xdg/pip /etc/xdg/pip ro
for d in /opt/wheels /opt/pypi /opt/pypi-more; do bind "$d" "$d" ro; done
cp -L /etc/resolv.conf "$WORK/resolv.conf" 2>/dev/null && bind "$WORK/resolv.conf" /etc/resolv.conf ro
HOST_CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$HOST_CA" ] && { cp -L "$HOST_CA" "$WORK/host-ca.crt"; bind "$WORK/host-ca.crt" /tmp/host-ca.crt ro; }
mkdir -p "$ROOTFS/tmp/src"; cp "${INPUTS[@]}" "$ROOTFS/tmp/src/"

PIP_ENV=(PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
         HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
         PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}")
[ -f "$WORK/host-ca.crt" ] && PIP_ENV+=(PIP_CERT=/tmp/host-ca.crt)
# Pass through the host's pip settings given as environment variables (find-links etc.).
while IFS= read -r kv; do PIP_ENV+=("$kv"); done < <(env | grep -E '^PIP_(FIND_LINKS|INDEX_URL|EXTRA_INDEX_URL|CONSTRAINT|TRUSTED_HOST)=' || true)

log "creating /opt/venv and installing the container's requirements"
chroot "$ROOTFS" /usr/bin/env -i "${PIP_ENV[@]}" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOTFS" /usr/bin/env -i "${PIP_ENV[@]}" /opt/venv/bin/python /tmp/src/runtime_requirements.py \
    /tmp/src/pyproject.toml /tmp/src/constraints.txt /tmp/pip >&2
chroot "$ROOTFS" /usr/bin/env -i "${PIP_ENV[@]}" /opt/venv/bin/python -m pip install \
    --quiet --no-cache-dir -r /tmp/pip/requirements.txt -c /tmp/pip/constraints.txt >&2
chroot "$ROOTFS" /usr/bin/env -i "${PIP_ENV[@]}" /opt/venv/bin/python -c \
    "import torch, torchvision, open_clip, peft, safetensors, SimpleITK, cv2, scipy, numpy, PIL, rich; print('[build_base] imports ok: torch', torch.__version__, 'torchvision', torchvision.__version__)" >&2
log "pip install done in $((SECONDS - t1)) s"

# Unmount before packing so nothing from the host ends up in the image.
for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[$i]}" || umount -l "${MOUNTS[$i]}"; done
MOUNTS=()
if awk -v root="$ROOTFS" 'index($2, root) == 1 { found = 1 } END { exit !found }' /proc/mounts; then
    log "mounts remain under $ROOTFS after unmounting; not packing it"; exit 1
fi
rm -rf "$ROOTFS/tmp/src" "$ROOTFS/tmp/pip" "$ROOTFS/tmp/host-ca.crt" "$ROOTFS/etc/resolv.conf"
rmdir -p "$ROOTFS/etc/xdg/pip" "$ROOTFS/opt/wheels" "$ROOTFS/opt/pypi" "$ROOTFS/opt/pypi-more" 2>/dev/null || true
mkdir -p "$ROOTFS/opt"
rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/root/.cache "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
chmod 1777 "$ROOTFS/tmp" "$ROOTFS/var/tmp"

t2=$SECONDS
log "importing rootfs ($(du -sh "$ROOTFS" | cut -f1)) as $TAG"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV LC_ALL=C.UTF-8' \
    --change 'ENV VIRTUAL_ENV=/opt/venv' \
    --change 'CMD ["python"]' \
    --message "local stand-in for the PyTorch runtime base (debootstrap $SUITE + venv, requirements hash $HASH)" \
    - "$TAG" >&2
log "import done in $((SECONDS - t2)) s; total $((SECONDS - t0)) s"
# Older stand-ins (other requirements / recipe) only take disk space: untag them (their layers go
# once no image built on them remains).
docker image ls --format '{{.Repository}}:{{.Tag}}' "$BASE_REPO" | grep -vxF "$TAG" \
    | xargs -r docker rmi >/dev/null 2>&1 || true
docker image ls "$TAG" >&2
echo "$TAG"
