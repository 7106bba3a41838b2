#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine: a head node plus N worker nodes,
# each a separate `ray start` with its own node IP (127.0.0.2, 127.0.0.3, ...), its own
# CPUs and a custom resource `node_<i>` so that tests can place work on a given node.
# Token authentication stays on. `stop` ends exactly the processes this script started
# (never `ray stop`, which would also kill other people's Ray on this machine).
#
#   cluster/local_cluster.sh start --workers 2 --cpus-per-worker 1
#   metaray train configs/sine-maml.yaml --set workers.address="$(cluster/local_cluster.sh address)"
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# State: <state dir>/cluster.env, KEY=VALUE lines (id, address, head_ip, worker_ips, ray_temp_dir,
# token, sids, pids, ...). Every process the cluster runs carries METARAY_LOCAL_CLUSTER=<id> in its
# environment, and every `ray start` runs in its own session (setsid): `stop` signals only those.
# See cluster/README.md ("A multi-node cluster on one machine") for the details.
set -euo pipefail

PROG=local_cluster.sh
MARKER_VAR=METARAY_LOCAL_CLUSTER   # set in the environment of every Ray process we start

usage() {
    cat <<EOF
Usage: $PROG COMMAND [OPTIONS]

Commands:
  start     start a head node (no CPUs, like a real cluster) and N worker nodes
  stop      stop every process that 'start' started, and nothing else
  status    show the cluster's address, nodes and processes (exit 1 if none is running)
  address   print only the address to pass as workers.address
  env       print the shell exports a client needs (token authentication)

Options:
  --workers N            worker nodes (default 2)
  --cpus-per-worker N    CPUs per worker node (default 1)
  --gpus-per-worker N    GPUs per worker node (default 0; all nodes share this machine's GPUs)
  --object-store-mb N    object store per node in MB (default 256)
  --head-ip IP           head node IP (default 127.0.0.2; workers take the next addresses).
                         Not 127.0.0.1: Ray rewrites it to the machine's external address.
  --dashboard            start the dashboard (bound to 127.0.0.1), e.g. for 'ray job submit'
  --token-file PATH      auth token file (default: \$RAY_AUTH_TOKEN, \$RAY_AUTH_TOKEN_PATH, else
                         ~/.ray/auth_token, generated with 'ray get-auth-token --generate' if missing)
  --state-dir DIR        where the cluster's state lives (default \$METARAY_LOCAL_CLUSTER_DIR,
                         else \${TMPDIR:-/tmp}/metaray-local-cluster-\$(id -u))
  --grace SECONDS        stop: seconds per shutdown phase before SIGKILL (default 5)
  --keep-logs            stop: keep Ray's session logs (deleted by default)
EOF
}

die() { echo "$PROG: $*" >&2; exit 2; }    # user mistakes
fail() { echo "$PROG: $*" >&2; exit 1; }   # things that went wrong

# ---------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
COMMAND=$1; shift
case "$COMMAND" in
    start|stop|status|address|env) ;;
    -h|--help|help) usage; exit 0 ;;
    *) die "unknown command '$COMMAND' (expected start, stop, status, address or env; see --help)" ;;
esac

WORKERS=2 CPUS=1 GPUS=0 OBJECT_STORE_MB=256 HEAD_IP=127.0.0.2 DASHBOARD=0 TOKEN_FILE="" GRACE=5 KEEP_LOGS=0 STATE_OPT=""
STATE_DIR=${METARAY_LOCAL_CLUSTER_DIR:-${TMPDIR:-/tmp}/metaray-local-cluster-$(id -u)}
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
while [[ $# -gt 0 ]]; do
    opt=$1
    case "$opt" in
        --dashboard) DASHBOARD=1; shift; continue ;;
        --keep-logs) KEEP_LOGS=1; shift; continue ;;
        -h|--help) usage; exit 0 ;;
    esac
    [[ $# -ge 2 ]] || die "$opt needs a value (see --help)"
    val=$2; shift 2
    case "$opt" in
        --workers) is_uint "$val" && ((val >= 1 && val <= 200)) || die "--workers must be 1..200, got '$val'"; WORKERS=$val ;;
        --cpus-per-worker) is_uint "$val" && ((val >= 1)) || die "--cpus-per-worker must be a whole number >= 1, got '$val'"; CPUS=$val ;;
        --gpus-per-worker) is_uint "$val" || die "--gpus-per-worker must be a whole number >= 0, got '$val'"; GPUS=$val ;;
        --object-store-mb) is_uint "$val" && ((val >= 80)) || die "--object-store-mb must be >= 80, got '$val'"; OBJECT_STORE_MB=$val ;;
        --head-ip) [[ $val =~ ^127\.[0-9]+\.[0-9]+\.([0-9]+)$ ]] && [[ $val != 127.0.0.1 ]] \
                       || die "--head-ip must be a loopback address other than 127.0.0.1 (e.g. 127.0.0.2), got '$val'"
                   HEAD_IP=$val ;;
        --token-file) TOKEN_FILE=$val ;;
        --state-dir) STATE_DIR=$val; STATE_OPT=" --state-dir $(printf %q "$val")" ;;
        --grace) is_uint "$val" || die "--grace must be a whole number of seconds, got '$val'"; GRACE=$val ;;
        *) die "unknown option '$opt' (see --help)" ;;
    esac
done

RAY_BIN=${RAY_BIN:-$(command -v ray || true)}
[[ -n $RAY_BIN ]] || die "'ray' is not on PATH; activate the project's environment first (. .venv/bin/activate)"
PYTHON=$(dirname "$RAY_BIN")/python
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
STATE_FILE=$STATE_DIR/cluster.env

# ---------------------------------------------------------------- state
# cluster.env holds KEY=VALUE lines (no quoting); it is parsed, never sourced.
declare -A S=()
load_state() {
    S=()
    [[ -f $STATE_FILE ]] || return 1
    local key value
    while IFS='=' read -r key value; do
        if [[ -n $key && $key != \#* ]]; then S[$key]=$value; fi
    done <"$STATE_FILE"
    [[ -n ${S[id]:-} ]]
}

# The processes of the cluster: every process whose environment carries our marker
# (everything `ray start` launched inherits it: GCS, raylets, agents, workers, job drivers)
# plus every process in the sessions the `ray start`s ran in (setsid gave each its own).
cluster_pids() {
    local id=$1 sids=" ${2:-} " pid sid
    {
        grep -lsxzF "$MARKER_VAR=$id" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
        if [[ -n ${2:-} ]]; then
            ps -eo pid=,sid= | while read -r pid sid; do
                if [[ $sids == *" $sid "* ]]; then echo "$pid"; fi
            done
        fi
    } | sort -nu | while read -r pid; do
        if [[ $pid != "$$" && $pid != "$BASHPID" ]] && alive "$pid"; then echo "$pid"; fi
    done
    return 0
}
absolute() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $st != Z* ]]; }
comm_of() { ps -o comm= -p "$1" 2>/dev/null || true; }

# Stop in Ray's own order: raylets first (their agents fate-share), then the rest, GCS last.
# Each phase gets GRACE seconds after SIGTERM, then SIGKILL.
terminate() {
    local id=$1 sids=$2 phase pid waited left victims
    for phase in raylet others gcs_server; do
        victims=()
        for pid in $(cluster_pids "$id" "$sids"); do
            case "$phase:$(comm_of "$pid")" in
                raylet:raylet|gcs_server:gcs_server) victims+=("$pid") ;;
                others:raylet|others:gcs_server|raylet:*|gcs_server:*) ;;
                others:*) victims+=("$pid") ;;
            esac
        done
        if ((${#victims[@]} == 0)); then continue; fi
        kill -TERM "${victims[@]}" 2>/dev/null || true
        for ((waited = 0; waited < GRACE * 5; waited++)); do
            left=0
            for pid in "${victims[@]}"; do if alive "$pid"; then left=1; fi; done
            if ((left == 0)); then break; fi
            sleep 0.2
        done
        for pid in "${victims[@]}"; do
            if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
        done
    done
    # Anything that appeared meanwhile (a worker forked during shutdown) goes too.
    for ((waited = 0; waited < 25; waited++)); do
        left=$(cluster_pids "$id" "$sids")
        if [[ -z $left ]]; then return 0; fi
        kill -KILL $left 2>/dev/null || true
        sleep 0.2
    done
    [[ -z $(cluster_pids "$id" "$sids") ]]
}

token_exports() {
    echo "export RAY_AUTH_MODE=token"
    case "${S[token]}" in
        env:RAY_AUTH_TOKEN) echo "# the token is the RAY_AUTH_TOKEN of the shell that started the cluster" ;;
        *) echo "export RAY_AUTH_TOKEN_PATH=$(printf %q "${S[token]}")" ;;
    esac
}

# ---------------------------------------------------------------- commands
cmd_status() {
    if ! load_state; then
        echo "No local cluster (state dir $STATE_DIR)."
        return 1
    fi
    local pids n
    pids=$(cluster_pids "${S[id]}" "${S[sids]}")
    n=$(wc -w <<<"$pids")
    if ((n == 0)); then
        echo "The local cluster recorded in $STATE_DIR is not running (all its processes are gone); clean up with: $0 stop$STATE_OPT"
        return 1
    fi
    echo "Local Ray cluster (Ray ${S[ray_version]}, started ${S[started]}), token authentication on"
    echo "  address:  ${S[address]}     (workers.address)"
    echo "  head:     ${S[head_ip]} (no CPUs)"
    echo "  workers:  ${S[workers]} x {CPU: ${S[cpus_per_worker]}, GPU: ${S[gpus_per_worker]}, node_<i>: 1} at ${S[worker_ips]}"
    [[ ${S[dashboard]} == 0 ]] || echo "  dashboard: http://127.0.0.1:${S[dashboard_port]}"
    echo "  processes: $n alive ($(echo $pids))"
    echo "  logs:     ${S[ray_temp_dir]}/session_latest/logs"
    if [[ ${1:-} == --ray-status ]]; then
        (eval "$(token_exports)"; timeout 30 "$RAY_BIN" status --address "${S[address]}" 2>&1) || true
    fi
}

cmd_stop() {
    if ! load_state; then
        echo "No local cluster to stop (state dir $STATE_DIR)."
        return 0
    fi
    local n
    n=$(cluster_pids "${S[id]}" "${S[sids]}" | wc -w)
    if ! terminate "${S[id]}" "${S[sids]}"; then
        fail "some processes of the cluster survived SIGKILL: $(cluster_pids "${S[id]}" "${S[sids]}" | tr '\n' ' ')"
    fi
    if ((KEEP_LOGS)); then
        echo "Ray logs kept in ${S[ray_temp_dir]}"
    elif [[ -n ${S[ray_temp_dir]} && -d ${S[ray_temp_dir]} && ${S[ray_temp_dir]} == */mrc.* ]]; then
        rm -rf -- "${S[ray_temp_dir]}"
    fi
    rm -f -- "$STATE_FILE"
    echo "Stopped the local cluster at ${S[address]} ($n processes)."
}

cmd_start() {
    if load_state; then
        if [[ -n $(cluster_pids "${S[id]}" "${S[sids]}") ]]; then
            fail "a local cluster is already running at ${S[address]} (state dir $STATE_DIR); stop it first: $0 stop$STATE_OPT"
        fi
        echo "Cleaning up a local cluster that is no longer running (state dir $STATE_DIR)."
        cmd_stop >/dev/null
    fi
    command -v setsid >/dev/null || die "setsid (util-linux) is required"
    if ((DASHBOARD)) && ! "$PYTHON" -c "import sys, ray._private.utils as u; sys.exit(u.get_dashboard_dependency_error() is not None)" 2>/dev/null; then
        die "--dashboard (and 'ray job submit') needs the full Ray install: pip install 'ray[default]==$("$RAY_BIN" --version | awk '{print $NF}')'"
    fi

    # Token authentication on, with Ray's own token precedence; the token itself is never printed.
    local token
    if [[ -n $TOKEN_FILE ]]; then
        [[ -s $TOKEN_FILE ]] || die "--token-file $TOKEN_FILE: no such file, or empty"
        export RAY_AUTH_TOKEN_PATH; RAY_AUTH_TOKEN_PATH=$(absolute "$TOKEN_FILE")
        unset RAY_AUTH_TOKEN; token=$RAY_AUTH_TOKEN_PATH
    elif [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
        token=env:RAY_AUTH_TOKEN
    elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        [[ -s $RAY_AUTH_TOKEN_PATH ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH: no such file, or empty"
        RAY_AUTH_TOKEN_PATH=$(absolute "$RAY_AUTH_TOKEN_PATH"); token=$RAY_AUTH_TOKEN_PATH
    else
        token=$HOME/.ray/auth_token
        if [[ ! -s $token ]]; then
            echo "No Ray auth token yet: generating $token (ray get-auth-token --generate)."
            "$RAY_BIN" get-auth-token --generate >/dev/null 2>&1 || fail "could not generate a token with 'ray get-auth-token --generate'"
        fi
    fi
    export RAY_AUTH_MODE=token
    # `ray job stop` sends SIGTERM, then SIGKILL after this many seconds (Ray's default: 3): time for metaray
    # to finish its meta-step, checkpoint and end its MLflow run.
    export RAY_JOB_STOP_WAIT_TIME_S=${RAY_JOB_STOP_WAIT_TIME_S:-120}

    local prefix=${HEAD_IP%.*} first=${HEAD_IP##*.} i
    ((first + WORKERS <= 254)) || die "--head-ip $HEAD_IP leaves no room for $WORKERS workers (last octet must stay <= 254)"
    local worker_ips=()
    for ((i = 1; i <= WORKERS; i++)); do worker_ips+=("$prefix.$((first + i))"); done

    # Free ports, picked together so that none is picked twice. GCS listens on every interface.
    local ports
    read -r -a ports <<<"$("$PYTHON" - "$((3 + WORKERS))" <<'EOF'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("0.0.0.0", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
)"
    local gcs_port=${ports[0]} dashboard_port=${ports[1]} address=$HEAD_IP:${ports[0]}

    # Ray's temp dir must be short: its unix sockets live inside it (108-byte path limit).
    local tmp_root=${TMPDIR:-/tmp}
    ((${#tmp_root} <= 40)) || tmp_root=/tmp
    local ray_temp_dir id
    ray_temp_dir=$(mktemp -d "$tmp_root/mrc.XXXXXX")
    id=$(basename "$ray_temp_dir")-$$-$RANDOM
    local object_store=$((OBJECT_STORE_MB * 1024 * 1024))
    local ray_version
    ray_version=$("$RAY_BIN" --version 2>/dev/null | awk '{print $NF}')

    # The state is written before anything starts, so that 'stop' can always clean up.
    write_state() (
        umask 077
        cat >"$STATE_FILE.tmp" <<EOF
id=$id
address=$address
head_ip=$HEAD_IP
gcs_port=$gcs_port
dashboard=$DASHBOARD
dashboard_port=$dashboard_port
workers=$WORKERS
worker_ips=${worker_ips[*]}
cpus_per_worker=$CPUS
gpus_per_worker=$GPUS
ray_temp_dir=$ray_temp_dir
token=$token
ray_version=$ray_version
started=$(date '+%Y-%m-%d %H:%M:%S')
sids=$1
pids=$2
EOF
        mv -f "$STATE_FILE.tmp" "$STATE_FILE"
    )
    write_state "" ""
    on_interrupt() {
        trap - INT TERM
        echo "$PROG: interrupted; stopping what was started" >&2
        if load_state; then cmd_stop >&2 || true; fi
        exit 130
    }
    trap on_interrupt INT TERM

    start_node() {  # log name, then `ray start` arguments
        local log=$ray_temp_dir/start-$1.log; shift
        if ! setsid -w env "$MARKER_VAR=$id" "$RAY_BIN" start "$@" --temp-dir "$ray_temp_dir" \
                --object-store-memory "$object_store" --disable-usage-stats >"$log" 2>&1; then
            echo "$PROG: 'ray start $*' failed; its output ($log):" >&2
            tail -n 25 "$log" >&2
            KEEP_LOGS=1; if load_state; then cmd_stop >&2 || true; fi
            fail "could not start the local cluster (Ray logs kept in $ray_temp_dir)"
        fi
    }

    local head_args=(--head --node-ip-address "$HEAD_IP" --port "$gcs_port" --num-cpus 0 --num-gpus 0
                     --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port"
                     --dashboard-agent-listen-port "${ports[2]}")
    if ((DASHBOARD)); then head_args+=(--include-dashboard true); else head_args+=(--include-dashboard false); fi
    if "$PYTHON" -c "import grpc" 2>/dev/null; then   # ray[client] installed: keep it off the shared port 10001
        head_args+=(--ray-client-server-port "$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0", 0)); print(s.getsockname()[1])')")
    fi
    echo "Starting the head node at $address (no CPUs) ..."
    start_node head "${head_args[@]}"
    for ((i = 1; i <= WORKERS; i++)); do
        echo "Starting worker node $i at ${worker_ips[i - 1]} ($CPUS CPU, $GPUS GPU, resource node_$i) ..."
        start_node "worker-$i" --address "$address" --node-ip-address "${worker_ips[i - 1]}" \
            --num-cpus "$CPUS" --num-gpus "$GPUS" --resources "{\"node_$i\": 1}" \
            --dashboard-agent-listen-port "${ports[2 + i]}"
    done

    # Record the sessions and processes (setsid gave every `ray start` its own session).
    local pids pid sid sids="" own_sid
    own_sid=$(ps -o sid= -p $$ | tr -d ' ')
    pids=$(cluster_pids "$id" "")
    for pid in $pids; do
        sid=$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ') || continue
        if [[ -n $sid && $sid != "$own_sid" && " $sids " != *" $sid "* ]]; then sids+="${sids:+ }$sid"; fi
    done
    write_state "$sids" "$(echo $pids)"
    trap - INT TERM

    echo
    echo "Local Ray cluster up: head + $WORKERS worker nodes, token authentication on."
    echo "  address:  $address"
    echo "  state:    $STATE_DIR (stop with: $0 stop$STATE_OPT)"
    if ((DASHBOARD)); then
        echo "  dashboard: http://127.0.0.1:$dashboard_port   (ray job submit --address http://127.0.0.1:$dashboard_port ...)"
    fi
    echo "Use it (the client needs the cluster's token):"
    load_state
    token_exports | sed 's/^/  /'
    echo "  metaray train configs/sine-maml.yaml --set workers.address=$address --set workers.num_workers=$WORKERS"
}

# ---------------------------------------------------------------- main
mkdir -p -m 700 "$STATE_DIR" || die "cannot create the state dir $STATE_DIR"
[[ -O $STATE_DIR ]] || die "the state dir $STATE_DIR belongs to someone else; pick another with --state-dir"
case "$COMMAND" in
    address) load_state || fail "no local cluster (state dir $STATE_DIR)"; echo "${S[address]}"; exit 0 ;;
    env) load_state || fail "no local cluster (state dir $STATE_DIR)"; token_exports; exit 0 ;;
    status) cmd_status --ray-status; exit ;;
esac
exec 9>"$STATE_DIR/lock"
flock -n 9 || fail "another '$PROG' is starting or stopping the cluster in $STATE_DIR"
"cmd_$COMMAND"
