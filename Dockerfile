# tether agent image.
#
# Not built from the repository root: scripts/build-agent-image.sh stages a
# build context holding this file plus rootfs/ (the tether-agent binary at
# /usr/local/bin/tether-agent, the shared libraries it needs if it is dynamically
# linked, /var/lib/tether and /tmp), so the same Dockerfile serves a static
# (musl) and a dynamic (glibc) binary.
FROM scratch
LABEL org.opencontainers.image.title=tether-agent
COPY rootfs/ /
ENV TETHER_STATE_DIR=/var/lib/tether
ENTRYPOINT ["/usr/local/bin/tether-agent"]
