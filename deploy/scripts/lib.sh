# shellcheck shell=bash disable=SC2034 # its variables are read by the scripts that source it
# Helpers shared by the VoiceGrow ops scripts. Sourced, never run.
#
# Every script works in one of two modes: "docker" (the default) talks to the Compose stack through
# `docker compose exec`/`run`; "local" (--local or MODE=local) talks to services on this host
# (mysql on 127.0.0.1:3306, the API on localhost), so that the same scripts run on a bare-metal
# install and in the test suite. Settings come from the process environment over $ENV_FILE
# (default deploy/.env), the same precedence as voicegrow.settings.

VG_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VG_DEPLOY_DIR="$(dirname "$VG_SCRIPTS_DIR")"
VG_PROG="$(basename "$0")"
VG_COMPOSE_FILES=(docker-compose.yml)
VG_TEMP_PATHS=()

# Two places the scripts run from: a checkout (<repo>/deploy/scripts) or the installed layout of the
# deployment document (/opt/voicegrow/scripts, next to docker-compose.yml, .env and server/, the source).
# VG_HOME is the installed directory the Compose stack runs in; VG_REPO_DIR the source tree.
if [[ -f "$VG_DEPLOY_DIR/server/Dockerfile" && -f "$VG_DEPLOY_DIR/docker-compose.yml" ]]; then
    VG_INSTALLED=1
    VG_HOME="${VG_HOME:-$VG_DEPLOY_DIR}"
    VG_REPO_DIR="$VG_DEPLOY_DIR/server"
else
    VG_INSTALLED=0
    VG_HOME="${VG_HOME:-/opt/voicegrow}"
    VG_REPO_DIR="$(dirname "$VG_DEPLOY_DIR")"
fi

# Settings that hold secrets (the `secret=True` fields of voicegrow/settings.py; tests keep this in sync).
VG_SECRET_VARS=(ADMIN_TOKEN API_KEYS ASR_API_KEY TTS_API_KEY TTS_SECRET_KEY LLM_API_KEY LLM_SECRET_KEY MYSQL_PASSWORD REDIS_PASSWORD MINIO_ACCESS_KEY MINIO_SECRET_KEY XIAOAI_TOKEN XIAOZHI_TOKEN)
# Secrets the Compose stack cannot start without (the databases take them as their credentials).
# MYSQL_ROOT_PASSWORD is no server setting: only the mysql container, the operator and the backup
# scripts use it (the server container gets it emptied).
VG_STACK_SECRET_VARS=(MYSQL_PASSWORD MYSQL_ROOT_PASSWORD REDIS_PASSWORD MINIO_ACCESS_KEY MINIO_SECRET_KEY ADMIN_TOKEN)
# Values copied from examples and tutorials; a deployment that still has one is not secured.
VG_PLACEHOLDERS=" change-me changeme change_me password secret minioadmin admin root voicegrow example xxx "

MODE="${MODE:-docker}"
ASSUME_YES="${ASSUME_YES:-0}"
BACKUP_DIR="${BACKUP_DIR:-$VG_HOME/backup}"
VG_TIMEOUT=300
VG_SCALE_ARGS=()

die() {
    printf '%s: error: %s\n' "$VG_PROG" "$1" >&2
    exit "${2:-1}"
}

log() {
    printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$VG_PROG" "$*" >&2
}

vg_cleanup() {
    local path
    for path in "${VG_TEMP_PATHS[@]}"; do
        rm -rf -- "$path"
    done
}
trap vg_cleanup EXIT

# A private temporary file (mktemp makes it 0600) that is removed when the script exits.
vg_tempfile() {
    local path
    path="$(mktemp "${TMPDIR:-/tmp}/voicegrow.XXXXXX")"
    VG_TEMP_PATHS+=("$path")
    printf '%s\n' "$path"
}

# Options that take a value: `need_arg "$1" "${2-}"` before reading $2.
need_arg() {
    [[ -n "${2:-}" && "$2" != -* ]] || die "$1 needs a value (see --help)" 2
}

# Parse one of the options several scripts share; each script names those it takes in VG_OPTIONS
# and calls this for every argument it does not handle itself. Sets VG_SHIFT to the arguments used.
vg_common_option() {
    local name="${1#--}"
    [[ "$1" == -h ]] && name=help
    if [[ "$1" != -* || " help $VG_OPTIONS " != *" $name "* ]]; then
        usage >&2
        die "unknown argument: $1" 2
    fi
    VG_SHIFT=1
    case "$name" in
        help) usage; exit 0 ;;
        local) MODE=local ;;
        scale) vg_use_scale; VG_SCALE_ARGS=(--scale) ;;
        yes) ASSUME_YES=1 ;;
        env-file) need_arg "$1" "${2-}"; ENV_FILE="$2"; VG_SHIFT=2 ;;
        dir) need_arg "$1" "${2-}"; BACKUP_DIR="$2"; VG_SHIFT=2 ;;
        timeout) need_arg "$1" "${2-}"; need_count "$1" "$2"; VG_TIMEOUT="$2"; VG_SHIFT=2 ;;
    esac
}

need_count() {
    [[ "$2" =~ ^[0-9]+$ && "$2" -ge "${3:-1}" ]] || die "$1 must be a whole number of at least ${3:-1}, not '$2'" 2
}

need_cmd() {
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' is required but not installed (or not on PATH)"
    done
}

# Parse KEY=value lines (comments, `export`, quotes) like voicegrow.settings.read_env_file, and export
# each key the environment does not already set: the process environment wins over the file.
load_env_file() {
    local file="$1" line key value number=0
    [[ -r "$file" ]] || die "cannot read env file $file"
    while IFS= read -r line || [[ -n "$line" ]]; do
        number=$((number + 1))
        line="${line#"${line%%[![:space:]]*}"}"
        line="${line%"${line##*[![:space:]]}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        line="${line#export }"
        [[ "$line" == *=* ]] || die "$file:$number: expected KEY=value"
        key="${line%%=*}"
        key="${key%"${key##*[![:space:]]}"}"
        value="${line#*=}"
        value="${value#"${value%%[![:space:]]*}"}"
        [[ "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "$file:$number: '$key' is not a variable name"
        if [[ ${#value} -ge 2 && ( "$value" == \"*\" || "$value" == \'*\' ) ]]; then
            value="${value:1:${#value}-2}"
        fi
        if [[ -z "${!key+set}" ]]; then
            export "$key=$value"
        fi
    done <"$file"
}

# The settings file: the installed .env (docker mode, or any script of the installed layout), else the
# checkout's deploy/.env (local mode from a checkout).
vg_default_env_file() {
    if [[ "$VG_INSTALLED" == 1 || "$MODE" == docker ]]; then
        printf '%s\n' "$VG_HOME/.env"
    else
        printf '%s\n' "$VG_DEPLOY_DIR/.env"
    fi
}

# Load $ENV_FILE when it exists. Scripts call it after parsing their options (--env-file sets it).
vg_load_config() {
    ENV_FILE="${ENV_FILE:-$(vg_default_env_file)}"
    if [[ -f "$ENV_FILE" ]]; then
        load_env_file "$ENV_FILE"
    elif [[ "$MODE" == docker ]]; then
        die "$ENV_FILE not found: run deploy/scripts/deploy.sh (it installs $VG_HOME and creates .env), then set its secrets"
    fi
    case "$MODE" in
        docker | local) ;;
        *) die "MODE must be docker or local, not '$MODE'" ;;
    esac
    # COMPOSE_FILE (set by the environment overlays, e.g. production = the scale file too) chooses the
    # Compose files here as it does for a plain `docker-compose` in $VG_HOME.
    if [[ -n "${COMPOSE_FILE:-}" && ${#VG_SCALE_ARGS[@]} -eq 0 ]]; then
        IFS=: read -r -a VG_COMPOSE_FILES <<<"$COMPOSE_FILE"
        if vg_scaled; then
            VG_SCALE_ARGS=(--scale)
        fi
    fi
}

vg_use_scale() {
    VG_COMPOSE_FILES=(docker-compose.yml docker-compose.scale.yml)
}

# Whether the scale file (replicas behind nginx) is among the Compose files in use.
vg_scaled() {
    [[ " ${VG_COMPOSE_FILES[*]} " == *" docker-compose.scale.yml "* ]]
}

vg_compose() {
    local args=(compose --project-directory "$VG_HOME" --env-file "$ENV_FILE") file
    for file in "${VG_COMPOSE_FILES[@]}"; do
        [[ "$file" == /* ]] || file="$VG_HOME/$file"
        args+=(-f "$file")
    done
    docker "${args[@]}" "$@"
}

vg_need_docker() {
    need_cmd docker
    docker compose version >/dev/null 2>&1 || die "Docker Compose v2 ('docker compose') is required"
}

# The server services of the stack: one, or every replica when the scale file is in use.
vg_server_services() {
    if vg_scaled; then
        printf '%s\n' server server-2 server-3
    else
        printf '%s\n' server
    fi
}

# Refuse secrets left at a placeholder; in docker mode also require the stack's own credentials.
vg_check_secrets() {
    local name value lowered problems=()
    for name in "${VG_SECRET_VARS[@]}" MYSQL_ROOT_PASSWORD; do
        value="${!name:-}"
        lowered="${value,,}"
        if [[ -n "$value" && "$VG_PLACEHOLDERS" == *" $lowered "* ]]; then
            problems+=("$name is still the placeholder '$value'")
        fi
    done
    if [[ "$MODE" == docker ]]; then
        for name in "${VG_STACK_SECRET_VARS[@]}"; do
            value="${!name:-}"
            if [[ -z "$value" ]]; then
                problems+=("$name is empty")
            elif [[ ! "$value" =~ ^[A-Za-z0-9._~-]+$ ]]; then
                # They end up in URLs (MC_HOST_*), redis.conf and YAML: keep them to URL-safe characters.
                problems+=("$name has characters other than letters, digits and . _ ~ -")
            elif [[ "$name" != MINIO_ACCESS_KEY && ${#value} -lt 12 ]]; then
                problems+=("$name is shorter than 12 characters")
            elif [[ ${#value} -lt 3 ]]; then
                problems+=("$name is shorter than 3 characters")
            fi
        done
    fi
    if [[ ${#problems[@]} -gt 0 ]]; then
        printf '%s: error: refusing to use these settings from %s:\n' "$VG_PROG" "${ENV_FILE:-the environment}" >&2
        printf '  - %s\n' "${problems[@]}" >&2
        printf '  generate secrets with: openssl rand -hex 24\n' >&2
        exit 1
    fi
}

# Percent-encode a string for the user-info part of a URL (MC_HOST_* credentials).
urlencode() {
    local string="$1" out="" char i
    for ((i = 0; i < ${#string}; i++)); do
        char="${string:i:1}"
        case "$char" in
            [A-Za-z0-9._~-]) out+="$char" ;;
            *) out+="$(printf '%%%02X' "'$char")" ;;
        esac
    done
    printf '%s\n' "$out"
}

timestamp() {
    date -u +%Y%m%dT%H%M%SZ
}

# Ask before a destructive step; --yes (ASSUME_YES=1) answers for the operator.
confirm() {
    local answer
    [[ "$ASSUME_YES" == 1 ]] && return 0
    [[ -t 0 ]] || die "$1 — no terminal to confirm on; pass --yes to proceed"
    read -r -p "$1 Type 'yes' to continue: " answer
    [[ "$answer" == yes ]] || die "not confirmed; nothing was changed"
}

# --- backups: timestamped, compressed files with a sha256sum file beside each -----------------------

write_checksum() {
    local file="$1"
    (cd "$(dirname "$file")" && sha256sum -- "$(basename "$file")" >"$(basename "$file").sha256")
}

verify_checksum() {
    local file="$1"
    [[ -f "$file" ]] || die "backup $file does not exist"
    [[ -f "$file.sha256" ]] || die "checksum file $file.sha256 is missing; refusing an unverifiable backup"
    (cd "$(dirname "$file")" && sha256sum --quiet --strict -c -- "$(basename "$file").sha256" >&2) ||
        die "checksum of $file does not match $file.sha256: the backup is damaged"
}

# The newest file in DIR matching GLOB (names carry a sortable UTC timestamp), or nothing.
newest_backup() {
    local dir="$1" glob="$2" files=()
    shopt -s nullglob
    # shellcheck disable=SC2206 # the glob is meant to expand here
    files=("$dir"/$glob)
    shopt -u nullglob
    [[ ${#files[@]} -gt 0 ]] && printf '%s\n' "${files[@]}" | sort | tail -n 1
    return 0
}

# The newest MySQL dump of MYSQL_DATABASE: DIR/mysql first, then DIR/mysql/weekly; nothing when none.
newest_mysql_backup() {
    local found glob="${MYSQL_DATABASE:-voicegrow}_*.sql.gz"
    found="$(newest_backup "$BACKUP_DIR/mysql" "$glob")"
    [[ -n "$found" ]] || found="$(newest_backup "$BACKUP_DIR/mysql/weekly" "$glob")"
    printf '%s' "$found"
}

# Keep the newest KEEP files in DIR matching GLOB (and their checksums); delete the rest.
prune_backups() {
    local dir="$1" glob="$2" keep="$3" files=() old
    shopt -s nullglob
    # shellcheck disable=SC2206 # the glob is meant to expand here
    files=("$dir"/$glob)
    shopt -u nullglob
    [[ ${#files[@]} -le "$keep" ]] && return 0
    while IFS= read -r old; do
        log "retention: removing $old"
        rm -f -- "$old" "$old.sha256"
    done < <(printf '%s\n' "${files[@]}" | sort | head -n "$((${#files[@]} - keep))")
}

# --- MySQL, in either mode; credentials never on a command line -----------------------------------

# A 0600 option file for the mysql clients (local mode): the password stays out of `ps`. The backup
# scripts work as MySQL's root with MYSQL_ROOT_PASSWORD, as the deployment document has it.
vg_mysql_option_file() {
    local file password="${MYSQL_ROOT_PASSWORD:-}"
    file="$(vg_tempfile)"
    password="${password//\\/\\\\}"
    password="${password//\"/\\\"}"
    {
        printf '[client]\n'
        printf 'host=%s\n' "${MYSQL_HOST:-127.0.0.1}"
        printf 'port=%s\n' "${MYSQL_PORT:-3306}"
        printf 'user=root\n'
        printf 'password="%s"\n' "$password"
        printf 'default-character-set=utf8mb4\n'
    } >"$file"
    printf '%s\n' "$file"
}

# Run a mysql client program (mysql, mysqldump, ...) on the configured database with extra options,
# as root. Docker mode runs it inside the mysql container with the container's own
# MYSQL_ROOT_PASSWORD (what the container was created with), handed over in MYSQL_PWD.
vg_mysql_run() {
    local program="$1" option_file
    shift
    if [[ "$MODE" == local ]]; then
        need_cmd "$program"
        option_file="$(vg_mysql_option_file)"
        "$program" --defaults-extra-file="$option_file" "$@" "${MYSQL_DATABASE:-voicegrow}"
    else
        # shellcheck disable=SC2016 # expanded by the container's shell, from the container's env
        vg_compose exec -T mysql sh -c 'program="$1"; shift; MYSQL_PWD="$MYSQL_ROOT_PASSWORD" exec "$program" \
            --user=root --default-character-set=utf8mb4 "$@" "$MYSQL_DATABASE"' sh "$program" "$@"
    fi
}

# --- a server run straight from the virtualenv (local mode of deploy/update/disaster_recovery) -------

vg_local_pidfile() {
    local data_dir="${DATA_DIR:-./data}"
    [[ "$data_dir" == /* ]] || data_dir="$VG_REPO_DIR/$data_dir"
    printf '%s/voicegrow.pid\n' "$data_dir"
}

vg_local_running() {
    local pidfile
    pidfile="$(vg_local_pidfile)"
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

vg_local_stop() {
    local pidfile pid deadline grace="${SHUTDOWN_GRACE_S:-10}"
    pidfile="$(vg_local_pidfile)"
    vg_local_running || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    log "stopping local server (pid $pid)"
    kill -TERM "$pid"
    deadline=$((SECONDS + ${grace%.*} + 5))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "server did not stop within its grace period; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    rm -f "$pidfile"
}

vg_local_start() {
    local pidfile bin="${VOICEGROW_BIN:-}"
    if [[ -z "$bin" ]]; then
        if [[ -x "$VG_REPO_DIR/.venv/bin/voicegrow" ]]; then
            bin="$VG_REPO_DIR/.venv/bin/voicegrow"
        else
            bin="$(command -v voicegrow || true)"
        fi
    fi
    [[ -n "$bin" && -x "$bin" ]] || die "the voicegrow command was not found; install the package or set VOICEGROW_BIN"
    pidfile="$(vg_local_pidfile)"
    mkdir -p "$(dirname "$pidfile")"
    log "starting local server: $bin serve (log: $(dirname "$pidfile")/voicegrow.log)"
    (cd "$VG_REPO_DIR" && exec nohup "$bin" serve >>"$(dirname "$pidfile")/voicegrow.log" 2>&1) &
    printf '%s\n' "$!" >"$pidfile"
}

# --- MinIO through the MinIO client `mc`, alias "minio"; credentials in MC_HOST_minio, not in argv ----

# vg_mc HOST_DIR ARGS...: in docker mode `mc` runs in the compose "mc" tool service with HOST_DIR
# (if not empty) mounted at the same path, so the paths in ARGS mean the same in both modes.
vg_mc() {
    local dir="$1" scheme=http mount=()
    shift
    [[ -n "$dir" ]] && mount=(-v "$dir:$dir")
    if [[ "$MODE" == local ]]; then
        need_cmd mc
        [[ -n "${MINIO_ENDPOINT:-}" ]] || die "MINIO_ENDPOINT is not set"
        case "${MINIO_SECURE:-false}" in 1 | true | yes | on) scheme=https ;; esac
        MC_HOST_minio="$scheme://$(urlencode "${MINIO_ACCESS_KEY:-}"):$(urlencode "${MINIO_SECRET_KEY:-}")@$MINIO_ENDPOINT" \
            mc "$@"
    else
        vg_compose run --rm -T "${mount[@]}" mc "$@"
    fi
}

# --- the installed layout (section 2.3 of the deployment document) -------------------------------------

# What deploy.sh copies from a checkout's deploy/ into VG_HOME; .env is made once and never overwritten.
VG_SHIPPED=(docker-compose.yml docker-compose.scale.yml .env.example config scripts environments firewall
    prometheus grafana alertmanager loki)
# The source files the image is built from (the .dockerignore whitelist, and the deploy files so that a
# copied tree can install itself again).
VG_SOURCE_FILES=(Dockerfile .dockerignore setup.cfg pyproject.toml README.md LICENSE voicegrow bench deploy)
# The directories of section 2.3 (and data/server, the server's DATA_DIR); the container users that
# must own some of them: the server runs as uid 10001, MySQL as 999.
VG_LAYOUT_DIRS=(config/mysql config/redis config/nginx data/mysql data/redis data/minio data/models
    data/server data/server-2 data/server-3 data/asr data/asr-2 logs/server logs/mysql logs/nginx scripts backup/mysql
    backup/minio)

# Copy SRC (a file or a directory) over DEST. An existing file that differs is kept as FILE.bak-<time>
# first (an operator may have edited config/), and files are replaced by new inodes, so that a script
# that is running while it is updated keeps reading its old copy.
vg_copy_tree() {
    local src="$1" dest="$2" file rel stamp="${VG_STAMP:=$(timestamp)}"
    if [[ -d "$src" && ! -e "$dest" ]]; then
        # A first install: the whole tree at once, then out with what is never installed.
        mkdir -p "$(dirname "$dest")"
        cp -Rp -- "$src" "$dest"
        find "$dest" \( -name .env -o -name '*.pyc' -o -name __pycache__ -o -name '*.bak-*' \) -prune -exec rm -rf {} +
        return 0
    fi
    if [[ -d "$src" ]]; then
        while IFS= read -r -d '' file; do
            rel="${file#"$src"/}"
            vg_copy_tree "$file" "$dest/$rel"
        # Never a settings file with secrets (a checkout's deploy/.env), nor caches and kept backups.
        done < <(find "$src" -type f ! -name .env ! -name '*.pyc' ! -path '*/__pycache__/*' ! -name '*.bak-*' -print0)
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    if [[ -f "$dest" ]]; then
        cmp -s -- "$src" "$dest" && return 0
        case "$dest" in
            */config/*) log "keeping your changed $dest as $dest.bak-$stamp"; cp -p -- "$dest" "$dest.bak-$stamp" ;;
        esac
    fi
    cp -p -- "$src" "$dest.new.$$" && mv -f -- "$dest.new.$$" "$dest"
}

# Install (or refresh) the stack's files into VG_HOME from the checkout VG_REPO_DIR: the document's
# directories, the deploy files, the source tree as VG_HOME/server (unless the checkout is that
# directory already), executable scripts. Data, logs, backups and .env are never touched.
vg_install_layout() {
    local item dir
    [[ "$VG_INSTALLED" == 0 ]] || die "already running from the installed layout $VG_HOME"
    log "installing the stack into $VG_HOME"
    mkdir -p "$VG_HOME" || die "cannot create $VG_HOME (run as root, or choose --prefix DIR)"
    for dir in "${VG_LAYOUT_DIRS[@]}"; do
        mkdir -p "$VG_HOME/$dir"
    done
    for item in "${VG_SHIPPED[@]}"; do
        [[ -e "$VG_DEPLOY_DIR/$item" ]] && vg_copy_tree "$VG_DEPLOY_DIR/$item" "$VG_HOME/$item"
    done
    if [[ "$(cd "$VG_REPO_DIR" && pwd -P)" != "$(mkdir -p "$VG_HOME/server" && cd "$VG_HOME/server" && pwd -P)" ]]; then
        for item in "${VG_SOURCE_FILES[@]}"; do
            [[ -e "$VG_REPO_DIR/$item" ]] && vg_copy_tree "$VG_REPO_DIR/$item" "$VG_HOME/server/$item"
        done
    fi
    chmod +x "$VG_HOME"/scripts/*.sh
    if [[ "$(id -u)" == 0 ]]; then
        chown 10001:10001 "$VG_HOME"/data/server* "$VG_HOME/logs/server"
        chown 999:999 "$VG_HOME/logs/mysql"
    else
        log "not root: give $VG_HOME/data/server* to uid 10001 (the server) and logs/mysql to uid 999 (MySQL) yourself"
    fi
}

# Set KEY=value lines of OVERLAY in FILE: replace a key's line where FILE has it, append it otherwise.
# Comments and every other line of FILE stay as they are.
vg_apply_overlay() {
    local file="$1" overlay="$2" tmp
    [[ -r "$overlay" ]] || die "no environment overlay $overlay"
    tmp="$(vg_tempfile)"
    awk -F= '
        NR == FNR { if ($0 !~ /^[[:space:]]*(#|$)/) { key = $1; sub(/^[[:space:]]+/, "", key); value[key] = $0; order[++n] = key }; next }
        { key = $1; sub(/^[[:space:]]*(export[[:space:]]+)?/, "", key)
          if ($0 !~ /^[[:space:]]*#/ && (key in value)) { print value[key]; done[key] = 1 } else print }
        END { for (i = 1; i <= n; i++) if (!(order[i] in done)) print value[order[i]] }
    ' "$overlay" "$file" >"$tmp"
    cat -- "$tmp" >"$file"
}
