#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by start.sh (jobs still queued are cancelled first).
set -u
scancel --user=root >/dev/null 2>&1 || true
pkill -x slurmd || true
pkill -x slurmctld || true
pkill -x munged || true
echo "local SLURM cluster stopped"
