#!/usr/bin/env bash
# First deployment (or a redeploy) of VoiceGrow, as section 8.1.1 of the deployment document: it
# installs the /opt/voicegrow layout from this checkout (directories, compose files, config/, scripts/,
# the source as server/, .env from .env.example and the chosen environment), refuses placeholder
# secrets, validates the settings with the server's own loader before anything starts, builds the
# image, starts the stack and waits on the health checks with a deadline, then makes sure the MinIO
# bucket exists.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--scale] [--check | --stop | --install-only] [--prefix DIR]
       [--environment NAME] [--no-build] [--timeout SECONDS] [--env-file FILE]

  (default)          install DIR (default /opt/voicegrow) from this checkout, then build and start
                     the Docker Compose stack there (server, mysql, redis, minio)
  --prefix DIR       where the stack is installed (default \$VG_HOME or /opt/voicegrow)
  --environment NAME development, testing, staging or production (environments/NAME.env):
                     written into DIR/.env when it is created, or updated in it when given
  --install-only     install DIR and its .env, start nothing
  --scale            also use docker-compose.scale.yml: nginx (TLS) in front of three replicas;
                     certificates must be in /etc/voicegrow/certs (fullchain.pem, privkey.pem)
  --local            no Docker: start 'voicegrow serve' from this checkout's virtualenv against the
                     services named in the env file, and wait for its health endpoint
  --check            only validate the env file (secrets and settings); change nothing
  --stop             stop the stack (docker compose stop; data stays) or the local server
  --no-build         start with the image already built
  --timeout SECONDS  how long to wait for the health checks (default 300)
  --env-file FILE    settings file (default DIR/.env); the environment wins over it
  -h, --help         this text

A missing DIR/.env is created from .env.example (mode 0600) and the script stops so that you can set
the secrets: MYSQL_PASSWORD, MYSQL_ROOT_PASSWORD, REDIS_PASSWORD, MINIO_ACCESS_KEY, MINIO_SECRET_KEY,
ADMIN_TOKEN.
EOF
}

check_only=0
stop=0
build=1
install_only=0
environment=""
passed=()
VG_OPTIONS="local scale timeout env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --check) check_only=1 ;;
        --stop) stop=1 ;;
        --no-build) build=0 ;;
        --install-only) install_only=1 ;;
        --prefix) need_arg "$1" "${2-}"; VG_HOME="$2"; shift ;;
        --environment)
            need_arg "$1" "${2-}"
            [[ "$2" =~ ^(development|testing|staging|production)$ ]] ||
                die "--environment must be development, testing, staging or production, not '$2'" 2
            environment="$2"
            shift
            ;;
        *)
            vg_common_option "$@"
            passed+=("${@:1:$VG_SHIFT}")
            shift "$VG_SHIFT"
            continue
            ;;
    esac
    case "$1" in --check | --stop | --no-build) passed+=("$1") ;; esac
    shift
done

# .env: made once from .env.example plus the environment's overlay; later --environment updates it.
# An env file named by --env-file / ENV_FILE is used as it is (and updated by --environment).
created_env=0
make_env_file() {
    local home="$1" target="${ENV_FILE:-$1/.env}" overlay
    if [[ ! -f "$target" ]]; then
        [[ -z "${ENV_FILE:-}" ]] || die "cannot read env file $target"
        (umask 077 && cp "$home/.env.example" "$target")
        environment="${environment:-production}"
        created_env=1
    fi
    if [[ -n "$environment" ]]; then
        overlay="$home/environments/$environment.env"
        log "applying the $environment environment ($overlay) to $target"
        vg_apply_overlay "$target" "$overlay"
    fi
    [[ -z "${ENV_FILE:-}" ]] && chmod 600 "$target"
    return 0
}

if [[ "$MODE" == docker && "$check_only" == 0 && "$stop" == 0 ]]; then
    if [[ "$VG_INSTALLED" == 0 ]]; then
        vg_install_layout
        make_env_file "$VG_HOME"
        if [[ "$install_only" == 1 ]]; then
            log "installed $VG_HOME$([[ "$created_env" == 1 ]] && echo "; set the secrets in $VG_HOME/.env")"
            exit 0
        fi
        if [[ "$created_env" == 1 ]]; then
            die "created $VG_HOME/.env ($environment): set its secrets (openssl rand -hex 24), then run $VG_HOME/scripts/deploy.sh"
        fi
        export VG_HOME
        exec "$VG_HOME/scripts/deploy.sh" "${passed[@]}"
    fi
    [[ "$install_only" == 0 ]] || die "--install-only installs from a checkout; this is the installed copy in $VG_HOME"
    make_env_file "$VG_HOME"
    [[ "$created_env" == 0 ]] || die "created $VG_HOME/.env ($environment): set its secrets (openssl rand -hex 24), then run $VG_PROG again"
fi

ENV_FILE="${ENV_FILE:-$(vg_default_env_file)}"
if [[ "$stop" == 1 ]]; then
    vg_load_config
    if [[ "$MODE" == local ]]; then
        vg_local_stop
    else
        vg_need_docker
        vg_compose stop
    fi
    exit 0
fi
vg_load_config
vg_check_secrets

# Validate with voicegrow.settings itself, so that a typo fails here and not in a restarting container.
validate_settings_locally() {
    local python="${VG_PYTHON:-}"
    if [[ -z "$python" ]]; then
        python="$VG_REPO_DIR/.venv/bin/python"
        [[ -x "$python" ]] || python="$(command -v python3 || true)"
    fi
    if [[ -z "$python" ]] || ! (cd "$VG_REPO_DIR" && "$python" -c 'import voicegrow.settings' 2>/dev/null); then
        return 1
    fi
    (cd "$VG_REPO_DIR" && "$python" -c 'from voicegrow.settings import load_settings; load_settings(env_file=None)') ||
        die "the settings in $ENV_FILE are not valid (see above)"
}

if [[ "$check_only" == 1 ]]; then
    if validate_settings_locally; then
        log "settings in ${ENV_FILE} are valid"
    else
        log "secrets checked; voicegrow is not importable here, so the settings were not validated"
    fi
    exit 0
fi

if [[ "$MODE" == local ]]; then
    validate_settings_locally || die "voicegrow is not importable: install it (pip install .) first"
    vg_local_running && die "a local server is already running (pid file $(vg_local_pidfile)); use update.sh --local"
    vg_local_start
    "$VG_SCRIPTS_DIR/healthcheck.sh" --local --wait "$VG_TIMEOUT"
    log "deployed locally: WebSocket on port ${WS_PORT:-4399}, HTTP API on port ${HTTP_PORT:-8000}"
    exit 0
fi

vg_need_docker
if vg_scaled; then
    for cert in /etc/voicegrow/certs/fullchain.pem /etc/voicegrow/certs/privkey.pem; do
        [[ -r "$cert" ]] || die "$cert is missing: nginx needs a TLS certificate (see docs/operations.md, TLS)"
    done
fi
vg_compose config --quiet || die "the Compose files do not validate with $ENV_FILE"
if [[ "$build" == 1 ]]; then
    log "building the server image"
    vg_compose build server
fi
log "validating the settings inside the image"
vg_compose run --rm --no-deps -T --entrypoint python server \
    -c 'from voicegrow.settings import load_settings; load_settings(env_file=None)' ||
    die "the settings in $ENV_FILE are not valid (see above)"

log "starting the stack"
vg_compose up -d --remove-orphans
"$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --env-file "$ENV_FILE" --wait "$VG_TIMEOUT"

log "making sure bucket '${MINIO_BUCKET:-voicegrow}' exists"
vg_mc "" mb --ignore-existing "minio/${MINIO_BUCKET:-voicegrow}" >&2
log "deployed in $VG_HOME: speakers connect to ws://<this host>:${WS_PORT:-4399}, the API is on port ${HTTP_PORT:-8000}"
case "${BACKUP_SCHEDULE:-daily}" in
    none) log "backups: none scheduled (BACKUP_SCHEDULE=none)" ;;
    hourly) log "backups: install the hourly schedule with: crontab -u root $VG_HOME/scripts/crontab.hourly" ;;
    *) log "backups: install the daily schedule with: crontab -u root $VG_HOME/scripts/crontab" ;;
esac
