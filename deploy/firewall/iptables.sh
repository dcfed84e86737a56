#!/usr/bin/env bash
# Host firewall for VoiceGrow on Linux (section 5.2.1 of the deployment document), as iptables rules:
# established traffic, loopback and SSH in; the speakers' WebSocket port and the HTTP API only from the
# networks you name; everything else dropped. Differences from the document, on purpose: MySQL, Redis
# and MinIO are not opened (the stack does not publish them), and the same limits go into DOCKER-USER,
# because Docker's published ports bypass INPUT. Rules live in their own chain, so running it again
# replaces them instead of piling up duplicates.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [--speakers CIDR] [--operators CIDR] [--ssh-from CIDR] [--tls] [--save FILE]
       [--dry-run]

  --speakers CIDR   who may reach the WebSocket port WS_PORT (default 192.168.0.0/16, the document's LAN)
  --operators CIDR  who may reach the HTTP API on HTTP_PORT (default 192.168.0.0/16); ESP32 devices too
  --ssh-from CIDR   who may reach SSH on 22 (default 0.0.0.0/0)
  --tls             also open 80, 443 and 4443 (nginx of docker-compose.scale.yml) to everyone
  --save FILE       write the rules with iptables-save (default /etc/iptables/rules.v4; 'none' to skip)
  --dry-run         print the iptables commands instead of running them
  -h, --help        this text

WS_PORT and HTTP_PORT come from the environment (default 4399 and 8000).
USAGE
}

speakers=192.168.0.0/16
operators=192.168.0.0/16
ssh_from=0.0.0.0/0
tls=0
save=/etc/iptables/rules.v4
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --speakers | --operators | --ssh-from | --save)
            [[ -n "${2:-}" && "$2" != -* ]] || { echo "$(basename "$0"): error: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --speakers) speakers="$2" ;;
                --operators) operators="$2" ;;
                --ssh-from) ssh_from="$2" ;;
                --save) save="$2" ;;
            esac
            shift
            ;;
        --tls) tls=1 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; echo "$(basename "$0"): error: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
for cidr in "$speakers" "$operators" "$ssh_from"; do
    [[ "$cidr" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9]{1,2})?$ ]] || { echo "$(basename "$0"): error: '$cidr' is not an IPv4 address or CIDR" >&2; exit 2; }
done
ws_port="${WS_PORT:-4399}"
http_port="${HTTP_PORT:-8000}"

ipt() {
    if [[ "$dry_run" == 1 ]]; then
        printf 'iptables %s\n' "$*"
    else
        iptables "$@"
    fi
}

[[ "$dry_run" == 1 ]] || [[ "$(id -u)" == 0 ]] || { echo "$(basename "$0"): error: run as root (or --dry-run)" >&2; exit 1; }

# Our own chain, emptied and filled again; INPUT jumps to it once.
ipt -N VOICEGROW-INPUT 2>/dev/null || true
ipt -F VOICEGROW-INPUT
ipt -A VOICEGROW-INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
ipt -A VOICEGROW-INPUT -i lo -j ACCEPT
ipt -A VOICEGROW-INPUT -p tcp --dport 22 -s "$ssh_from" -j ACCEPT
ipt -A VOICEGROW-INPUT -p tcp --dport "$ws_port" -s "$speakers" -j ACCEPT
ipt -A VOICEGROW-INPUT -p tcp --dport "$http_port" -s "$operators" -j ACCEPT
if [[ "$tls" == 1 ]]; then
    for port in 80 443 4443; do
        ipt -A VOICEGROW-INPUT -p tcp --dport "$port" -j ACCEPT
    done
fi
ipt -A VOICEGROW-INPUT -j DROP
if [[ "$dry_run" == 1 ]] || ! iptables -C INPUT -j VOICEGROW-INPUT 2>/dev/null; then
    ipt -I INPUT 1 -j VOICEGROW-INPUT
fi

# Docker's published ports: traffic to the containers passes FORWARD (DOCKER-USER), not INPUT.
ipt -N DOCKER-USER 2>/dev/null || true
ipt -N VOICEGROW-DOCKER 2>/dev/null || true
ipt -F VOICEGROW-DOCKER
ipt -A VOICEGROW-DOCKER -p tcp -m conntrack --ctorigdstport "$ws_port" --ctdir ORIGINAL ! -s "$speakers" -j DROP
ipt -A VOICEGROW-DOCKER -p tcp -m conntrack --ctorigdstport "$http_port" --ctdir ORIGINAL ! -s "$operators" -j DROP
ipt -A VOICEGROW-DOCKER -j RETURN
if [[ "$dry_run" == 1 ]] || ! iptables -C DOCKER-USER -j VOICEGROW-DOCKER 2>/dev/null; then
    ipt -I DOCKER-USER 1 -j VOICEGROW-DOCKER
fi

if [[ "$save" != none ]]; then
    if [[ "$dry_run" == 1 ]]; then
        printf 'iptables-save > %s\n' "$save"
    else
        mkdir -p "$(dirname "$save")"
        iptables-save >"$save"
    fi
fi
