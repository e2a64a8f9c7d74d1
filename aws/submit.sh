#!/bin/bash
# Submit one training run to the stack's Batch queue.
#   aws/submit.sh RUN_NAME [Hydra overrides...]
#   aws/submit.sh rover-s1 +experiment=rover seed=1
#   GPUS=4 VCPUS=48 MEMORY_MIB=180000 aws/submit.sh big +experiment=rover   (needs such instance types)
# The run's checkpoints go to s3://BUCKET/runs/RUN_NAME/checkpoints. Every retry of the job after
# a spot reclaim, and any later submit with the same RUN_NAME, resumes from there; a new
# RUN_NAME starts a new run. Prints the job id (for aws/logs.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=aws/common.sh
source aws/common.sh

RUN_NAME=${1:?usage: aws/submit.sh RUN_NAME [Hydra overrides...]}
shift
[[ $RUN_NAME =~ ^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$ ]] \
  || die "RUN_NAME '$RUN_NAME': letters, digits, - and _ only (it names the job and the S3 prefix)"
for arg in "$@"; do
  case "$arg" in
    run.dir=* | checkpoint.dir=* | run.stop_exit_code=*)
      die "$arg: set by this script from RUN_NAME; leave it out" ;;
  esac
done
overrides=("$@")
if [ ${#overrides[@]} -eq 0 ]; then overrides=(+experiment=rover); fi

BUCKET=$(stack_output "$LUNARL_STACK" CheckpointBucketName)
QUEUE=$(stack_output "$LUNARL_STACK" JobQueueArn)
JOB_DEFINITION=$(stack_output "$LUNARL_STACK" JobDefinitionArn)
CHECKPOINTS="s3://$BUCKET/runs/$RUN_NAME/checkpoints"

# The container command: lunarl.train's Hydra overrides (the image's ENTRYPOINT is the app).
# Exit 75 on SIGTERM after the checkpoint is what the job definition retries on. GPUS, VCPUS and
# MEMORY_MIB, when set, replace the job definition's resources.
container_overrides=$(python3 - "${overrides[@]}" "run.dir=/runs/$RUN_NAME" \
  "checkpoint.dir=$CHECKPOINTS" run.stop_exit_code=75 <<'PY'
import json, os, sys
out = {"command": sys.argv[1:]}
wanted = {"GPU": "GPUS", "VCPU": "VCPUS", "MEMORY": "MEMORY_MIB"}
given = [(kind, os.environ.get(var, "")) for kind, var in wanted.items()]
for kind, value in given:
    if value and not value.isdigit():
        sys.exit(f"submit.sh: {wanted[kind]}={value}: a whole number")
if any(value for _, value in given):
    out["resourceRequirements"] = [{"type": kind, "value": value} for kind, value in given if value]
print(json.dumps(out))
PY
)

echo "run $RUN_NAME: checkpoints in $CHECKPOINTS" >&2
aws batch submit-job \
  --job-name "lunarl-$RUN_NAME" \
  --job-queue "$QUEUE" \
  --job-definition "$JOB_DEFINITION" \
  --container-overrides "$container_overrides" \
  --tags "run=$RUN_NAME" \
  --query jobId --output text
