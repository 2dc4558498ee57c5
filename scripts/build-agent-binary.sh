#!/usr/bin/env bash
# Build the tether-agent binary as the agent image ships it (the `agent`
# profile of Cargo.toml: release, linked as one unit) and print its path.
# Static if possible, so it runs FROM scratch and maps no shared libraries:
# musl first; else glibc with crt-static; else a dynamically linked glibc
# binary (scripts/build-agent-image.sh then copies its libraries).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
ARCH="$(uname -m)"
log() { echo "build-agent-binary: $*" >&2; }

MUSL="$ARCH-unknown-linux-musl"
if command -v rustup >/dev/null 2>&1; then
    rustup target add "$MUSL" >&2 || log "rustup target add $MUSL failed (continuing)"
fi
if cargo build --profile agent --locked --target "$MUSL" --bin tether-agent >&2; then
    echo "$TARGET_DIR/$MUSL/agent/tether-agent"
    exit 0
fi
log "static musl build failed (ring needs a musl C compiler); trying static glibc"

# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
GNU="$ARCH-unknown-linux-gnu"
if RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --profile agent --locked --target "$GNU" --bin tether-agent >&2 &&
    LC_ALL=C ldd "$TARGET_DIR/$GNU/agent/tether-agent" 2>&1 | grep -Eq 'statically linked|not a dynamic'; then
    echo "$TARGET_DIR/$GNU/agent/tether-agent"
    exit 0
fi
log "static glibc build failed; falling back to a dynamically linked glibc build"
cargo build --profile agent --locked --bin tether-agent >&2
echo "$TARGET_DIR/agent/tether-agent"
