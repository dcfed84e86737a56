#!/usr/bin/env bash
# Load a dump made by backup_mysql.sh back into the VoiceGrow database (section 6.2.1 of the deployment
# document: restore_mysql.sh <file.sql.gz>, as MySQL root with MYSQL_ROOT_PASSWORD). The checksum and
# the gzip stream are verified before anything is touched, and the operator confirms unless --yes is
# given: restoring replaces every table the dump contains. In docker mode the server is stopped for the
# restore and started again afterwards (also when the restore fails), as the document does, so that
# no turn is written into a half-restored database.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--scale] [--yes] [--keep-running] [--dir DIR] [--env-file FILE] [BACKUP_FILE | latest]

Restore MYSQL_DATABASE, as root (MYSQL_ROOT_PASSWORD), from BACKUP_FILE (a <db>_<time>.sql.gz with
its .sha256, or DIR/mysql/latest.sql.gz, the link to the newest), or from the newest dump under
DIR/mysql (then DIR/mysql/weekly) when the argument is 'latest' or missing.

  --local          use the mysql client on this host (MYSQL_HOST, default 127.0.0.1) instead of the
                   mysql container of the Compose stack
  --yes            do not ask for confirmation
  --keep-running   docker mode: do not stop the server(s) during the restore
  --dir DIR        backup root (default \$BACKUP_DIR or /opt/voicegrow/backup)
  --env-file FILE  settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help       this text
EOF
}

backup=latest
keep_running=0
VG_OPTIONS="local scale yes dir env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep-running) keep_running=1 ;;
        -*) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
        *) backup="$1" ;;
    esac
    shift
done
vg_load_config
[[ "$MODE" == docker ]] && vg_need_docker
need_cmd gzip sha256sum

if [[ "$backup" == latest ]]; then
    backup="$(newest_mysql_backup)"
    [[ -n "$backup" ]] || die "no MySQL backup found under $BACKUP_DIR/mysql"
fi
# latest.sql.gz is a link: check the dump it names, against the checksum beside that dump.
[[ -L "$backup" ]] && backup="$(readlink -f -- "$backup")"
verify_checksum "$backup"
gzip -t -- "$backup" || die "$backup is not a valid gzip file"

db="${MYSQL_DATABASE:-voicegrow}"
if [[ "$MODE" == local ]]; then
    where="${MYSQL_HOST:-127.0.0.1}:${MYSQL_PORT:-3306}"
else
    where="the mysql container"
fi
confirm "Restore $backup into database '$db' on $where? Every table in the dump will be replaced."

stopped=()
restart_servers() {
    if [[ ${#stopped[@]} -gt 0 ]]; then
        log "starting ${stopped[*]} again"
        vg_compose start "${stopped[@]}"
    fi
}
if [[ "$MODE" == docker && "$keep_running" == 0 ]]; then
    mapfile -t servers < <(vg_server_services)
    log "stopping ${servers[*]} for the restore"
    vg_compose stop "${servers[@]}"
    stopped=("${servers[@]}")
    trap 'restart_servers; vg_cleanup' EXIT
fi

log "restoring $backup into '$db' ($MODE mode)"
gzip -dc -- "$backup" | vg_mysql_run mysql
tables="$(vg_mysql_run mysql --batch --skip-column-names -e 'SHOW TABLES' | wc -l)"
log "restore done: '$db' has $tables tables"
