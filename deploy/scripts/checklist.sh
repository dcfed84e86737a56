#!/usr/bin/env bash
# The checklists of appendix A of the deployment document, as far as a machine can check them.
# --before (A.1): hardware, Docker and Compose versions, free ports, .env filled in, AI service keys.
# --after (A.2): containers running and healthy, the health check, a WebSocket handshake, the HTTP API,
# the MinIO console, log lines arriving. One line per check; exit 1 when any check FAILs (WARN does not).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--before | --after] [--local] [--scale] [--host HOST] [--env-file FILE]

  --before         appendix A.1, before deploying (the default)
  --after          appendix A.2, after deploying
  --local          the server runs on this host without Docker (deploy.sh --local): no container
                   checks; --before then checks only what the local server needs
  --scale          the stack runs with docker-compose.scale.yml
  --host HOST      where the server listens, for the --after network checks (default 127.0.0.1)
  --env-file FILE  settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help       this text
EOF
}

phase=before
host=127.0.0.1
VG_OPTIONS="local scale env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --before) phase=before ;;
        --after) phase=after ;;
        --host) need_arg "$1" "${2-}"; host="$2"; shift ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
vg_load_config

failed=0
report() {
    printf '%-5s %-22s %s\n' "$1" "$2" "$3"
    [[ "$1" != FAIL ]] || failed=1
}

# Whether VERSION (a.b[.c], a leading v allowed) is at least WANTED (a.b).
version_at_least() {
    local version="${1#v}" wanted="$2" major minor want_major want_minor
    IFS=. read -r major minor _ <<<"$version"
    IFS=. read -r want_major want_minor <<<"$wanted"
    [[ "$major" =~ ^[0-9]+$ && "${minor:-0}" =~ ^[0-9]+$ ]] || return 1
    ((major > want_major || (major == want_major && ${minor:-0} >= want_minor)))
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

scheme() {
    if [[ -n "${TLS_CERT_FILE:-}" ]]; then printf '%s' "$1s"; else printf '%s' "$1"; fi
}

# curl with -k when the server speaks TLS: this checks reachability, not the certificate's name.
fetch() {
    local tls=()
    [[ -z "${TLS_CERT_FILE:-}" ]] || tls=(--insecure)
    curl --silent --max-time 5 "${tls[@]}" "$@"
}

check_hardware() {
    local cores memory_kb free_kb where="$VG_HOME"
    cores="$(nproc)"
    if ((cores >= 4)); then report ok cpu "$cores cores"; else report WARN cpu "$cores cores (the document asks 4, 8+ in production)"; fi
    memory_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
    if ((memory_kb >= 7 * 1024 * 1024)); then
        report ok memory "$((memory_kb / 1024 / 1024)) GB"
    else
        report WARN memory "$((memory_kb / 1024)) MB (the document asks 8 GB, 16 GB+ in production)"
    fi
    while [[ ! -d "$where" ]]; do where="$(dirname "$where")"; done
    free_kb="$(df -Pk "$where" | awk 'NR == 2 {print $4}')"
    if ((free_kb >= 50 * 1024 * 1024)); then
        report ok disk "$((free_kb / 1024 / 1024)) GB free at $where"
    else
        report WARN disk "$((free_kb / 1024 / 1024)) GB free at $where (the document asks 50 GB, 200 GB+ in production)"
    fi
}

# check_version NAME VERSION WANTED WHEN-MISSING WHY: ok, or FAIL when VERSION is empty or older.
check_version() {
    if [[ -z "$2" ]]; then
        report FAIL "$1" "$4"
    elif version_at_least "$2" "$3"; then
        report ok "$1" "$2"
    else
        report FAIL "$1" "$2: $3 or newer is needed$5"
    fi
}

check_docker() {
    if ! command -v docker >/dev/null 2>&1; then
        report FAIL docker "not installed (Docker 24.0 or newer)"
        return
    fi
    check_version docker "$(docker version --format '{{.Server.Version}}' 2>/dev/null || true)" 24.0 \
        "the Docker daemon does not answer (is it running? are you in the docker group?)" ""
    check_version compose "$(docker compose version --short 2>/dev/null || true)" 2.24 \
        "Docker Compose v2 ('docker compose') is not installed" " (the document says 2.20; the scale file uses !reset)"
    if docker-compose version 2>/dev/null | grep -q 'v2\.'; then
        report ok docker-compose "the document's docker-compose commands work"
    else
        report WARN docker-compose "no Compose v2 under the name docker-compose: use 'docker compose', or ln -s /usr/libexec/docker/cli-plugins/docker-compose /usr/local/bin/docker-compose"
    fi
}

check_ports() {
    local port
    # The ports the stack publishes; the document's 3306, 6379 and 9000 stay inside voicegrow-net.
    local ports=("${WS_PORT:-4399}" "${HTTP_PORT:-8000}")
    [[ "$MODE" == local ]] || ports+=(9001)
    for port in "${ports[@]}"; do
        if port_in_use "$port"; then
            report FAIL "port $port" "in use on this host (ss -ltnp | grep :$port)"
        else
            report ok "port $port" "free"
        fi
    done
}

check_env() {
    local problems
    if problems="$(vg_check_secrets 2>&1)"; then
        report ok ".env" "${ENV_FILE}: no placeholder or weak secret"
    else
        report FAIL ".env" "$(printf '%s' "$problems" | grep -- '  - ' | sed 's/^  - //' | paste -sd ';' -)"
    fi
}

check_keys() {
    local service base key
    for service in LLM TTS; do
        base="${service}_BASE_URL"
        key="${service}_API_KEY"
        if [[ -z "${!base:-}" ]]; then
            report WARN "$service service" "$base is empty: no $service service (offline engines only)"
        elif [[ -z "${!key:-}" ]]; then
            report FAIL "$service API key" "$key is empty while $base=${!base}"
        else
            report ok "$service API key" "set (${!key:0:3}...); its validity shows in /api/v1/health/detail after the start"
        fi
    done
}

check_containers() {
    local line output status=0
    output="$("$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --env-file "$ENV_FILE" 2>&1)" || status=$?
    while IFS= read -r line; do
        [[ -n "$line" ]] || continue
        case "$line" in
            ok*) report ok "container" "${line#ok }" ;;
            *) report FAIL "container" "${line#FAIL }" ;;
        esac
    done <<<"$output"
    ((status == 0)) || failed=1
}

check_health() {
    local url code
    url="$(scheme http)://$host:${HTTP_PORT:-8000}/api/v1/health"
    code="$(fetch --output /dev/null --write-out '%{http_code}' -- "$url" || true)"
    if [[ "$code" == 200 ]]; then report ok "health check" "$url: 200"; else report FAIL "health check" "$url: HTTP ${code:-none}"; fi
}

check_websocket() {
    local url status
    url="$(scheme http)://$host:${WS_PORT:-4399}/"
    # A WebSocket opening handshake by hand: the server must answer 101 Switching Protocols.
    status="$(fetch --max-time 3 --http1.1 --include --no-buffer --output - \
        -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
        -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' -- "$url" 2>/dev/null | head -n 1 || true)"
    if [[ "$status" == "HTTP/1.1 101"* ]]; then
        report ok websocket "$(scheme ws)://$host:${WS_PORT:-4399}: 101 Switching Protocols"
    else
        report FAIL websocket "$(scheme ws)://$host:${WS_PORT:-4399}: ${status:-no answer}"
    fi
}

check_api() {
    local url code auth=()
    url="$(scheme http)://$host:${HTTP_PORT:-8000}/api/v1/health/detail"
    [[ -z "${ADMIN_TOKEN:-}" ]] || auth=(-H "Authorization: Bearer $ADMIN_TOKEN")
    code="$(fetch --output /dev/null --write-out '%{http_code}' "${auth[@]}" -- "$url" || true)"
    case "$code" in
        200) report ok "HTTP API" "$url: 200" ;;
        401 | 403) report FAIL "HTTP API" "$url: HTTP $code (ADMIN_TOKEN in $ENV_FILE is not the server's)" ;;
        *) report FAIL "HTTP API" "$url: HTTP ${code:-none}" ;;
    esac
}

check_minio_console() {
    local code
    code="$(fetch --output /dev/null --write-out '%{http_code}' -- "http://127.0.0.1:9001/" || true)"
    if [[ "$code" == 200 ]]; then report ok "MinIO console" "http://127.0.0.1:9001: 200"; else report FAIL "MinIO console" "http://127.0.0.1:9001: HTTP ${code:-none}"; fi
}

check_logs() {
    local service lines
    mapfile -t servers < <(vg_server_services)
    for service in "${servers[@]}"; do
        lines="$(vg_compose logs --no-log-prefix --since 15m "$service" 2>/dev/null | wc -l)"
        if ((lines > 0)); then report ok "logs $service" "$lines lines in 15 minutes"; else report FAIL "logs $service" "no log line in 15 minutes"; fi
    done
}

need_cmd curl
if [[ "$phase" == before ]]; then
    [[ "$MODE" == local ]] || check_hardware
    [[ "$MODE" == local ]] || check_docker
    check_ports
    check_env
    check_keys
else
    if [[ "$MODE" == docker ]]; then
        vg_need_docker
        check_containers
    else
        report SKIP containers "local mode: no containers"
    fi
    check_health
    check_websocket
    check_api
    if [[ "$MODE" == docker ]]; then
        check_minio_console
        check_logs
    else
        report SKIP "MinIO console" "local mode"
        report SKIP logs "local mode: see DATA_DIR/voicegrow.log"
    fi
fi
exit "$failed"
