#!/usr/bin/env bash
# Update a running deployment to the newest code (section 8.1.2 of the deployment document): back up
# the database first, pull the source (VG_HOME/server when it is a git checkout), refresh the installed
# files, rebuild, then replace the server one replica at a time, each waited on until healthy. If a
# new replica does not become healthy, the previous image is put back and the script fails.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--scale] [--no-pull] [--no-backup] [--timeout SECONDS] [--env-file FILE]

  (default)          rebuild the image and recreate the server container(s) of the Compose stack
  --scale            the stack runs with docker-compose.scale.yml: update server, server-2 and
                     server-3 one after another (nginx keeps routing to the others meanwhile)
  --local            no Docker: reinstall the package into the virtualenv and restart the local
                     server started by deploy.sh --local
  --no-pull          do not 'git pull --ff-only' first
  --no-backup        skip the MySQL backup taken before the update
  --timeout SECONDS  how long each replica may take to become healthy (default 300)
  --env-file FILE    settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help         this text
EOF
}

IMAGE=voicegrow-server:latest
ROLLBACK_IMAGE=voicegrow-server:rollback
pull=1
backup=1
VG_OPTIONS="local scale timeout env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-pull) pull=0 ;;
        --no-backup) backup=0 ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
vg_load_config
vg_check_secrets
export MODE ENV_FILE # the scripts called below work in the same mode on the same settings

if [[ "$backup" == 1 ]]; then
    "$VG_SCRIPTS_DIR/backup_mysql.sh" >/dev/null
fi
if [[ "$pull" == 1 ]]; then
    if [[ -d "$VG_REPO_DIR/.git" || "$MODE" == local ]]; then
        need_cmd git
        log "pulling the newest code"
        git -C "$VG_REPO_DIR" pull --ff-only
    else
        log "$VG_REPO_DIR is no git checkout: copy the new source there (or run update.sh from a checkout)"
    fi
fi
if [[ "$MODE" == docker ]]; then
    # New compose files, scripts and rules reach the installed directory (never .env or data).
    if [[ "$VG_INSTALLED" == 1 ]]; then
        "$VG_REPO_DIR/deploy/scripts/deploy.sh" --install-only --prefix "$VG_HOME"
    else
        vg_install_layout
    fi
fi

if [[ "$MODE" == local ]]; then
    python="${VG_PYTHON:-$VG_REPO_DIR/.venv/bin/python}"
    [[ -x "$python" ]] || die "no virtualenv python at $python; set VG_PYTHON"
    # (Read pip's answer whole: `pip show | grep -q` would fail under pipefail when grep stops early.)
    installed="$("$python" -m pip show voicegrow 2>/dev/null || true)"
    if [[ "$installed" == *$'\nEditable project location: '* ]]; then
        log "voicegrow is installed in editable mode: the pulled code is live, nothing to reinstall"
    else
        log "installing the package into $(dirname "$(dirname "$python")")"
        "$python" -m pip install --quiet "$VG_REPO_DIR"
    fi
    vg_local_stop
    vg_local_start
    "$VG_SCRIPTS_DIR/healthcheck.sh" --wait "$VG_TIMEOUT" ||
        die "the updated server is not healthy; see $(dirname "$(vg_local_pidfile)")/voicegrow.log"
    log "local server updated"
    exit 0
fi

vg_need_docker
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    docker image tag "$IMAGE" "$ROLLBACK_IMAGE"
fi
log "building the new image"
vg_compose build server

updated=()
roll_back() {
    local service
    docker image inspect "$ROLLBACK_IMAGE" >/dev/null 2>&1 || die "$1; no previous image to roll back to"
    log "$1; rolling back to the previous image"
    docker image tag "$ROLLBACK_IMAGE" "$IMAGE"
    for service in "${updated[@]}"; do
        vg_compose up -d --no-deps --force-recreate "$service"
    done
    die "$1; rolled back (check: docker compose logs ${updated[*]})"
}

mapfile -t servers < <(vg_server_services)
for service in "${servers[@]}"; do
    log "replacing $service"
    updated+=("$service")
    vg_compose up -d --no-deps --force-recreate "$service"
    "$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --service "$service" --wait "$VG_TIMEOUT" ||
        roll_back "$service did not become healthy within ${VG_TIMEOUT}s"
done
"$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --wait "$VG_TIMEOUT" || die "the stack is not healthy after the update"
log "update done"
