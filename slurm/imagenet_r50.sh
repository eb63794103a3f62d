#!/bin/bash
# Train Cut-MixMo ResNet-50 on ImageNet with SLURM: `sbatch slurm/imagenet_r50.sh [--section.key=value ...]`.
#
# Submit from the repository root (the job finds the code through $SLURM_SUBMIT_DIR, or set MIXMO_REPO).
# Precedence, highest first:
#   1. sbatch's own command-line flags override the #SBATCH lines below, e.g.
#        sbatch --nodes=4 --time=12:00:00 --partition=gpu --account=me slurm/imagenet_r50.sh
#   2. environment variables (exported when you call sbatch; sbatch passes the environment on) override the rest:
#        MIXMO_CONFIG           config file          (default configs/imagenet_r50_cutmixmo.yaml)
#        MIXMO_OVERRIDES        extra trainer words, shell-quoted, e.g. "--data.root=/ds/imagenet --optim.lr=0.4";
#                               split with Python's shlex, never evaluated by a shell
#        MIXMO_ACCELERATE_ARGS  extra `accelerate launch` flags, e.g. "--mixed_precision bf16"
#        MIXMO_PROCS_PER_NODE   processes per node   (default: the GPUs SLURM gives each node, else 1)
#        MIXMO_PYTHON           interpreter          (default: $REPO/.venv/bin/python if present, else python3)
#        MIXMO_MAIN_PROCESS_PORT rendezvous port     (default: derived from the job id)
#   3. words after the script name are appended to the trainer's command line (after MIXMO_OVERRIDES);
#      `--config FILE` there replaces MIXMO_CONFIG.
#
# Preemption and time limit: SLURM sends SIGUSR2 120 s before the end (--signal). Every rank sets a flag, the
# ranks agree at the next step boundary, save a checkpoint, and rank 0 runs `scontrol requeue $SLURM_JOB_ID`
# (MIXMO_REQUEUE_CMD=scontrol, set by mixmo_dist.slurm_launch). The requeued job keeps its id, appends to the same
# log (--open-mode=append) and resumes from the latest checkpoint in run.output_dir.
# Faults (a lost peer, a hang): the surviving ranks requeue the job themselves (fault.max_requeues in a row); if the
# step ends before their request gets out, this script requeues it from the ranks' faults.jsonl records.
#
# CPU smoke test on a node without GPUs (2-process gloo world):
#   MIXMO_CONFIG=configs/demo.yaml MIXMO_PROCS_PER_NODE=2 MIXMO_OVERRIDES="--data.root=data/demo" \
#     sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=2 --mem=4G slurm/imagenet_r50.sh
#
# One task per node: mixmo_dist.slurm_launch turns it into `accelerate launch` with one process per GPU.
#SBATCH --job-name=mixmo-r50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

REPO="${MIXMO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$REPO/mixmo_dist/slurm_launch.py" ]]; then
    echo "imagenet_r50.sh: $REPO is not the mixmo_dist repository; submit from its root or set MIXMO_REPO" >&2
    exit 2
fi
cd "$REPO"

if [[ -n "${MIXMO_PYTHON:-}" ]]; then
    PY="$MIXMO_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
    PY="$REPO/.venv/bin/python"
else
    PY=python3
fi

# torchrun's agent forwards only the signals listed here to the ranks; SIGUSR2 must be one of them, or it kills the
# agent and the ranks never save. slurm_launch sets the same (PET_SIGNALS_TO_HANDLE is what torch actually reads).
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2}"
export PYTHONUNBUFFERED=1

echo "[$(date -Is)] job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}: $PY"

srun_args=(--ntasks-per-node=1 --ntasks="${SLURM_NNODES:-1}" --kill-on-bad-exit=1)
# Since SLURM 22.05, srun no longer inherits --cpus-per-task from sbatch.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
# Not `exec`: when the step fails, this script (outside the step) requeues the job if a rank recorded that it decided
# to (a lost peer, a hang). The rank's own `scontrol requeue` can be killed with the step (--kill-on-bad-exit) before
# it reaches slurmctld; a second request for a job already requeued is refused, which is harmless.
status=0
srun "${srun_args[@]}" "$PY" -m mixmo_dist.slurm_launch "$@" || status=$?
if (( status != 0 )); then
    echo "[$(date -Is)] job ${SLURM_JOB_ID:-?}: the training step ended with status $status"
    "$PY" -m mixmo_dist.slurm_launch --after-failed-step "$@" || true
fi
exit "$status"
