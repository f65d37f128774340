#!/usr/bin/env bash
# Multi-node training on a Slurm cluster: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch scripts/slurm_train.sh configs/mnist_dit_gqa.yaml --train.batch_size 64
#
# Everything after the recipe is passed to training.train as config overrides. The per-process batch is
# `train.batch_size`; the global batch is batch_size x (nodes x GPUs per node) x gradient_accumulation_steps.
# `output_dir` must be on a file system every node sees (checkpoints are written by all processes).
# Resume a preempted job by resubmitting it with `--checkpoint.resume_from_checkpoint latest`.
# Mixed precision follows `train.mixed_precision` (auto: bf16 on GPUs that support it).
#
# Adjust the #SBATCH lines (partition, account, GPU type) to your cluster.
#SBATCH --job-name=scratch-diffusion
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out

set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm_train.sh configs/<recipe>.yaml [--section.key value ...]}
shift

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
# The first node of the allocation hosts the rendezvous.
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

# One task per node; each computes its machine rank from SLURM_PROCID at run time (hence the single quotes).
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --multi_gpu \
    --num_machines "'"$SLURM_NNODES"'" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --machine_rank "$SLURM_PROCID" \
    --main_process_ip "'"$MAIN_PROCESS_IP"'" \
    --main_process_port "'"$MAIN_PROCESS_PORT"'" \
    --rdzv_backend c10d \
    -m training.train --config "$0" "$@"
' "$RECIPE" "$@"
