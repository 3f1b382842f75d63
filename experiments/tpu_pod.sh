#!/usr/bin/env bash
# Train on a multi-host TPU slice: one process per host, started on every worker at once.
#
#   TPU_NAME=moa-v5p-64 ZONE=us-east5-a ACCELERATOR=v5p-64 RUNS=gs://my-bucket/moa \
#     experiments/tpu_pod.sh configs/moa_2b.py --config.mesh.fsdp=-1 --config.mesh.data=1
#
# Steps: create the TPU VM slice if it does not exist (SPOT=1 for a preemptible one), copy this
# checkout to every worker, install it with JAX for TPU, then start the same train command on all
# workers. JAX finds the other hosts itself (jax.distributed.initialize on a TPU slice needs no flags).
# Checkpoints and metrics go to $RUNS/<run name> (Orbax writes gs:// paths directly); each worker's
# console log is ~/train.log on that worker:
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'
# Preemption: the TPU runtime sends SIGTERM; every host saves the step it is on and exits 0. Run this
# script again to resume from the newest complete checkpoint.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${RUNS:?set RUNS (e.g. gs://bucket/moa)}"
CONFIG=${1:?usage: experiments/tpu_pod.sh CONFIG [--config.k=v ...]}
shift
ACCELERATOR=${ACCELERATOR:-v5p-64}
VERSION=${VERSION:-v2-alpha-tpuv5}
RUN_NAME=${RUN_NAME:-$(basename "$CONFIG" .py)}
tpu=(gcloud compute tpus tpu-vm)

if ! "${tpu[@]}" describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  "${tpu[@]}" create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" --version="$VERSION" \
    ${SPOT:+--spot}
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$repo" --exclude=.venv --exclude=.git --exclude=runs -czf /tmp/moa_jax.tgz .
"${tpu[@]}" scp /tmp/moa_jax.tgz "$TPU_NAME":~/ --zone="$ZONE" --worker=all
"${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p ~/moa_jax && tar -C ~/moa_jax -xzf ~/moa_jax.tgz && cd ~/moa_jax
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate && pip install -q -e . 'jax[tpu]' gcsfs"

# Every host prepares the same corpus and tokenizer (deterministic) in its local cache, then trains.
args=$(printf ' %q' "$@")
"${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/moa_jax && . .venv/bin/activate &&
  nohup python -m moa_jax.train --config=$CONFIG --workdir=$RUNS/$RUN_NAME $args > ~/train.log 2>&1 &"
echo "started $RUN_NAME on every worker of $TPU_NAME; logs: ~/train.log on each worker; run dir: $RUNS/$RUN_NAME"
