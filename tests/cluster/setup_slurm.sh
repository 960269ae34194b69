#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/cluster (run as root on Debian/Ubuntu).
#
#   sudo tests/cluster/setup_slurm.sh        # or: make cluster-test
#
# Installs slurm-wlm and munge with apt-get, writes /etc/slurm/slurm.conf for one node on
# 127.0.0.1 (no cgroups, no GPUs, no slurmdbd), starts munged, slurmctld and slurmd, and waits
# until `sinfo` shows the node idle. Rerunning it is cheap: an idle node is left as it is.
# Without slurmdbd `sacct` has no records, so job status comes from `squeue`, which keeps
# finished jobs for MinJobAge seconds (the test passes --slurm-status-command squeue).
# Stop the daemons with: tests/cluster/setup_slurm.sh stop. While slurm-client is installed and
# slurmctld is down, every snakemake call with the SLURM plugin installed waits ~9 s for
# `scontrol show config` (the plugin asks it at import), so leave the daemons up or stop both.
set -euo pipefail

NODE=$(hostname -s)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm

log() { echo "[setup_slurm] $*" >&2; }

if [[ ${1:-} == stop ]]; then  # the daemons this script started, by their pid files
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "stopping $(basename "$pidfile" .pid) ($(cat "$pidfile"))"
            kill "$(cat "$pidfile")"
        fi
    done
    exit 0
fi

node_idle() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

[[ $(id -u) == 0 ]] || { log "must run as root (apt-get, daemons)"; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # services cannot start through systemd in a container; we start them below
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: one key shared by every daemon and client (here: one host)
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create --force; else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n </dev/null | unmunge >/dev/null || { log "munge does not work"; exit 1; }

CPUS=$(nproc)
# a little under the total, or slurmd finds less than configured and drains the node
MEM_MB=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')

mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
CONF_TEXT=$(cat <<CONF
# Written by kidney-seg tests/cluster/setup_slurm.sh: a one-node test cluster.
ClusterName=kidneyseg
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct has nothing; squeue --states=all reports finished jobs for MinJobAge
# seconds (the test reads every job of its run from squeue at the end)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
)
changed=0
if [[ ! -f $CONF_DIR/slurm.conf ]] || [[ $(cat "$CONF_DIR/slurm.conf") != "$CONF_TEXT" ]]; then
    printf '%s\n' "$CONF_TEXT" >"$CONF_DIR/slurm.conf"
    changed=1
    log "wrote $CONF_DIR/slurm.conf: node $NODE, $CPUS CPUs, $MEM_MB MB"
fi

if ! pgrep -x slurmctld >/dev/null; then
    log "starting slurmctld"
    slurmctld -c   # -c: start clean, no state from an earlier configuration
    changed=0
fi
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
if ! pgrep -x slurmd >/dev/null; then
    log "starting slurmd"
    slurmd
fi
if [[ $changed == 1 ]]; then
    log "configuration changed: scontrol reconfigure"
    scontrol reconfigure
fi

for _ in $(seq 60); do
    if node_idle; then
        log "SLURM up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
        exit 0
    fi
    state=$(sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null || true)
    # a node that came up drained or down (e.g. after a config change) is resumed once
    if [[ $state == drain* || $state == down* ]]; then scontrol update NodeName="$NODE" State=RESUME || true; fi
    sleep 1
done
log "node $NODE did not become idle:"
sinfo -N -l >&2 || true
tail -n 30 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
