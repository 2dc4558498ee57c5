#!/usr/bin/env bash
# Remove Docker leftovers of tether's tests: containers (forced), networks
# and volumes labelled tether.test=1, or made by a test node (a
# tether.node_id starting with "test-"); with --all every
# tether-managed object, whatever its node (this removes real workers too,
# and every node's nftables guard);
# with --images also images labelled tether.test=1 and tether-agent:test*.
# Idempotent, silent when there is nothing to remove, never fails.
#
# Usage: scripts/cleanup.sh [--all] [--images]
set -uo pipefail

IMAGES=0
ALL=0
for arg in "$@"; do
    case "$arg" in
        --images) IMAGES=1 ;;
        --all) ALL=1 ;;
        -h | --help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "cleanup: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

command -v docker >/dev/null 2>&1 || exit 0
docker info >/dev/null 2>&1 || exit 0

LABELS=(tether.test=1)
if [[ "$ALL" -eq 1 ]]; then
    LABELS+=(tether.managed=true)
fi

# ids KIND FILTER...: unique ids of objects matching any of the filters.
ids() {
    local kind="$1" f
    shift
    {
        for f in "$@"; do
            case "$kind" in
                container) docker ps -aq --no-trunc --filter "$f" 2>/dev/null ;;
                network) docker network ls -q --no-trunc --filter "$f" 2>/dev/null ;;
                image) docker images -q --no-trunc --filter "$f" 2>/dev/null ;;
                volume) docker volume ls -q --filter "$f" 2>/dev/null ;;
            esac
        done
        # Objects of test nodes (their ids start with "test-").
        local fmt='{{.ID}} {{.Label "tether.node_id"}}'
        case "$kind" in
            container) docker ps -a --no-trunc --filter label=tether.node_id --format "$fmt" 2>/dev/null ;;
            network) docker network ls --no-trunc --filter label=tether.node_id --format "$fmt" 2>/dev/null ;;
            volume) docker volume ls --filter label=tether.node_id --format '{{.Name}} {{.Label "tether.node_id"}}' 2>/dev/null ;;
        esac | awk '$2 ~ /^test-/ { print $1 }'
    } | sort -u
}

# remove KIND ID...: remove each object (ignoring races), report the count.
remove() {
    local kind="$1" id n=0
    shift
    for id in "$@"; do
        case "$kind" in
            container) docker rm -f -v "$id" >/dev/null 2>&1 && n=$((n + 1)) ;;
            network) docker network rm "$id" >/dev/null 2>&1 && n=$((n + 1)) ;;
            image) docker image rm -f "$id" >/dev/null 2>&1 && n=$((n + 1)) ;;
            volume) docker volume rm -f "$id" >/dev/null 2>&1 && n=$((n + 1)) ;;
        esac
    done
    if [[ "$n" -gt 0 ]]; then
        echo "cleanup: removed $n ${kind}(s)" >&2
    fi
}

filters=()
for l in "${LABELS[@]}"; do
    filters+=("label=$l")
done

mapfile -t found < <(ids container "${filters[@]}")
remove container ${found[@]+"${found[@]}"}

mapfile -t found < <(ids network "${filters[@]}")
remove network ${found[@]+"${found[@]}"}

mapfile -t found < <(ids volume "${filters[@]}")
remove volume ${found[@]+"${found[@]}"}

# The nftables guards of test nodes (with --all, of every node): an agent
# leaves its table in place while its node has containers.
if command -v nft >/dev/null 2>&1; then
    pattern='^tether-test-'
    [[ "$ALL" -eq 1 ]] && pattern='^tether-'
    n=0
    while read -r _ family name; do
        [[ "$family" == inet && "$name" =~ $pattern ]] || continue
        nft delete table inet "$name" >/dev/null 2>&1 && n=$((n + 1))
    done < <(nft list tables 2>/dev/null)
    if [[ "$n" -gt 0 ]]; then
        echo "cleanup: removed $n nftables table(s)" >&2
    fi
fi

if [[ "$IMAGES" -eq 1 ]]; then
    mapfile -t found < <(ids image "label=tether.test=1" "reference=tether-agent:test*")
    remove image ${found[@]+"${found[@]}"}
fi

exit 0
