#!/usr/bin/env bash
# Installs Debian's chromium (no recommends, about 25 packages) for the
# preview test that loads a worker's page in a real headless browser.
# Does nothing when a chromium is already on PATH; needs root and apt-get
# otherwise, and says so when it cannot (the browser test then fails under
# CI=true and is skipped elsewhere).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: chromium is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 ||
        echo "install-browser: apt-get install chromium failed" >&2
fi
command -v chromium >/dev/null 2>&1 && echo "install-browser: $(chromium --version 2>/dev/null)"
exit 0
