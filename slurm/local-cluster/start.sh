#!/usr/bin/env bash
# Start a real SLURM cluster on this machine (Debian's slurmctld, slurmd and munge), as root.
#
#   start.sh             one node, named after this machine (the default)
#   start.sh --nodes N   N nodes (2 or more) spnode1..spnodeN: each slurmd in its own network and UTS namespace, with its
#                        own host name and address 10.77.0.(10+k) on a private subnet (a bridge spbr0, the controller at
#                        10.77.0.1, a veth pair per node; no route or NAT beyond it), under one slurmctld that sbatch
#                        reaches from the host. Jobs see each node's host name, and torch.distributed's rendezvous
#                        crosses the bridge as it crosses a cluster's network (the interface inside each node is eth0).
#
# Fake GPUs are declared as GRES on character devices /dev/fakegpuN (SPEEDPIPE_FAKE_GPUS per node, default 2), so
# --gpus/--gres=gpu:N requests schedule. Idempotent: with the same cluster up it does nothing; another one up is an
# error (stop.sh first). No accounting database (no sacct), on purpose: speedpipe's launcher must work without it.
# Config at /etc/slurm/slurm.conf (srun ignores SLURM_CONF). stop.sh removes what this script made.
set -euo pipefail
NGPUS=${SPEEDPIPE_FAKE_GPUS:-2}
HOST=$(hostname)
NODES=1
SUBNET=10.77.0
BRIDGE=spbr0
TAG="# speedpipe local cluster"  # marks the /etc/hosts lines stop.sh removes

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=${2:-}; shift; [ $# -gt 0 ] && shift ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    *) echo "start.sh: unknown argument $1 (expected --nodes N)" >&2; exit 2 ;;
  esac
done
if ! [[ "$NODES" =~ ^[0-9]+$ ]] || [ "$NODES" -lt 1 ] || [ "$NODES" -gt 200 ]; then
  echo "start.sh: --nodes: expected a whole number from 1 to 200, got '$NODES'" >&2; exit 2
fi
if [ "$(id -u)" != 0 ]; then echo "start.sh: run as root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

if [ "$NODES" = 1 ]; then NODE_NAMES=$HOST; else NODE_NAMES=$(seq -f "spnode%g" 1 "$NODES" | paste -sd' '); fi
running=$(sinfo -h -N -o %N 2>/dev/null | sort -u | paste -sd' ' || true)
if [ -n "$running" ] && [ "$running" != "$(printf '%s\n' $NODE_NAMES | sort -u | paste -sd' ')" ]; then
  echo "start.sh: a cluster with nodes '$running' is up, not the one asked for ($NODE_NAMES): run stop.sh first" >&2
  exit 1
fi
if [ -n "$running" ] && [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" -ge "$NODES" ]; then
  echo "local SLURM cluster already up: $running"
  exit 0
fi

getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
for i in $(seq 0 $((NGPUS - 1))); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done

if [ "$NODES" = 1 ]; then
  CONTROLLER=$HOST
  STATE=/var/spool/slurmctld
  SLURMD_FILES="SlurmdSpoolDir=/var/spool/slurmd
SlurmdPidFile=/run/slurmd.pid
SlurmdLogFile=/var/log/slurm/slurmd.log"
  NODE_LINES="NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$NGPUS State=UNKNOWN"
  PARTITION_NODES=$HOST
else
  # the network: a bridge with the controller's address, and per node a namespace joined to it by a veth pair
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  # the address tests read ip's whole output first: under pipefail, `ip ... | grep -q` fails now and then (grep quits at
  # its match, ip dies of SIGPIPE), which would add the address twice ("Address already assigned")
  [[ "$(ip addr show dev "$BRIDGE")" == *"inet $SUBNET.1/"* ]] || ip addr add "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  NODE_LINES=""
  for k in $(seq 1 "$NODES"); do
    node=spnode$k addr=$SUBNET.$((10 + k))
    if [[ "$(ip netns exec "$node" ip -4 addr show dev eth0 2>/dev/null || true)" != *"inet $addr/"* ]]; then
      ip netns delete "$node" 2>/dev/null || true  # a set-up cut short: made again from the start
      ip link delete "spv$k" 2>/dev/null || true
      ip netns add "$node"
      ip link add "spv$k" type veth peer name "spv${k}n"
      ip link set "spv$k" master "$BRIDGE"
      ip link set "spv$k" up
      ip link set "spv${k}n" netns "$node"
      ip netns exec "$node" ip link set "spv${k}n" name eth0
      ip netns exec "$node" ip addr add "$addr/24" dev eth0
      ip netns exec "$node" ip link set eth0 up
      ip netns exec "$node" ip link set lo up
    fi
    grep -q "^$addr $node " /etc/hosts || echo "$addr $node $TAG" >> /etc/hosts
    NODE_LINES+="NodeName=$node NodeAddr=$addr CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$NGPUS State=UNKNOWN"$'\n'
  done
  CONTROLLER="$HOST($SUBNET.1)"  # the nodes reach the controller on the bridge (its host name is 127.0.0.1 here)
  STATE=/var/spool/slurmctld-nodes$NODES  # the one-node cluster's job records are not this cluster's
  SLURMD_FILES="SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log"
  PARTITION_NODES=spnode[1-$NODES]
fi
mkdir -p "$STATE"

cat > /etc/slurm/slurm.conf <<EOF
ClusterName=speedpipe-local
SlurmctldHost=$CONTROLLER
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
StateSaveLocation=$STATE
$SLURMD_FILES
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
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
${NODE_LINES%$'\n'}
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
echo "NodeName=$PARTITION_NODES Name=gpu File=/dev/fakegpu[0-$((NGPUS - 1))]" > /etc/slurm/gres.conf

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
if [ "$NODES" = 1 ]; then
  pgrep -x slurmd >/dev/null || slurmd
else
  for node in $NODE_NAMES; do  # only the network and the host name are the node's own: munge's socket, /sys and every
    mkdir -p "/var/spool/slurmd/$node"  # file are shared, as a cluster's shared file system is (ip netns exec remounts /sys)
    pgrep -f "slurmd -N $node\$" >/dev/null \
      || nsenter --net="/run/netns/$node" unshare --uts sh -c "hostname $node && exec slurmd -N $node"
  done
fi

for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$' || true)
  if [ "$idle" -ge "$NODES" ]; then
    echo "local SLURM cluster up: $NODES node(s) ($NODE_NAMES), $CPUS CPUs and $NGPUS fake GPUs each"
    exit 0
  fi
  for node in $NODE_NAMES; do scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true; done
  sleep 1
done
echo "start.sh: not every node became idle; see /var/log/slurm/slurmctld.log and the slurmd logs" >&2
sinfo -N -R >&2 || true
exit 1
