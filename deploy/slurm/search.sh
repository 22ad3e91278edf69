#!/bin/bash
# Submit a mapnet-tune search as one SLURM job array, from a login node, in a checkout on a
# file system the compute nodes share (where `make setup` made .venv):
#
#   bash deploy/slurm/search.sh                      # a journal file beside the checkout
#   MAPNET_TUNE_STORAGE=postgresql+psycopg2://optuna:PASSWORD@db.lab.internal/optuna \
#     bash deploy/slurm/search.sh                    # PostgreSQL, for many workers
#
# DATASET, STUDY, TRIALS, WORKERS, PARTITION, TIME and GPUS change the defaults below. The
# workers get the storage and the tracking server from this environment (sbatch passes it
# on), never on a command line.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
. .venv/bin/activate

export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-$(cat "$HOME/.mapnet-tune/mlflow-uri")}
# journal:/// then an absolute path (four slashes in all); the folder must be shared.
export MAPNET_TUNE_STORAGE=${MAPNET_TUNE_STORAGE:-journal:///$PWD/optuna-journal.log}
dataset=${DATASET:-drive}

# The dataset cache (.mapnet-tune/cache here) is shared with the workers; prepare it once:
#   mapnet-tune prepare --dataset drive --source /shared/data/DRIVE
mapnet-tune search --dataset "$dataset" --study "${STUDY:-$dataset}" --trials "${TRIALS:-50}" \
  --executor slurm --workers "${WORKERS:-8}" --slurm-partition "${PARTITION:-gpu}" \
  --slurm-time "${TIME:-4h}" --slurm-gpus-per-worker "${GPUS:-1}" \
  --slurm-option cpus-per-task=8 --slurm-option mem=32G --slurm-requeue
