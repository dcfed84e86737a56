#!/usr/bin/env bash
# Back up the MinIO bucket: `mc mirror` keeps DIR/minio/mirror/<bucket> an exact copy (incremental, so
# a daily run copies only what changed), then the mirror is packed into a timestamped .tar.gz with a
# .sha256, of which the newest 7 are kept: seven days of point-in-time copies.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    cat <<EOF
Usage: $VG_PROG [--local] [--dir DIR] [--keep N] [--env-file FILE]

Mirror bucket MINIO_BUCKET to DIR/minio/mirror/<bucket> and archive it as
DIR/minio/<bucket>_<UTC time>.tar.gz (+ .sha256). Prints the archive's path on stdout.

  --local          run the MinIO client 'mc' on this host against MINIO_ENDPOINT instead of the
                   Compose stack's 'mc' tool service
  --dir DIR        backup root (default \$BACKUP_DIR or /opt/voicegrow/backup)
  --keep N         archives to keep (default \$KEEP_MINIO or 7)
  --env-file FILE  settings file (default /opt/voicegrow/.env); the environment wins over it
  -h, --help       this text
EOF
}

KEEP_MINIO="${KEEP_MINIO:-7}"
VG_OPTIONS="local dir env-file"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep) need_arg "$1" "${2-}"; KEEP_MINIO="$2"; shift ;;
        *) vg_common_option "$@"; shift "$VG_SHIFT"; continue ;;
    esac
    shift
done
need_count --keep "$KEEP_MINIO"
vg_load_config
[[ "$MODE" == docker ]] && vg_need_docker
need_cmd tar gzip sha256sum

umask 077 # the bucket holds users' audio
bucket="${MINIO_BUCKET:-voicegrow}"
archive_dir="$BACKUP_DIR/minio"
mirror_root="$archive_dir/mirror"
mkdir -p "$mirror_root/$bucket"
archive_dir="$(cd "$archive_dir" && pwd)" # docker mode mounts it: it must be absolute
mirror_root="$archive_dir/mirror"

log "mirroring bucket '$bucket' ($MODE mode) to $mirror_root/$bucket"
vg_mc "$mirror_root" mirror --overwrite --remove --quiet "minio/$bucket" "$mirror_root/$bucket" >&2

target="$archive_dir/${bucket}_$(timestamp).tar.gz"
partial="$target.partial"
VG_TEMP_PATHS+=("$partial")
tar -C "$mirror_root" -czf "$partial" -- "$bucket"
mv -- "$partial" "$target"
write_checksum "$target"
prune_backups "$archive_dir" "${bucket}_*.tar.gz" "$KEEP_MINIO"
log "backup done: $target ($(du -h "$target" | cut -f1))"
printf '%s\n' "$target"
