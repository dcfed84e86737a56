#!/usr/bin/env bash
# Dump the VoiceGrow database (section 6.1.1 of the deployment document: as MySQL root with
# MYSQL_ROOT_PASSWORD, into /opt/voicegrow/backup/mysql) into a timestamped gzip file with a .sha256
# beside it and latest.sql.gz pointing at it, then prune: keep the newest 7 dumps and 4 weekly ones
# (the dump taken on WEEKLY_DAY is also linked into weekly/). The dump is a consistent snapshot
# (--single-transaction) taken while the server keeps running.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--dir DIR] [--keep-daily N] [--keep-weekly N] [--env-file FILE]

Back up the MySQL database MYSQL_DATABASE, as root (MYSQL_ROOT_PASSWORD), to
DIR/mysql/<db>_<UTC time>.sql.gz (+ .sha256) and point DIR/mysql/latest.sql.gz at it.
Prints the path of the new backup on stdout.

  --local          use mysqldump on this host (MYSQL_HOST, default 127.0.0.1) instead of the
                   mysql container of the Compose stack
  --dir DIR        backup root (default \$BACKUP_DIR or /opt/voicegrow/backup)
  --keep-daily N   dumps to keep in DIR/mysql (default \$KEEP_DAILY or 7; the hourly crontab keeps 168)
  --keep-weekly N  weekly dumps to keep (default \$KEEP_WEEKLY or 4); a weekly copy is made on
                   ISO weekday \$WEEKLY_DAY (1 = Monday ... default 7 = Sunday)
  --env-file FILE  settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help       this text
EOF
}

KEEP_DAILY="${KEEP_DAILY:-7}"
KEEP_WEEKLY="${KEEP_WEEKLY:-4}"
WEEKLY_DAY="${WEEKLY_DAY:-7}"
VG_OPTIONS="local dir env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep-daily) need_arg "$1" "${2-}"; KEEP_DAILY="$2"; shift ;;
        --keep-weekly) need_arg "$1" "${2-}"; KEEP_WEEKLY="$2"; shift ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
need_count --keep-daily "$KEEP_DAILY"
need_count --keep-weekly "$KEEP_WEEKLY" 0
vg_load_config
[[ "$MODE" == docker ]] && vg_need_docker
need_cmd gzip sha256sum

umask 077 # dumps hold user data
db="${MYSQL_DATABASE:-voicegrow}"
daily_dir="$BACKUP_DIR/mysql"
weekly_dir="$BACKUP_DIR/mysql/weekly"
mkdir -p "$daily_dir" "$weekly_dir"
name="${db}_$(timestamp).sql.gz"
target="$daily_dir/$name"
partial="$target.partial"
VG_TEMP_PATHS+=("$partial")

log "dumping database '$db' ($MODE mode) to $target"
vg_mysql_run mysqldump --single-transaction --quick --routines --triggers --no-tablespaces --hex-blob | gzip -6 >"$partial"
# mysqldump ends a complete dump with this comment; a dump cut short by a lost connection has none.
gzip -dc "$partial" | tail -n 1 | grep -q '^-- Dump completed' ||
    die "the dump of '$db' is incomplete (no 'Dump completed' trailer); nothing was kept"
mv -- "$partial" "$target"
write_checksum "$target"

if [[ "$KEEP_WEEKLY" -gt 0 && "$(date -u +%u)" == "$WEEKLY_DAY" ]]; then
    ln -f -- "$target" "$weekly_dir/$name" 2>/dev/null || cp -p -- "$target" "$weekly_dir/$name"
    write_checksum "$weekly_dir/$name"
    prune_backups "$weekly_dir" "${db}_*.sql.gz" "$KEEP_WEEKLY"
fi
prune_backups "$daily_dir" "${db}_*.sql.gz" "$KEEP_DAILY"
# The document restores "backup/mysql/latest.sql.gz"; restore_mysql.sh follows the link to the dump
# and its checksum.
ln -sfn -- "$name" "$daily_dir/latest.sql.gz"
log "backup done: $target ($(du -h "$target" | cut -f1))"
printf '%s\n' "$target"
