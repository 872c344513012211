#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine (Debian's slurmctld, slurmd and munge), as root.
# Fake GPUs are declared as GRES on character devices /dev/fakegpuN, so --gpus/--gres=gpu:N requests schedule.
# Idempotent: with the cluster up it does nothing. No accounting database (no sacct), on purpose: speedpipe's
# launcher must work without it. Config at /etc/slurm/slurm.conf (srun ignores SLURM_CONF).
set -euo pipefail
NGPUS=${SPEEDPIPE_FAKE_GPUS:-2}
HOST=$(hostname)

if [ "$(id -u)" != 0 ]; then echo "start.sh: run as root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  echo "local SLURM cluster already up on $HOST"
  exit 0
fi

getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
for i in $(seq 0 $((NGPUS - 1))); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=speedpipe-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MessageTimeout=30
MpiDefault=none
ReturnToService=2
MinJobAge=86400
KillWait=5
JobRequeue=1
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$NGPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
echo "NodeName=$HOST Name=gpu File=/dev/fakegpu[0-$((NGPUS - 1))]" > /etc/slurm/gres.conf

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "local SLURM cluster up on $HOST: $CPUS CPUs, $NGPUS fake GPUs"
    exit 0
  fi
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "start.sh: the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo -R >&2 || true
exit 1
