#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the Slurm executor's tests and for trying
# `cargo xtask run FILE --executor slurm` without a real cluster. Run as root; idempotent: it
# installs what is missing (Debian's slurm-wlm and munge), writes the configuration once, starts
# munged, slurmctld and slurmd unless they run, and waits until the node takes jobs. Started once
# and reused; left running afterwards.
#
#   bash tests/slurm/local-cluster.sh          start (or check) the cluster
#   bash tests/slurm/local-cluster.sh stop     stop its daemons
#
# There is no accounting database (no slurmdbd): job states come from `scontrol show job`,
# which keeps a finished job for MinJobAge (an hour here). docs/cluster.md says more.
set -euo pipefail

conf=/etc/slurm/slurm.conf
logs=/var/log/slurm

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

if [ "${1:-start}" = stop ]; then
    pkill -x slurmd || true
    pkill -x slurmctld || true
    exit 0
fi

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts system daemons); run it with sudo"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get to install them"
    echo "local-cluster: installing slurm-wlm and munge" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi

# munge: a key of 1024 random bytes readable by munge alone, then the daemon.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start (see /var/log/munge/munged.log)"
fi

host=$(hostname -s)
cpus=$(nproc)
# Memory for jobs: the machine's, less 1 GiB for the system.
memory=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$logs"
want=$(cat <<EOF
# Written by distillery's tests/slurm/local-cluster.sh: one node, this machine.
ClusterName=distillery-local
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# No accounting database: finished jobs stay in slurmctld's memory for an hour, where
# scontrol reads their state.
MinJobAge=3600
# A job over its time limit gets SIGTERM, then SIGKILL 5 s later.
KillWait=5
OverTimeLimit=0
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
    printf '%s\n' "$want" >"$conf"
    # A changed configuration needs fresh daemons.
    pkill -x slurmd || true
    pkill -x slurmctld || true
    sleep 1
fi

pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld did not start (see $logs/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd did not start (see $logs/slurmd.log)"

# Wait for the node to take jobs.
for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null || true)
    case "$state" in
        idle* | mix* | alloc*) echo "local-cluster: $host up ($cpus CPUs, $memory MB)" >&2; exit 0 ;;
        down* | drain*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
die "the node $host is not taking jobs (sinfo says '${state:-nothing}'; see $logs/slurmctld.log and $logs/slurmd.log)"
