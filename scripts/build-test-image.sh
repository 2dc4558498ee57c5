#!/usr/bin/env bash
# Build the sandbox test image `tether-test-busybox:latest` (label tether.test=1):
# a FROM-scratch image holding Debian's static busybox plus one symlink per applet.
# Nothing is pulled; the image is built from a locally staged rootfs.
#
# Usage: scripts/build-test-image.sh [--force]
#   --force   rebuild even if the image already exists
# Env: BUSYBOX=/path/to/static/busybox  use this binary instead of looking for one.
set -euo pipefail

IMAGE="tether-test-busybox:latest"
LABEL="tether.test=1"
FORCE=0

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build-test-image: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { echo "build-test-image: $*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    log "docker is not installed"
    exit 1
fi

if [[ "$FORCE" -eq 0 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists (use --force to rebuild)"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# is_static FILE: true when FILE is a statically linked executable.
is_static() {
    local f="$1" out
    [[ -f "$f" && -x "$f" ]] || return 1
    if command -v file >/dev/null 2>&1; then
        out="$(file -L "$f" 2>/dev/null || true)"
        case "$out" in
            *"statically linked"* | *"static-pie linked"*) return 0 ;;
            *"dynamically linked"*) return 1 ;;
        esac
    fi
    out="$(LC_ALL=C ldd "$f" 2>&1 || true)"
    case "$out" in
        *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
    esac
    return 1
}

# download_static: fetch busybox-static's .deb and unpack it; prints the binary path.
download_static() {
    local dl="$WORK/deb"
    mkdir -p "$dl"
    if ! (cd "$dl" && apt-get download busybox-static) >/dev/null 2>&1; then
        log "apt-get download failed; running apt-get update once"
        apt-get update >/dev/null 2>&1 || true
        (cd "$dl" && apt-get download busybox-static) >/dev/null 2>&1 || return 1
    fi
    local deb
    for deb in "$dl"/busybox-static_*.deb; do
        [[ -f "$deb" ]] || return 1
        dpkg-deb -x "$deb" "$dl/x" || return 1
        break
    done
    [[ -x "$dl/x/bin/busybox" ]] || return 1
    printf '%s\n' "$dl/x/bin/busybox"
}

find_busybox() {
    local bb
    if [[ -n "${BUSYBOX:-}" ]]; then
        if is_static "$BUSYBOX"; then
            printf '%s\n' "$BUSYBOX"
            return 0
        fi
        log "BUSYBOX=$BUSYBOX is not a static executable"
        return 1
    fi
    if is_static /bin/busybox; then
        printf '%s\n' /bin/busybox
        return 0
    fi
    if command -v apt-get >/dev/null 2>&1; then
        if bb="$(download_static)" && is_static "$bb"; then
            printf '%s\n' "$bb"
            return 0
        fi
        log "could not download busybox-static; trying apt-get install -y busybox-static"
        if apt-get install -y busybox-static >/dev/null 2>&1 && is_static /bin/busybox; then
            printf '%s\n' /bin/busybox
            return 0
        fi
    fi
    log "no static busybox found (install busybox-static, or set BUSYBOX=/path/to/busybox)"
    return 1
}

BB="$(find_busybox)"
log "using static busybox: $BB ($("$BB" 2>&1 | head -n1 || true))"

# Stage the rootfs.
CTX="$WORK/context"
ROOTFS="$CTX/rootfs"
mkdir -p "$ROOTFS/bin" "$ROOTFS/etc" "$ROOTFS/root" "$ROOTFS/proc" "$ROOTFS/sys" \
    "$ROOTFS/dev" "$ROOTFS/tmp"
chmod 1777 "$ROOTFS/tmp"
chmod 0700 "$ROOTFS/root"
cp "$BB" "$ROOTFS/bin/busybox"
chmod 0755 "$ROOTFS/bin/busybox"

count=0
while IFS= read -r applet; do
    [[ -n "$applet" && "$applet" != "busybox" && "$applet" != */* ]] || continue
    ln -sf busybox "$ROOTFS/bin/$applet"
    count=$((count + 1))
done < <("$BB" --list)
ln -sf busybox "$ROOTFS/bin/sh"

cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
chmod 0644 "$ROOTFS/etc/passwd" "$ROOTFS/etc/group"

cat >"$CTX/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
LABEL ${LABEL}
CMD ["sh"]
EOF

log "building $IMAGE ($count applets)"
# Keep the (legacy builder) chatter out of test output; show it only on failure.
if ! build_out="$(docker build -q --label "$LABEL" -t "$IMAGE" "$CTX" 2>&1)"; then
    printf '%s\n' "$build_out" >&2
    log "docker build failed"
    exit 1
fi

out="$(docker run --rm --label "$LABEL" "$IMAGE" sh -c 'echo ok')"
if [[ "$out" != "ok" ]]; then
    log "verification failed: expected 'ok', got '$out'"
    exit 1
fi
log "built and verified $IMAGE"
