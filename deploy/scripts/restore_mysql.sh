#!/usr/bin/env bash
# Load a dump made by backup_mysql.sh back into the VoiceGrow database. The checksum and the gzip
# stream are verified before anything is touched, and the operator confirms unless --yes is given:
# restoring replaces every table the dump contains.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--yes] [--dir DIR] [--env-file FILE] [BACKUP_FILE | latest]

Restore MYSQL_DATABASE from BACKUP_FILE (a <db>_<time>.sql.gz with its .sha256), or from the newest
dump under DIR/mysql/daily (then weekly) when the argument is 'latest' or missing.

  --local          use the mysql client on this host (MYSQL_HOST, default 127.0.0.1) instead of the
                   mysql container of the Compose stack
  --yes            do not ask for confirmation
  --dir DIR        backup root (default \$BACKUP_DIR or /var/backups/voicegrow)
  --env-file FILE  settings file (default deploy/.env); the environment wins over it
  -h, --help       this text
EOF
}

backup=latest
VG_OPTIONS="local yes dir env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
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
verify_checksum "$backup"
gzip -t -- "$backup" || die "$backup is not a valid gzip file"

db="${MYSQL_DATABASE:-voicegrow}"
if [[ "$MODE" == local ]]; then
    where="${MYSQL_HOST:-127.0.0.1}:${MYSQL_PORT:-3306}"
else
    where="the mysql container"
fi
confirm "Restore $backup into database '$db' on $where? Every table in the dump will be replaced."

log "restoring $backup into '$db' ($MODE mode)"
gzip -dc -- "$backup" | vg_mysql_run mysql
tables="$(vg_mysql_run mysql --batch --skip-column-names -e 'SHOW TABLES' | wc -l)"
log "restore done: '$db' has $tables tables"
