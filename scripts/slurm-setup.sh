#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for CI and for trying `negalign launch --executor slurm`.
#
#   scripts/slurm-setup.sh start   install slurm-wlm + munge when missing (apt, Debian/Ubuntu),
#                                  write a one-node slurm.conf, start munged, slurmctld, slurmd
#                                  and wait until the node is idle
#   scripts/slurm-setup.sh stop    stop the three daemons this script started (by their PIDs)
#
# Needs root and no systemd (the daemons are started by hand). Debian 12's slurm-wlm 22.05 is
# what CI runs. There is no accounting daemon (slurmdbd), so `sacct` fails; submitit tolerates that
# (negalign hides its "Bypassing sacct error" warnings unless -v). PIDs go to $SLURM_CI_STATE
# (default /run/negalign-slurm). The memory given to the node is $SLURM_CI_MEM_MB (default: what
# `slurmd -C` reports, less 1 GB).
set -euo pipefail

STATE=${SLURM_CI_STATE:-/run/negalign-slurm}
MARK="# written by negalign's scripts/slurm-setup.sh"

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [ -s "$STATE/$name.pid" ] || continue
        pid=$(cat "$STATE/$name.pid")
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$STATE/$name.pid"
    done
}

start() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-setup: run as root (it installs packages and starts daemons)" >&2
        exit 2
    fi
    if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge
    fi
    mkdir -p "$STATE"
    if scontrol ping 2>/dev/null | grep -q 'is UP'; then
        echo "slurm-setup: a SLURM controller is already up; leaving it as it is"
        sinfo
        return 0
    fi
    if [ -s /etc/slurm/slurm.conf ] && ! grep -q "^$MARK" /etc/slurm/slurm.conf; then
        echo "slurm-setup: /etc/slurm/slurm.conf exists and is not this script's; not touching it" >&2
        exit 2
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=${SLURM_CI_MEM_MB:-$(( $(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') - 1024 ))}

    # munge: one key shared by every daemon and client of the cluster (here: this machine)
    if [ ! -s /etc/munge/munge.key ]; then
        head -c 1024 /dev/urandom > /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force   # forks; writes /run/munge/munged.pid
        for _ in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
        cp /run/munge/munged.pid "$STATE/munged.pid"
    fi
    munge -n | unmunge | grep -q 'STATUS: *Success'

    # slurm.conf: this host is controller and only node; no cgroups, no accounting
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    chown slurm:slurm /var/spool/slurmctld /var/log/slurm
    cat > /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=negalign-ci
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=300
# scontrol requeue and preemption requeue a job under the same id; a requeued job may start again
# once its old credential has expired (cred_expire + 1 s; SLURM's default is 120 s; 10 s here keeps
# the requeue test short, and a one-node cluster launches a step well within it)
JobRequeue=1
AuthInfo=cred_expire=10
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
EOF
    /usr/sbin/slurmctld   # both fork and write the pid files named above
    /usr/sbin/slurmd
    for _ in $(seq 1 60); do
        sinfo -h -o '%T' 2>/dev/null | grep -qx idle && break
        sleep 0.5
    done
    if ! sinfo -h -o '%T' | grep -qx idle; then
        echo "slurm-setup: the node did not become idle; see /var/log/slurm/" >&2
        sinfo >&2 || true
        exit 1
    fi
    sinfo
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
