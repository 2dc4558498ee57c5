#!/usr/bin/env bash
# Build the tether agent image (FROM scratch, see ./Dockerfile).
#
# Usage: scripts/build-agent-image.sh [--binary PATH] [--tag TAG] [--label K=V]...
#   --binary PATH  use this tether-agent binary as-is (default:
#                  scripts/build-agent-binary.sh: static if possible)
#   --tag TAG      image tag (default: tether-agent:latest)
#   --label K=V    extra image label (repeatable)
# A dynamically linked binary gets every library `ldd` lists copied alongside it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="tether-agent:latest"
BINARY=""
LABELS=()

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }
log() { echo "build-agent-image: $*" >&2; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; BINARY="$2"; shift ;;
        --binary=*) BINARY="${1#*=}" ;;
        --tag) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; TAG="$2"; shift ;;
        --tag=*) TAG="${1#*=}" ;;
        --label) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; LABELS+=("$2"); shift ;;
        --label=*) LABELS+=("${1#*=}") ;;
        -h | --help) usage; exit 0 ;;
        *) log "unknown argument: $1"; usage >&2; exit 2 ;;
    esac
    shift
done

for l in ${LABELS[@]+"${LABELS[@]}"}; do
    [[ "$l" == ?*=* ]] || { log "label must be K=V: $l"; exit 2; }
done

cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

if [[ -z "$BINARY" ]]; then
    BINARY="$("$ROOT/scripts/build-agent-binary.sh")"
fi

if [[ ! -f "$BINARY" || ! -x "$BINARY" ]]; then
    log "not an executable file: $BINARY"
    exit 1
fi

CTX="$(mktemp -d)"
trap 'rm -rf "$CTX"' EXIT
RFS="$CTX/rootfs"
mkdir -p "$RFS/usr/local/bin" "$RFS/var/lib/tether" "$RFS/tmp"
chmod 1777 "$RFS/tmp"
cp -L "$BINARY" "$RFS/usr/local/bin/tether-agent"
chmod 0755 "$RFS/usr/local/bin/tether-agent"

# Dynamic binary: copy every absolute path ldd reports (libraries and the ELF
# interpreter) to the same place in the rootfs. Static binaries list none.
ldd_out="$(LC_ALL=C ldd "$BINARY" 2>&1 || true)"
if grep -q 'not found' <<<"$ldd_out"; then
    printf '%s\n' "$ldd_out" >&2
    log "$BINARY needs libraries that are not installed here"
    exit 1
fi
libs=0
while IFS= read -r lib; do
    [[ -n "$lib" && -e "$lib" ]] || continue
    mkdir -p "$RFS$(dirname "$lib")"
    cp -L "$lib" "$RFS$lib"
    libs=$((libs + 1))
done < <(printf '%s\n' "$ldd_out" | grep -o '/[^ ]*' | sort -u)
if [[ "$libs" -gt 0 ]]; then
    log "dynamically linked binary: copied $libs libraries into the image"
else
    log "statically linked binary"
fi

cp "$ROOT/Dockerfile" "$CTX/Dockerfile"

build_args=(-t "$TAG")
for l in ${LABELS[@]+"${LABELS[@]}"}; do
    build_args+=(--label "$l")
done
docker build "${build_args[@]}" "$CTX" >&2

echo "$TAG"
