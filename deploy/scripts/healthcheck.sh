#!/usr/bin/env bash
# Is the deployment healthy? (section 7.2.1 of the deployment document) Docker mode reads the health
# status Docker keeps for every container of the stack (server, mysql, redis, minio and whatever
# profile is on; each has a HEALTHCHECK) and asks the API's /api/v1/health; local mode asks the API.
# With --wait it polls until healthy or a deadline passes, so deploy/update never sleep a fixed time.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--scale] [--url URL] [--service NAME]... [--wait SECONDS] [--quiet]
       [--env-file FILE]

Exit 0 when everything checked is healthy, 1 otherwise; one line per check on stdout.

  --local           check only the HTTP API on this host (no Docker)
  --scale           the stack runs with docker-compose.scale.yml (nginx and replicas)
  --url URL         health URL (default http://127.0.0.1:\$HTTP_PORT/api/v1/health; in docker mode
                    it is checked only without --scale and --service, or when given)
  --service NAME    check only this Compose service (repeatable; default: every service)
  --wait SECONDS    poll every 2 s until healthy; fail when SECONDS have passed
  --quiet           print nothing when healthy (for cron)
  --env-file FILE   settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help        this text
EOF
}

url=""
wait_s=0
quiet=0
services=()
VG_OPTIONS="local scale env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --url) need_arg "$1" "${2-}"; url="$2"; shift ;;
        --service) need_arg "$1" "${2-}"; services+=("$2"); shift ;;
        --wait) need_arg "$1" "${2-}"; need_count "$1" "$2" 0; wait_s="$2"; shift ;;
        --quiet | -q) quiet=1 ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
vg_load_config
need_cmd curl
check_http=0
if [[ -n "$url" || "$MODE" == local ]] || { [[ ${#services[@]} -eq 0 ]] && ! vg_scaled; }; then
    check_http=1
fi
url="${url:-http://127.0.0.1:${HTTP_PORT:-8000}/api/v1/health}"
if [[ "$MODE" == docker ]]; then
    vg_need_docker
    if [[ ${#services[@]} -eq 0 ]]; then
        mapfile -t services < <(vg_compose config --services)
    fi
fi

report=""
add() {
    report+="$(printf '%-5s %-14s %s' "$1" "$2" "$3")"$'\n'
}

check_container() {
    local service="$1" id state
    id="$(vg_compose ps -q "$service" 2>/dev/null || true)"
    id="${id%%$'\n'*}"
    if [[ -z "$id" ]]; then
        add FAIL "$service" "no container (not started?)"
        return 1
    fi
    state="$(docker inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}no-healthcheck{{end}}' "$id")"
    case "$state" in
        "running healthy" | "running no-healthcheck") add ok "$service" "$state" ;;
        *) add FAIL "$service" "$state"; return 1 ;;
    esac
}

check_api() {
    local response code body status=0
    response="$(curl --silent --max-time 5 --write-out '\n%{http_code}' -- "$url")" || status=$?
    if ((status != 0)); then
        add FAIL api "$url: no answer (curl exit status $status)"
        return 1
    fi
    code="${response##*$'\n'}"
    body="${response%$'\n'*}"
    if [[ "$code" == 200 && "$body" =~ \"status\"[[:space:]]*:[[:space:]]*\"ok\" ]]; then
        add ok api "$url: 200 ok"
    else
        add FAIL api "$url: HTTP $code ${body:0:200}"
        return 1
    fi
}

run_checks() {
    local failed=0 service
    report=""
    if [[ "$MODE" == docker ]]; then
        for service in "${services[@]}"; do
            check_container "$service" || failed=1
        done
    fi
    if [[ "$check_http" == 1 ]]; then
        check_api || failed=1
    fi
    return "$failed"
}

deadline=$((SECONDS + wait_s))
until run_checks; do
    if ((SECONDS >= deadline)); then
        printf '%s' "$report"
        if ((wait_s > 0)); then
            die "not healthy after ${wait_s}s"
        fi
        exit 1
    fi
    sleep 2
done
[[ "$quiet" == 1 ]] || printf '%s' "$report"
