# Shared helpers for the hack/ scripts. Source it; it defines functions and the run directory only.
# shellcheck shell=bash

KUBESAGA_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Everything the local environment writes (data, certificates, logs, pid files) lives here.
KUBESAGA_RUN_DIR=${KUBESAGA_RUN_DIR:-$KUBESAGA_ROOT/.run}

log() { echo "[$(basename "$0" .sh)] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on, from a range the kernel does not hand
# out as ephemeral ports, avoiding those in $KUBESAGA_TAKEN_PORTS (ports chosen earlier in this run).
free_port() {
  local port i
  for i in $(seq 1 200); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 12000))
    case " ${KUBESAGA_TAKEN_PORTS:-} " in *" $port "*) continue ;; esac
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      KUBESAGA_TAKEN_PORTS="${KUBESAGA_TAKEN_PORTS:-} $port"
      echo "$port"
      return 0
    fi
  done
  die "no free TCP port found on 127.0.0.1"
}

# pid_alive PIDFILE BINARY: true when the pid file names a running process started from BINARY.
# Comparing the executable keeps a recycled pid from being mistaken for ours.
pid_alive() {
  local pidfile=$1 binary=$2 pid exe
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -d "/proc/$pid" ] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  [ "${exe% (deleted)}" = "$(readlink -f "$binary")" ]
}

# start_daemon NAME PIDFILE LOGFILE COMMAND...: starts COMMAND in its own session, detached from this shell.
start_daemon() {
  local name=$1 pidfile=$2 logfile=$3
  shift 3
  setsid "$@" </dev/null >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
  log "started $name (pid $!, log $logfile)"
}

# stop_daemon NAME PIDFILE BINARY [SIGNAL]: stops the process the pid file names if it is still ours (with
# SIGNAL, default TERM), and waits for it.
stop_daemon() {
  local name=$1 pidfile=$2 binary=$3 signal=${4:-TERM} pid i
  if pid_alive "$pidfile" "$binary"; then
    pid=$(cat "$pidfile")
    kill "-$signal" "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
      log "$name (pid $pid) ignored SIG$signal for 10s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2s until it succeeds or time runs out.
wait_until() {
  local seconds=$1 what=$2 i
  shift 2
  for i in $(seq 1 $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# apt_install PACKAGE...: installs Debian packages when running as root, or says what to run.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    die "missing $*: install the Debian packages ($*) with 'sudo apt-get install -y $*', or set the URL variable to an existing server"
  fi
  log "installing Debian packages: $*"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } >&2; then
    die "apt-get install $* failed; see the apt output above"
  fi
}

# env_up_stop_on_exit [cluster] [stores]: brings up (or reuses) the named parts of the local environment, exports
# their variables, and on exit stops the parts this script started (what already ran is left running).
# KUBESAGA_KEEP_ENV=1 leaves everything running.
env_up_stop_on_exit() {
  local part
  KUBESAGA_STARTED=()
  for part in "$@"; do
    case $part in
    cluster) "$KUBESAGA_ROOT/hack/cluster.sh" status >/dev/null 2>&1 || KUBESAGA_STARTED+=(cluster) ;;
    stores)
      if [ -z "${REDIS_URL:-}${DATABASE_URL:-}" ] && ! "$KUBESAGA_ROOT/hack/stores.sh" env >/dev/null 2>&1; then
        KUBESAGA_STARTED+=(stores)
      fi
      ;;
    esac
    eval "$("$KUBESAGA_ROOT/hack/$part.sh" up)"
  done
  trap _env_stop_started EXIT
}

_env_stop_started() {
  local status=$? part
  if [ "${KUBESAGA_KEEP_ENV:-}" = 1 ]; then
    log "KUBESAGA_KEEP_ENV=1: leaving the environment running (stop it with 'hack/env.sh down')"
  else
    for part in "${KUBESAGA_STARTED[@]}"; do
      "$KUBESAGA_ROOT/hack/$part.sh" down
    done
  fi
  exit $status
}
