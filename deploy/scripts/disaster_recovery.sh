#!/usr/bin/env bash
# Rebuild a lost VoiceGrow host from its backups: verify every backup it will use before touching
# anything, start the data services, restore MySQL and the MinIO bucket, then start the server and
# wait for it to be healthy. Redis holds only sessions that expire (SESSION_TTL_S) and is not restored.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--scale] [--yes] [--dry-run] [--dir DIR] [--mysql FILE] [--minio FILE]
       [--skip-minio] [--no-start] [--timeout SECONDS] [--env-file FILE]

  --local           restore into the services on this host and (re)start 'voicegrow serve' locally
  --scale           the stack runs with docker-compose.scale.yml
  --yes             do not ask for confirmation
  --dry-run         verify the backups and print the plan; change nothing
  --dir DIR         backup root (default \$BACKUP_DIR or /opt/voicegrow/backup)
  --mysql FILE      MySQL dump to restore (default: the newest under DIR/mysql)
  --minio FILE      bucket archive to restore (default: the newest under DIR/minio)
  --skip-minio      do not restore the bucket
  --no-start        restore the data only; do not start the server
  --timeout SECONDS how long to wait for each health check (default 300)
  --env-file FILE   settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help        this text
EOF
}

mysql_backup=""
minio_archive=""
skip_minio=0
start=1
dry_run=0
VG_OPTIONS="local scale yes dir timeout env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --mysql) need_arg "$1" "${2-}"; mysql_backup="$2"; shift ;;
        --minio) need_arg "$1" "${2-}"; minio_archive="$2"; shift ;;
        --skip-minio) skip_minio=1 ;;
        --no-start) start=0 ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
vg_load_config
vg_check_secrets
need_cmd gzip tar sha256sum
[[ "$MODE" == docker ]] && vg_need_docker
export MODE ENV_FILE ASSUME_YES BACKUP_DIR

bucket="${MINIO_BUCKET:-voicegrow}"
if [[ -z "$mysql_backup" ]]; then
    mysql_backup="$(newest_mysql_backup)"
    [[ -n "$mysql_backup" ]] || die "no MySQL backup under $BACKUP_DIR/mysql (use --mysql FILE)"
fi
verify_checksum "$mysql_backup"
if [[ "$skip_minio" == 0 ]]; then
    [[ -n "$minio_archive" ]] || minio_archive="$(newest_backup "$BACKUP_DIR/minio" "${bucket}_*.tar.gz")"
    [[ -n "$minio_archive" ]] || die "no archive of bucket '$bucket' under $BACKUP_DIR/minio (use --minio FILE or --skip-minio)"
    verify_checksum "$minio_archive"
fi

cat <<EOF
Recovery plan ($MODE mode):
  1. start the data services             $([[ "$MODE" == docker ]] && echo "mysql, redis, minio" || echo "(local: already running)")
  2. restore MySQL database '${MYSQL_DATABASE:-voicegrow}' from  $mysql_backup
  3. restore MinIO bucket '$bucket' from    ${minio_archive:-(skipped)}
  4. start the server and wait for health $([[ "$start" == 1 ]] && echo yes || echo "(skipped)")
EOF
if [[ "$dry_run" == 1 ]]; then
    log "dry run: the backups verified; nothing was changed"
    exit 0
fi
confirm "Recover from these backups? Current data in the database and the bucket will be replaced."

if [[ "$MODE" == docker ]]; then
    log "starting the data services"
    vg_compose up -d mysql redis minio
    "$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --service mysql --service redis --service minio --wait "$VG_TIMEOUT"
fi

if [[ "$MODE" == docker ]]; then
    # Nothing may write while the data comes back (the document stops everything first).
    mapfile -t servers < <(vg_server_services)
    vg_compose stop "${servers[@]}"
fi
"$VG_SCRIPTS_DIR/restore_mysql.sh" --yes --keep-running "$mysql_backup"

if [[ "$skip_minio" == 0 ]]; then
    mkdir -p "$BACKUP_DIR"
    staging="$(cd "$BACKUP_DIR" && pwd)/restore.$$"
    VG_TEMP_PATHS+=("$staging")
    mkdir -p "$staging"
    log "unpacking $minio_archive"
    tar -C "$staging" -xzf "$minio_archive"
    [[ -d "$staging/$bucket" ]] || die "$minio_archive does not contain a '$bucket/' directory"
    vg_mc "$staging" mb --ignore-existing "minio/$bucket" >&2
    log "uploading the archive into bucket '$bucket'"
    vg_mc "$staging" mirror --overwrite --quiet "$staging/$bucket" "minio/$bucket" >&2
fi

if [[ "$start" == 1 ]]; then
    if [[ "$MODE" == docker ]]; then
        vg_compose up -d
    else
        vg_local_stop
        vg_local_start
    fi
    "$VG_SCRIPTS_DIR/healthcheck.sh" "${VG_SCALE_ARGS[@]}" --wait "$VG_TIMEOUT"
fi
log "recovery done"
