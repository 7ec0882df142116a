#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py and CI (Debian's slurm-wlm and munge).
#
#   tests/cluster/slurm_up.sh               # as root: install if missing, configure, start, wait for the node
#   tests/cluster/slurm_up.sh --no-install  # the same, but never install packages (what the test runs)
#   tests/cluster/slurm_up.sh --check       # only say whether a cluster answers (exit 0) or not (exit 3)
#   tests/cluster/slurm_up.sh --down        # stop the SLURM daemons this script started
#
# Idempotent: installs only what is missing, rewrites its configuration only when it changed, starts
# only the daemons that are not running, and waits until the node accepts jobs. The machine's own
# hostname is controller and compute node (all CPUs, RealMemory = the machine's less 1 GiB), in one
# partition `main`, with one GPU slot unless SLURM_UP_GPUS=0 (a gres backed by /dev/null): jobs that ask
# for a GPU (`--gpus=1`) are scheduled one at a time and get CUDA_VISIBLE_DEVICES from SLURM, as on a
# real cluster; with no CUDA device behind it, `models.device: auto` runs them on the CPU. There is no
# accounting database, so `sacct` cannot report job states: Snakemake's SLURM executor needs
# `--slurm-status-command squeue --slurm-no-account`; finished jobs stay visible to `squeue -t all`
# for an hour (MinJobAge).
#
# It never touches a slurm.conf it did not write (a real cluster's): when one is there and `sinfo`
# answers, it says so and exits 0. Exit status 3 means SLURM cannot be set up here (not root, not
# installed and --no-install or no apt-get, install failed, the node did not come up); the reason is
# on stderr, and the integration test skips with it.
set -euo pipefail

conf_dir=/etc/slurm
conf=$conf_dir/slurm.conf
marker="# written by mmasr tests/cluster/slurm_up.sh"
state=/var/spool/slurmctld
spool=/var/spool/slurmd
logs=/var/log/slurm
gpus=${SLURM_UP_GPUS:-1}
install=1

say() { echo "slurm_up: $*" >&2; }
give_up() { say "$*"; exit 3; }

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1; }

answers() { command -v sinfo >/dev/null && [ -n "$(node_state)" ]; }

case "${1:-}" in
    --check)
        answers && { sinfo; exit 0; }
        say "no SLURM cluster answers here"; exit 3 ;;
    --down)
        for daemon in slurmd slurmctld; do
            pid=$(cat "/run/$daemon.pid" 2>/dev/null || true)
            [ -n "$pid" ] && kill "$pid" 2>/dev/null && say "stopped $daemon ($pid)"
        done
        exit 0 ;;
    --no-install) install=0 ;;
    "") ;;
    *) echo "usage: $0 [--no-install|--check|--down]" >&2; exit 2 ;;
esac

if [ -f "$conf" ] && ! grep -qF "$marker" "$conf"; then
    answers && { say "using the SLURM cluster configured in $conf"; sinfo; exit 0; }
    give_up "$conf was not written by this script and no cluster answers; not touching it"
fi

# 1. Packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    [ "$install" = 1 ] || give_up "SLURM is not installed (tests/cluster/slurm_up.sh installs it as root; .ci/run does)"
    [ "$(id -u)" = 0 ] || give_up "SLURM is not installed and installing it needs root"
    command -v apt-get >/dev/null || give_up "SLURM is not installed and there is no apt-get to install it"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } >/tmp/slurm_up_apt.log 2>&1 \
        || give_up "apt-get install slurm-wlm munge failed (log: /tmp/slurm_up_apt.log): $(tail -n 3 /tmp/slurm_up_apt.log)"
fi
if [ "$(id -u)" != 0 ]; then answers && { sinfo; exit 0; }; give_up "SLURM is installed but not running, and starting it needs root"; fi
case "$gpus" in 0|1) ;; *) give_up "SLURM_UP_GPUS must be 0 or 1 (one /dev/null-backed GPU slot), not $gpus" ;; esac

# 2. Configuration (rewritten only when it changed)
host=$(hostname -s)
# The node's topology as slurmd detects it (CPUs, sockets, cores, threads): a bare CPUs=N that disagrees
# with the hardware's sockets and cores can leave the node with fewer usable CPUs after a restart.
topology=$(slurmd -C | head -n1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
[ -n "$topology" ] || topology="CPUs=$(nproc) "
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
gres_node="" gres_types=""
if [ "$gpus" -gt 0 ]; then gres_node=" Gres=gpu:$gpus" gres_types="GresTypes=gpu"; fi
mkdir -p "$conf_dir" "$state" "$spool" "$logs"
new_conf=$(cat <<EOF
$marker
ClusterName=mmasr
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$state
SlurmdSpoolDir=$spool
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SchedulerType=sched/backfill
$gres_types
NodeName=$host NodeAddr=127.0.0.1 ${topology}RealMemory=$mem_mb$gres_node State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
new_gres="$marker"
if [ "$gpus" -gt 0 ]; then
    new_gres+=$'\n'"AutoDetect=off"
    new_gres+=$'\n'"NodeName=$host Name=gpu File=/dev/null"
fi
changed=0
if [ "$(cat "$conf" 2>/dev/null || true)" != "$new_conf" ]; then echo "$new_conf" > "$conf"; changed=1; fi
if [ "$(cat "$conf_dir/gres.conf" 2>/dev/null || true)" != "$new_gres" ]; then echo "$new_gres" > "$conf_dir/gres.conf"; changed=1; fi
[ -f "$conf_dir/cgroup.conf" ] || echo "$marker" > "$conf_dir/cgroup.conf"

# 3. Daemons: munged, slurmctld, slurmd (each only if not running; restarted when the config changed)
running() { local pid; pid=$(cat "$1" 2>/dev/null || true); [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }

[ -f /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || /usr/sbin/mungekey --create; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! running /run/munge/munged.pid; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged || give_up "munged did not start (see /var/log/munge/munged.log)"
fi
munge -n | unmunge >/dev/null 2>&1 || give_up "munge does not work (credential round trip failed)"

for daemon in slurmctld slurmd; do
    if [ "$changed" = 1 ] && running "/run/$daemon.pid"; then
        say "configuration changed: restarting $daemon"
        kill "$(cat "/run/$daemon.pid")"
        for _ in $(seq 50); do running "/run/$daemon.pid" || break; sleep 0.2; done
    fi
    if ! running "/run/$daemon.pid"; then
        say "starting $daemon"
        "/usr/sbin/$daemon" || give_up "$daemon did not start (see $logs/$daemon.log): $(tail -n 3 "$logs/$daemon.log" 2>/dev/null)"
    fi
done

# 4. Wait until the node accepts jobs (a node left down or drained by an earlier run is resumed).
for _ in $(seq 60); do
    case "$(node_state)" in
        idle*|mix*|alloc*) sinfo; exit 0 ;;
        down*|drain*|drng*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
give_up "the node did not become idle within 60 s (state: $(node_state); see $logs/slurmctld.log, $logs/slurmd.log)"
