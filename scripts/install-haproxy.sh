#!/usr/bin/env bash
# Installs Debian's haproxy for the replicas test that puts three server
# replicas behind a real load balancer (tests/replicas.rs). Does nothing
# when haproxy is already on PATH; needs root and apt-get otherwise, and
# says so when it cannot (the test then fails under CI=true and is skipped
# elsewhere). Only the binary is used: the test runs its own configuration.
set -euo pipefail

if command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]]; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-haproxy: haproxy is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends haproxy >/dev/null 2>&1 ||
        echo "install-haproxy: apt-get install haproxy failed" >&2
fi
# The package's own service is not wanted (the test runs its own haproxy).
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
fi
[[ -x /usr/sbin/haproxy ]] && echo "install-haproxy: $(/usr/sbin/haproxy -v 2>/dev/null | head -n1)"
exit 0
