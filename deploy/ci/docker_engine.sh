#!/usr/bin/env bash
# Make a Docker engine available for the image tests: Debian's docker.io, started with no bridge
# network (every container runs on the host network; the default bridge must stay unused here), and a
# local stand-in for python:3.11-slim-bookworm built from Debian's packages, since no image can be pulled.
#
#   deploy/ci/docker_engine.sh            # prints the base image's name on the last line
#
# Idempotent: an engine that answers and a base image that exists are reused.
set -euo pipefail

BASE_IMAGE="${VOICEGROW_CI_BASE_IMAGE:-voicegrow-ci/python:3.11-bookworm}"
SUITE=bookworm
log() { printf 'docker_engine: %s\n' "$*" >&2; }

if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  log "installing docker.io and debootstrap from Debian's packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (no bridge, no iptables)"
  mkdir -p /var/log
  nohup dockerd --bridge=none --iptables=false --ip6tables=false >/var/log/dockerd-voicegrow.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not come up; see /var/log/dockerd-voicegrow.log"; exit 1; }
fi

# The Debian mirror this machine's apt already uses: the first URIs:/deb line of its sources.
mirror() {
  local uri
  uri=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -v -- '-security' | head -n 1 | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
        | awk '{print $1}')
  [ -n "$uri" ] || { log "no Debian mirror found in /etc/apt/sources*"; exit 1; }
  printf '%s\n' "$uri"
}

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  root=$(mktemp -d /tmp/voicegrow-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  log "debootstrap $SUITE (python3, python3-venv) into $root"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$root/rootfs" "$(mirror)" >"$root/debootstrap.log" 2>&1 \
    || { tail -n 20 "$root/debootstrap.log" >&2; exit 1; }
  # This machine's trust store (it may hold a TLS proxy's CA) so that pip and apt inside the build
  # reach the same registries the host does.
  cp /etc/ssl/certs/ca-certificates.crt "$root/rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root/rootfs/var/cache/apt/archives/"*.deb "$root/rootfs/var/lib/apt/lists/"*
  tar -C "$root/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  log "imported $BASE_IMAGE"
fi
printf '%s\n' "$BASE_IMAGE"
