#!/usr/bin/env bash
# The micro experiment end to end through `snakemake --profile slurm/profile` on the local two-node cluster
# (start.sh --nodes 2 first): training and sampling as 2 nodes x 1 task, distillation as 1 node x 2 tasks, encode and
# reference as one-task SLURM jobs, the one-process stages local. Its results go to a scratch folder (argument 1).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/speedpipe-micro-profile}
SNAKEMAKE=${SNAKEMAKE:-$REPO/.venv/bin/snakemake}
rm -rf "$WORK"; mkdir -p "$WORK/configs"
cp -r "$REPO/configs/mnist5k" "$WORK/configs/mnist5k"
sed -e "s#configs/mnist5k/#$WORK/configs/mnist5k/#" "$REPO/tests/data/micro.yaml" | sed '/^launcher:/,$d' > "$WORK/micro.yaml"
cat >> "$WORK/micro.yaml" <<'YAML'
launcher:
  default: {executor: slurm, cpus_per_task: 1, mem_gb: 2, time_min: 20, poll_seconds: 1}
  train: {executor: slurm, nodes: 2, tasks_per_node: 1, cpus_per_task: 1, mem_gb: 2, time_min: 20, poll_seconds: 1}
  distill: {executor: slurm, nodes: 1, tasks_per_node: 2, cpus_per_task: 1, mem_gb: 2, time_min: 20, poll_seconds: 1}
  sample: {executor: slurm, nodes: 2, tasks_per_node: 1, cpus_per_task: 1, mem_gb: 2, time_min: 20, poll_seconds: 1}
  autoencoder: {executor: local}
  classifier: {executor: local}
  evaluate: {executor: local}
  report: {executor: local}
YAML
cd "$REPO"
start=$(date +%s)
"$SNAKEMAKE" --profile slurm/profile --directory "$WORK" --configfile "$WORK/micro.yaml" --cores 8
echo "micro experiment through slurm/profile: $(( $(date +%s) - start )) s; results in $WORK/results/micro"
