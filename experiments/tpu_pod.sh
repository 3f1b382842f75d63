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
# Data: the 2B configs read FineWeb-Edu as Parquet (docs/data.md, "A real corpus"). Prepare it once into a
# gs:// cache from worker 0 (the same user, so the same ~ path as training; the default boot disk holds
# sample/10BT, a larger one or a mounted disk sample/100BT), then pass CACHE so every worker reads that copy:
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='cd ~/moa_jax && . .venv/bin/activate &&
#     pip install -q huggingface_hub && hf download HuggingFaceFW/fineweb-edu --repo-type=dataset
#     --include="sample/100BT/*" --local-dir=$HOME/data/fineweb-edu && python -m moa_jax.data.prepare
#     --source="parquet:~/data/fineweb-edu/sample/100BT/*.parquet" --vocab_size=32000 --cache_dir=gs://BUCKET/cache'
#   CACHE=gs://BUCKET/cache experiments/tpu_pod.sh configs/moa_2b.py ...
# TPU VM images run Ubuntu 22.04, whose python3 is 3.10; moa_jax needs >= 3.11, so the install step uses
# python3.12 or python3.11 where present and installs python3.11 from Ubuntu's packages otherwise.
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
  PY=\$(command -v python3.12 || command -v python3.11 || true)
  if [ -z \"\$PY\" ]; then
    sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv && PY=python3.11
  fi
  [ -d .venv ] || \$PY -m venv .venv
  . .venv/bin/activate && pip install -q -U pip && pip install -q -e '.[tpu]'"

# With CACHE every host reads the prepared copy; without it every host prepares the same corpus and tokenizer
# (deterministic) in its local cache, from source files that must then be on every worker.
args=$(printf ' %q' "$@" ${CACHE:+--config.data.cache_dir=$CACHE})
"${tpu[@]}" ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/moa_jax && . .venv/bin/activate &&
  nohup python -m moa_jax.train --config=$CONFIG --workdir=$RUNS/$RUN_NAME $args > ~/train.log 2>&1 &"
echo "started $RUN_NAME on every worker of $TPU_NAME; logs: ~/train.log on each worker; run dir: $RUNS/$RUN_NAME"
