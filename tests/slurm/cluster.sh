#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests and developers. Runs as root.
#
#   tests/slurm/cluster.sh start    # installs slurm-wlm + munge if missing, starts munged, slurmctld, slurmd;
#                                   # prints `export SLURM_CONF=...` on stdout (use: eval "$(... start)")
#   tests/slurm/cluster.sh status   # daemons alive? node state
#   tests/slurm/cluster.sh stop     # stops slurmd, slurmctld, and munged if this script started it
#
# Idempotent: `start` on a running cluster only prints the env again; `stop` on a stopped one does nothing.
# Environment: CKPT_WATCH_SLURM_DIR (state dir, default /tmp/ckpt-watch-slurm),
#              CKPT_WATCH_SLURM_CPUS (CPUs the node offers, default the machine's: more jobs at once),
#              CKPT_WATCH_SLURM_CGROUP=1 (task/cgroup + proctrack/cgroup: memory limits end jobs OUT_OF_MEMORY;
#                needs a writable cgroup memory controller),
#              CKPT_WATCH_SLURM_START_TIMEOUT (seconds to wait for the node to come up, default 60).
# Job states stay queryable with `scontrol show job` for MinJobAge (a day), and every finished job gets one
# line in $CKPT_WATCH_SLURM_DIR/jobcomp.log (jobcomp/filetxt): final states without slurmdbd.
set -euo pipefail

STATE_DIR=${CKPT_WATCH_SLURM_DIR:-/tmp/ckpt-watch-slurm}
START_TIMEOUT=${CKPT_WATCH_SLURM_START_TIMEOUT:-60}
CONF=$STATE_DIR/slurm.conf
MUNGE_SOCKET_DIR=/run/munge
export SLURM_CONF=$CONF

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are not installed and installing them needs root"
    say "installing slurm-wlm and munge with apt"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh container has no package lists yet: update only when the first try fails.
    apt-get install -y -q slurm-wlm munge >&2 || { apt-get update -q >&2 && apt-get install -y -q slurm-wlm munge >&2; } \
        || die "apt-get install slurm-wlm munge failed"
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # a munged already answers
    install -d -o munge -g munge -m 0755 "$MUNGE_SOCKET_DIR"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged --pid-file="$MUNGE_SOCKET_DIR/munged.pid"
    cp "$MUNGE_SOCKET_DIR/munged.pid" "$STATE_DIR/munged.pid"  # marks that we started it: `stop` ends it
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged started but does not answer on $MUNGE_SOCKET_DIR/munge.socket.2"
}

write_conf() {
    local node cpus_and_memory cpus memory
    node=$(hostname -s)
    # `slurmd -C` prints this machine's line, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105"; drop UpTime.
    cpus_and_memory=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$cpus_and_memory")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$cpus_and_memory")
    if [[ -n ${CKPT_WATCH_SLURM_CPUS:-} ]]; then  # more job slots than cores (config_overrides allows it)
        cpus=$CKPT_WATCH_SLURM_CPUS
        cpus_and_memory="CPUs=$cpus RealMemory=$memory"
    fi
    local proctrack=proctrack/linuxproc task_plugin=task/none acct_gather=jobacct_gather/linux
    local acct_params=JobAcctGatherParams=OverMemoryKill
    if [[ ${CKPT_WATCH_SLURM_CGROUP:-0} == 1 ]]; then  # checked on cgroup v1 with a memory controller
        proctrack=proctrack/cgroup task_plugin=task/cgroup acct_gather=jobacct_gather/cgroup acct_params=""
        printf 'CgroupPlugin=autodetect\nConstrainRAMSpace=yes\nConstrainSwapSpace=yes\n' > "$STATE_DIR/cgroup.conf"
    else
        rm -f "$STATE_DIR/cgroup.conf"
    fi
    cat > "$CONF.new" <<EOF
# Written by tests/slurm/cluster.sh: a one-node cluster for tests.
ClusterName=ckptwatch
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=$proctrack
TaskPlugin=$task_plugin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default a job asks for the whole node's memory and jobs run one at a time.
DefMemPerCPU=$((memory / cpus))
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
# No slurmdbd: sacct does not work. Final states come from scontrol (kept a day) and the jobcomp file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/jobcomp.log
MinJobAge=86400
# task/none: memory over --mem is killed by polling; the job ends FAILED (Reason=JobLaunchFailure, ExitCode 0:9).
# task/cgroup: the kernel's OOM killer; the job ends OUT_OF_MEMORY.
JobAcctGatherType=$acct_gather
JobAcctGatherFrequency=task=1
$acct_params
# Tests want quick ends: a time limit is hard, and SIGKILL follows SIGTERM after 2 s.
OverTimeLimit=0
KillWait=2
InactiveLimit=0
SchedulerType=sched/backfill
NodeName=$node $cpus_and_memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
}

node_state() { sinfo -h -n "$(hostname -s)" -o %T 2>/dev/null | head -1; }

start() {
    install_packages
    [[ $(id -u) == 0 ]] || die "start needs root (slurmd and munged run as root/munge)"
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/slurmd"
    start_munge
    [[ -s $CONF ]] && alive "$STATE_DIR/slurmctld.pid" || write_conf
    alive "$STATE_DIR/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start: see $STATE_DIR/slurmctld.log"
    alive "$STATE_DIR/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start: see $STATE_DIR/slurmd.log"
    local deadline=$((SECONDS + START_TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        # idle on a fresh start; mixed/allocated when jobs from before a restart still run.
        [[ $state =~ ^(idle|mixed|allocated)$ ]] && { echo "export SLURM_CONF=$CONF"; return; }
        sleep 0.5
    done
    die "node $(hostname -s) not up after ${START_TIMEOUT}s (state '${state:-none}'): see $STATE_DIR/slurmctld.log and slurmd.log"
}

stop() {
    local f pid jobs
    # Jobs' slurmstepd processes outlive slurmd: cancel what is left so nothing of the cluster keeps running.
    if alive "$STATE_DIR/slurmctld.pid"; then
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        [[ -n $jobs ]] && scancel $jobs 2>/dev/null && sleep 3
    fi
    for f in slurmd slurmctld munged; do
        alive "$STATE_DIR/$f.pid" || { rm -f "$STATE_DIR/$f.pid"; continue; }
        pid=$(cat "$STATE_DIR/$f.pid")
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && die "$f ($pid) still runs 10 s after SIGTERM"
        rm -f "$STATE_DIR/$f.pid"
    done
}

status() {
    local f rc=0
    for f in munged slurmctld slurmd; do
        if alive "$STATE_DIR/$f.pid"; then echo "$f: running (pid $(cat "$STATE_DIR/$f.pid"))"
        elif [[ $f == munged ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then echo "munged: running (not started here)"
        else echo "$f: stopped"; rc=1; fi
    done
    ((rc == 0)) && echo "node $(hostname -s): $(node_state)"
    return $rc
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
