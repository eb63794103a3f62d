#!/bin/bash
# Start, stop or inspect a real two-node SLURM on this one machine (munged + slurmctld + 2 slurmd) for tests and demos.
#
#   scripts/slurm_cluster.sh start    install Debian's packages if missing, build the network, start the daemons,
#                                     wait for both nodes; a no-op when the cluster is already up
#   scripts/slurm_cluster.sh stop     cancel every job, stop the daemons and every process left in the nodes, remove
#                                     the namespaces and links; safe to repeat
#   scripts/slurm_cluster.sh status   daemons, network and `sinfo`; exit 0 only if every node is usable
#   scripts/slurm_cluster.sh env      print `export SLURM_CONF=...` (use: eval "$(scripts/slurm_cluster.sh env)")
#   scripts/slurm_cluster.sh nodes    one line per node: NAME NETNS ADDRESS (for tests that inspect a node)
#   scripts/slurm_cluster.sh check-stopped  exit 1, listing them, if namespaces, links, mounts, daemons or processes
#                                     of this cluster exist (CI runs it after `stop`)
#   scripts/slurm_cluster.sh exec N CMD...  run CMD inside node N (1 or 2): its network, hostname and /etc/hosts
#
# Layout (ID = MIXMO_SLURM_PORT, default 6817; every name and address below derives from it, so two clusters with
# different ports and directories can run side by side):
#
#   root namespace             switch namespace mixmo<ID>-sw           node namespaces mixmo<ID>-n1, -n2
#   link mixmo<ID>  <--veth-->  host --+                                 (network + UTS + mount namespace each)
#   198.18.S.1/24                      br0 -- n1 <--veth-->  eth0 198.18.S.11  hostname mx<ID>n1  slurmd
#   slurmctld, munged, clients         +----- n2 <--veth-->  eth0 198.18.S.12  hostname mx<ID>n2  slurmd
#
# The subnet 198.18.S.0/24 (S = ID mod 512, inside 198.18.0.0/15, the range reserved for network tests) exists only
# on these links; the nodes have no other route, so no packet leaves the machine. The bridge lives in a namespace of
# its own, where no firewall rule of the host (e.g. Docker's FORWARD policy with br_netfilter) can drop node-to-node
# traffic. slurmctld runs in the root namespace bound to 198.18.S.1 only, where the clients (sbatch, squeue,
# submitit, tests) reach it. Each slurmd runs under `ip netns exec NS unshare --uts --mount`: its own hostname,
# and the cluster's hosts file ($STATE/hosts) bind-mounted over /etc/hosts in its private mount namespace, so every
# node name resolves to its namespace address on every node (for slurmd/srun and for torch: MASTER_ADDR, gloo's
# interface) while the machine's /etc/hosts stays untouched. Job steps (slurmstepd and its tasks) are children of
# slurmd and inherit all three namespaces.
#
# Everything else lives in MIXMO_SLURM_DIR (default /tmp/mixmo-slurm): config, state, spool, logs, a private munge
# key and socket; nothing is written under /etc. Needs root and no systemd. Ports: MIXMO_SLURM_PORT (slurmctld, on
# 198.18.S.1) and the next one (each slurmd, in its own namespace).
# A requeued job waits ~120 s before it may start again; release it with `scontrol update JobId=ID StartTime=now`.
set -euo pipefail

STATE="${MIXMO_SLURM_DIR:-/tmp/mixmo-slurm}"
CONF="$STATE/slurm.conf"
HOSTS="$STATE/hosts"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
CTLD_PORT="${MIXMO_SLURM_PORT:-6817}"
[[ "$CTLD_PORT" =~ ^[0-9]+$ && "$CTLD_PORT" -ge 1024 && "$CTLD_PORT" -lt 65535 ]] ||
    { echo "slurm_cluster: error: MIXMO_SLURM_PORT=$CTLD_PORT: expected a port in [1024, 65535)" >&2 && exit 2; }
SLURMD_PORT=$((CTLD_PORT + 1))
ID="$CTLD_PORT"
NUM_NODES=2
# slurmctld runs under its own hostname (a UTS namespace): it refuses to start unless SlurmctldHost names its host, and
# binds to the address that name resolves to (NoCtldInAddrAny), which its private /etc/hosts makes the link's.
CTLD_NAME="mx${ID}ctl"
SUBNET_INDEX=$((ID % 512))
SUBNET="198.$((18 + SUBNET_INDEX / 256)).$((SUBNET_INDEX % 256))"
CTLD_ADDR="$SUBNET.1"
ROOT_LINK="mixmo$ID"
SWITCH_NS="mixmo$ID-sw"
# Set when this cluster's first `ip netns add` made /run/netns a mount point; stop undoes it when no namespace is left.
NETNS_MOUNT_MARK="$STATE/netns-run-mounted"
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

node_name() { echo "mx${ID}n$1"; }
node_ns() { echo "mixmo$ID-n$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
slurmd_pidfile() { echo "$STATE/slurmd-$(node_name "$1").pid"; }

log() { echo "slurm_cluster: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_root() {
    [[ "$(id -u)" == 0 ]] || die "needs root (it installs packages, creates network namespaces and runs the daemons)"
}

install_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch srun scontrol sinfo munged ip unshare nsenter; do
        command -v "$bin" >/dev/null || missing=1
    done
    [[ "$missing" == 0 ]] && return 0
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is not available"
    log "installing ${PACKAGES[*]} iproute2 util-linux with apt-get"
    # Another apt run (a parallel job) may hold the dpkg lock: wait for it instead of failing.
    export DEBIAN_FRONTEND=noninteractive
    apt-get -qq -o DPkg::Lock::Timeout=600 update >/dev/null
    apt-get -qq -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${PACKAGES[@]}" iproute2 util-linux \
        >/dev/null
}

# pid_alive FILE NAME: the pid in FILE is running and its command name is NAME (guards against reused pids).
pid_alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null)" # the daemon may remove its pid file as it exits
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

netns_exists() { [[ -e "/run/netns/$1" ]]; }

# ------------------------------------------------------------------------------------------------------ network

# The subnet must be ours alone: refuse when any address or route of this machine already covers it.
check_subnet_free() {
    local clash
    clash="$(ip -4 -o addr show | awk -v s="$SUBNET." 'index($4, s) == 1 {print $2 " " $4}')"
    [[ -z "$clash" ]] || die "$SUBNET.0/24 is already assigned on this machine ($clash); choose another MIXMO_SLURM_PORT"
    clash="$(ip -4 route show match "$CTLD_ADDR" | grep -v '^default' || true)"
    [[ -z "$clash" ]] || die "$SUBNET.0/24 is already routed on this machine ($clash); choose another MIXMO_SLURM_PORT"
}

network_up() {
    local i
    ip link show "$ROOT_LINK" >/dev/null 2>&1 || return 1
    netns_exists "$SWITCH_NS" || return 1
    for ((i = 1; i <= NUM_NODES; i++)); do
        netns_exists "$(node_ns "$i")" || return 1
    done
}

make_network() {
    local i ns
    check_subnet_free
    mkdir -p "$STATE"
    # `ip netns add` bind-mounts /run/netns onto itself the first time it is used on a machine; remember that it was
    # us, so that `stop` can undo it.
    if ! mountpoint -q /run/netns 2>/dev/null; then
        touch "$NETNS_MOUNT_MARK"
    fi
    ip netns add "$SWITCH_NS"
    ip -n "$SWITCH_NS" link add br0 type bridge
    ip -n "$SWITCH_NS" link set br0 up
    ip link add "$ROOT_LINK" type veth peer name host netns "$SWITCH_NS"
    ip -n "$SWITCH_NS" link set host master br0 up
    ip addr add "$CTLD_ADDR/24" dev "$ROOT_LINK"
    ip link set "$ROOT_LINK" up
    for ((i = 1; i <= NUM_NODES; i++)); do
        ns="$(node_ns "$i")"
        ip netns add "$ns"
        ip -n "$SWITCH_NS" link add "n$i" type veth peer name eth0 netns "$ns"
        ip -n "$SWITCH_NS" link set "n$i" master br0 up
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

# kill_netns_processes NS: TERM, then KILL after 10 s, every process still in namespace NS (jobs' leftovers).
kill_netns_processes() {
    local ns="$1" pids i
    netns_exists "$ns" || return 0
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [[ -z "$pids" ]] && return 0
    # shellcheck disable=SC2086  # one word per pid
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        [[ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ]] && return 0
        sleep 0.5
    done
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    log "killing what is left in $ns: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        [[ -z "$(ip netns pids "$ns" 2>/dev/null || true)" ]] && return 0
        sleep 0.5
    done
    log "warning: processes survive in $ns: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
}

remove_network() {
    local i ns
    for ((i = 1; i <= NUM_NODES; i++)); do
        ns="$(node_ns "$i")"
        kill_netns_processes "$ns"
        netns_exists "$ns" && ip netns del "$ns"
    done
    kill_netns_processes "$SWITCH_NS"
    netns_exists "$SWITCH_NS" && ip netns del "$SWITCH_NS"
    # The root end disappears with its peer in the switch namespace; this catches a half-built network.
    if ip link show "$ROOT_LINK" >/dev/null 2>&1; then
        ip link del "$ROOT_LINK"
    fi
    if [[ -e "$NETNS_MOUNT_MARK" ]]; then
        if [[ -z "$(ls -A /run/netns 2>/dev/null)" ]] && mountpoint -q /run/netns; then
            umount /run/netns
        fi
        if ! mountpoint -q /run/netns 2>/dev/null; then
            rm -f "$NETNS_MOUNT_MARK"
        fi
    fi
}

# ------------------------------------------------------------------------------------------------------ daemons

write_config() {
    local cpus mem_mb i names
    cpus="$(nproc)"
    # Leave a margin: slurmd drains a node whose measured memory is below RealMemory. Every node sees the whole
    # machine; the scheduler is told each has all of it (memory is not enforced here).
    mem_mb="$(awk '/^MemTotal:/ {m = int($2 / 1024); print (m > 2048 ? m - 1024 : int(m * 0.8))}' /proc/meminfo)"
    names="$(node_name 1)"
    for ((i = 2; i <= NUM_NODES; i++)); do names+=",$(node_name "$i")"; done
    mkdir -p "$STATE/ctld" "$STATE/spool"
    for ((i = 1; i <= NUM_NODES; i++)); do mkdir -p "$STATE/spool/$(node_name "$i")"; done
    cat >"$CONF" <<EOF
# Generated by scripts/slurm_cluster.sh: $NUM_NODES nodes in network namespaces on $SUBNET.0/24, no accounting database.
ClusterName=mixmo
SlurmctldHost=$CTLD_NAME($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# slurmctld binds to $CTLD_ADDR only (not to every address of the machine).
CommunicationParameters=NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
MinJobAge=30
KillWait=15
SlurmdTimeout=60
EOF
    for ((i = 1; i <= NUM_NODES; i++)); do
        echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
    done
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$CONF"

    # /etc/hosts of every node (bind-mounted there): each name resolves to its namespace address, never 127.0.1.1.
    {
        echo "# Generated by scripts/slurm_cluster.sh: /etc/hosts inside the nodes of the cluster in $STATE"
        echo "127.0.0.1 localhost"
        echo "$CTLD_ADDR $CTLD_NAME"
        for ((i = 1; i <= NUM_NODES; i++)); do echo "$(node_addr "$i") $(node_name "$i")"; done
    } >"$HOSTS"
    chmod 0644 "$HOSTS"
}

start_munge() {
    pid_alive "$MUNGE_DIR/munged.pid" munged && return 0
    mkdir -p "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    # munged refuses keys and directories that other users could read or write.
    chown -R munge:munge "$MUNGE_DIR"
    chmod 0711 "$MUNGE_DIR"
    chmod 0400 "$MUNGE_DIR/munge.key"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for 10 "munged" test -S "$MUNGE_SOCKET"
}

# as_host NETNS NAME CMD...: run CMD in network namespace NETNS ("-": this one), in a private UTS and mount
# namespace in which the hostname is NAME and /etc/hosts is the cluster's (a bind mount that exists only in that
# mount namespace). A daemon started this way, and everything it starts, stays inside them.
as_host() {
    local netns="$1" name="$2" enter=()
    shift 2
    # nsenter, not `ip netns exec`: the latter remounts /sys, which hides /sys/fs/cgroup, and slurmd will not start
    # without it.
    [[ "$netns" != - ]] && enter=(nsenter "--net=/run/netns/$netns")
    "${enter[@]}" unshare --uts --mount --propagation private -- \
        /bin/sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' as_host "$HOSTS" "$name" "$@"
}

# in_node I CMD...: run CMD as node I: in its network namespace, under its hostname, with the cluster's /etc/hosts.
in_node() {
    local i="$1"
    shift
    as_host "$(node_ns "$i")" "$(node_name "$i")" "$@"
}

start_slurmd() {
    local i="$1"
    pid_alive "$(slurmd_pidfile "$i")" slurmd && return 0
    in_node "$i" slurmd -f "$CONF" -N "$(node_name "$i")"
}

# wait_for SECONDS WHAT CMD...: retry CMD every 0.5 s.
wait_for() {
    local seconds="$1" what="$2" i
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within ${seconds}s (logs in $STATE)"
}

# One line per node: "NAME STATE".
node_states() {
    SLURM_CONF="$CONF" sinfo -h -N -o "%N %t" 2>/dev/null | sort -u
}

# Up and scheduling: every node idle, or busy with jobs that a restart would kill.
nodes_usable() {
    local states
    states="$(node_states)"
    [[ "$(echo "$states" | grep -c -E ' (idle|alloc|mix|comp)$')" == "$NUM_NODES" ]]
}

daemons_alive() {
    local i
    pid_alive "$MUNGE_DIR/munged.pid" munged || return 1
    pid_alive "$STATE/slurmctld.pid" slurmctld || return 1
    for ((i = 1; i <= NUM_NODES; i++)); do
        pid_alive "$(slurmd_pidfile "$i")" slurmd || return 1
    done
}

cmd_start() {
    need_root
    install_packages
    if network_up && daemons_alive && nodes_usable; then
        log "already running"
        cmd_env
        return 0
    fi
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$STATE"
    make_network
    write_config
    start_munge
    # -c: start from a clean state (no jobs left over from an earlier session in this directory).
    as_host - "$CTLD_NAME" slurmctld -c -f "$CONF"
    wait_for 30 "slurmctld" env SLURM_CONF="$CONF" scontrol ping
    local i t states=""
    for ((i = 1; i <= NUM_NODES; i++)); do start_slurmd "$i"; done
    for ((t = 0; t < 120; t++)); do
        states="$(node_states)"
        [[ "$(echo "$states" | grep -c ' idle$')" == "$NUM_NODES" ]] && break
        if grep -q -E ' drain' <<<"$states" || { grep -q ' down' <<<"$states" && ((t > 40)); }; then
            SLURM_CONF="$CONF" scontrol show node >&2 || true
            die "a node is not usable: $(echo "$states" | tr '\n' ' ')(see $STATE/slurmd-*.log)"
        fi
        sleep 0.5
    done
    [[ "$(echo "$states" | grep -c ' idle$')" == "$NUM_NODES" ]] ||
        die "nodes not idle after 60 s: $(echo "$states" | tr '\n' ' ')(see $STATE/slurmd-*.log)"
    log "$NUM_NODES nodes idle on $SUBNET.0/24: $(echo "$states" | awk '{print $1}' | tr '\n' ' ')($(nproc) CPUs each)"
    cmd_env
}

# proc_is PID NAME: process PID runs and its command name is NAME.
proc_is() { [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }

# stop_daemon NAME PIDFILE: SIGTERM, then SIGKILL after 10 s; returns once the process is gone (a daemon removes its
# pid file before it has finished exiting, so the pid itself is watched).
stop_daemon() {
    local name="$1" pidfile="$2" pid i
    if pid_alive "$pidfile" "$name"; then
        pid="$(cat "$pidfile")"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 20; i++)); do
            proc_is "$pid" "$name" || break
            sleep 0.5
        done
        if proc_is "$pid" "$name"; then
            log "$name ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            for ((i = 0; i < 20; i++)); do
                proc_is "$pid" "$name" || break
                sleep 0.5
            done
        fi
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    need_root
    [[ -d "$STATE" ]] || {
        remove_network
        return 0
    }
    if pid_alive "$STATE/slurmctld.pid" slurmctld; then
        # Jobs would otherwise outlive slurmd as orphaned slurmstepd processes.
        local jobs i
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086  # one word per job id
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [[ -z "$(SLURM_CONF="$CONF" squeue -h -t R,CG -o %i 2>/dev/null)" ]] && break
                sleep 0.5
            done
        fi
    fi
    # slurmd ignores SIGTERM while munged is unreachable, so munged goes last.
    local i
    for ((i = 1; i <= NUM_NODES; i++)); do stop_daemon slurmd "$(slurmd_pidfile "$i")"; done
    stop_daemon slurmd "$STATE/slurmd.pid" # the single-node layout of earlier versions of this script
    # Whatever a job left in a node (a slurmstepd, an orphaned worker) goes with the node's namespace.
    remove_network
    stop_daemon slurmctld "$STATE/slurmctld.pid"
    stop_daemon munged "$MUNGE_DIR/munged.pid"
    log "stopped"
}

cmd_status() {
    local ok=0 name pidfile i
    for name in munged slurmctld; do
        pidfile="$STATE/$name.pid"
        [[ "$name" == munged ]] && pidfile="$MUNGE_DIR/munged.pid"
        if pid_alive "$pidfile" "$name"; then
            echo "$name: running (pid $(cat "$pidfile"))"
        else
            echo "$name: stopped"
            ok=1
        fi
    done
    for ((i = 1; i <= NUM_NODES; i++)); do
        pidfile="$(slurmd_pidfile "$i")"
        if pid_alive "$pidfile" slurmd; then
            echo "slurmd $(node_name "$i"): running (pid $(cat "$pidfile")) in $(node_ns "$i") at $(node_addr "$i")"
        else
            echo "slurmd $(node_name "$i"): stopped"
            ok=1
        fi
    done
    network_up || {
        echo "network: incomplete"
        ok=1
    }
    if [[ "$ok" == 0 ]]; then
        SLURM_CONF="$CONF" sinfo -N || ok=1
        nodes_usable || ok=1
    fi
    return "$ok"
}

cmd_env() {
    echo "export SLURM_CONF=$CONF"
}

cmd_check_stopped() {
    local left=() i ns pidfile pid
    for ns in "$SWITCH_NS" $(for ((i = 1; i <= NUM_NODES; i++)); do node_ns "$i"; done); do
        netns_exists "$ns" && left+=("network namespace $ns")
        mount | grep -q "/run/netns/$ns " && left+=("mount /run/netns/$ns")
    done
    ip link show "$ROOT_LINK" >/dev/null 2>&1 && left+=("link $ROOT_LINK")
    [[ -e "$NETNS_MOUNT_MARK" ]] && mountpoint -q /run/netns && left+=("the /run/netns mount made by start")
    for pidfile in "$MUNGE_DIR/munged.pid" "$STATE"/slurm*.pid; do
        [[ -e "$pidfile" ]] || continue
        pid_alive "$pidfile" "$(basename "$pidfile" .pid | cut -d- -f1)" && left+=("daemon $(cat "$pidfile") ($pidfile)")
    done
    # Daemons and job steps name the config or the state directory on their command line.
    for pid in $(pgrep -f -- "$STATE/" || true); do
        [[ "$pid" == "$$" ]] || left+=("process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)")
    done
    if [[ ${#left[@]} -gt 0 ]]; then
        printf 'slurm_cluster: left behind: %s\n' "${left[@]}" >&2
        return 1
    fi
    log "nothing of the cluster in $STATE is left"
}

cmd_nodes() {
    local i
    for ((i = 1; i <= NUM_NODES; i++)); do echo "$(node_name "$i") $(node_ns "$i") $(node_addr "$i")"; done
}

# exec N CMD...: a shell (or CMD) inside node N, as a job step would see it, for debugging.
cmd_exec() {
    need_root
    local i="${1:-}"
    [[ "$i" =~ ^[0-9]+$ && "$i" -ge 1 && "$i" -le "$NUM_NODES" ]] || die "exec: node number 1..$NUM_NODES expected"
    shift
    netns_exists "$(node_ns "$i")" || die "node $i is not running (start the cluster first)"
    [[ $# -gt 0 ]] || set -- bash
    in_node "$i" env SLURM_CONF="$CONF" "$@"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
nodes) cmd_nodes ;;
check-stopped) cmd_check_stopped ;;
exec)
    shift
    cmd_exec "$@"
    ;;
*)
    echo "usage: $0 start|stop|status|env|nodes|check-stopped|exec N [CMD...]" >&2
    exit 2
    ;;
esac
