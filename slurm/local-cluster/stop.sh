#!/usr/bin/env bash
# Stop the SLURM cluster started by start.sh (jobs still queued are cancelled first) and remove what it made for
# several nodes: their namespaces, veth pairs, the bridge and their /etc/hosts lines.
set -u
scancel --user=root >/dev/null 2>&1 || true
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
for _ in $(seq 1 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
for node in $(ip netns list 2>/dev/null | awk '/^spnode[0-9]+/ {print $1}'); do
  ip netns delete "$node"  # its end of the veth pair goes with it, and so does the host's end
done
ip link delete spbr0 2>/dev/null || true
hosts=$(grep -v '# speedpipe local cluster$' /etc/hosts || true)  # rewritten in place: /etc/hosts may be a bind mount
printf '%s\n' "$hosts" > /etc/hosts
echo "local SLURM cluster stopped"
