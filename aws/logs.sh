#!/bin/bash
# Follow a job's output (lunarl.train's console log) in CloudWatch, and show its attempts.
#   aws/logs.sh JOB_ID            (the id aws/submit.sh printed)
# Each attempt (a retry after a spot reclaim) has its own log stream; this follows the newest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=aws/common.sh
source aws/common.sh

JOB_ID=${1:?usage: aws/logs.sh JOB_ID}
GROUP=$(stack_output "$LUNARL_STACK" LogGroupName)
aws batch describe-jobs --jobs "$JOB_ID" \
  --query 'jobs[0].{status: status, reason: statusReason, attempts: attempts[].{exit: container.exitCode, reason: container.reason, stopped: statusReason}}' \
  --output yaml
STREAM=$(aws batch describe-jobs --jobs "$JOB_ID" --query 'jobs[0].container.logStreamName' --output text)
[ -n "$STREAM" ] && [ "$STREAM" != None ] || die "job $JOB_ID has no log yet (still waiting for an instance?)"
aws logs tail "$GROUP" --log-stream-names "$STREAM" --follow
