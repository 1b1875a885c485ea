#!/bin/bash
# Multi-node DDP (or FSDP2) training of one recipe under SLURM, with automatic requeue on preemption.
#
#   sbatch scripts/slurm_example.sh recipes/quickstart.yaml                 # every cell of the grid
#   sbatch --array=0-14 scripts/slurm_example.sh recipes/ablation.yaml      # one grid cell per array task
#
# Lightning reads the SLURM environment (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, SLURM_NODELIST)
# and sets up the process group itself: one task per GPU, srun starts them all, nothing else to do.
# trainer.devices must equal --ntasks-per-node and trainer.num_nodes must equal --nodes.
#SBATCH --job-name=slr_zoo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=SIGUSR1@90          # 90 s before the time limit: Lightning saves hpc_ckpt_N.ckpt and requeues
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm_example.sh RECIPE [key=value ...]}
shift
CELL=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  CELL=(--cell "$SLURM_ARRAY_TASK_ID")
fi

export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export HF_HUB_OFFLINE=1              # nothing is downloaded at run time
# export NCCL_DEBUG=WARN              # uncomment when a collective hangs

# A requeued job runs this same command again: finished cells are skipped and the interrupted cell
# resumes from the furthest of checkpoints/last.ckpt and hpc_ckpt_N.ckpt (exactly: same data order,
# depths and RNG as an uninterrupted run).
srun python -m slr_zoo.fit "$RECIPE" "${CELL[@]}" \
  trainer.strategy=ddp \
  trainer.accelerator=gpu \
  trainer.devices="$SLURM_NTASKS_PER_NODE" \
  trainer.num_nodes="$SLURM_JOB_NUM_NODES" \
  trainer.precision=bf16-mixed \
  "$@"
