#!/bin/bash
# Runs a lunarl training command from an sbatch script so that SLURM's warning ahead of the time
# limit becomes a checkpoint and a requeue. The sbatch script asks for the warning and execs this
# script (exec: `--signal=B:...` signals the batch shell's own pid, which must then be this one):
#
#   #SBATCH --requeue
#   #SBATCH --signal=B:USR1@300
#   exec slurm/requeue_on_signal.sh .venv/bin/python -m lunarl.train run.stop_exit_code=75 ...
#   exec slurm/requeue_on_signal.sh srun .venv/bin/python -m lunarl.train run.stop_exit_code=75 ...
#
# USR1 (time limit near): the training processes get SIGTERM; lunarl.train finishes its chunk,
#   saves a checkpoint and exits with run.stop_exit_code (75). Then the job requeues itself
#   (`scontrol requeue`): it keeps its job id, hence its run.dir, and the next start resumes.
# TERM (scancel, or preemption, which SLURM requeues by itself under --requeue): the same stop,
#   without a requeue from here.
# The training command runs in the background and this shell waits for it, so the traps run at
# once (bash runs a trap only between commands, never while a foreground child runs).
# Under srun the SIGTERM must not go to srun itself, which turns it into a SIGKILL of its tasks;
# `scancel --signal=TERM JOBID` delivers it to the processes of the job's steps on every node
# (not to this batch shell, not to the extern step).
set -uo pipefail

if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]  (from an sbatch script with --signal=B:USR1@SECONDS)" >&2
  exit 2
fi
STOPPED=75          # run.stop_exit_code in the sbatch templates
launcher=$(basename "$1")
child=
stop_asked=0        # a signal asked the training to stop
requeue=0           # ... and it was the time-limit warning

stop_training() {
  if [ -z "$child" ]; then return; fi  # not started yet: done right after the start
  if [ "$launcher" = srun ]; then
    scancel --signal=TERM "${SLURM_JOB_ID:?}" || echo "requeue_on_signal: scancel failed" >&2
  else
    kill -TERM "$child" 2>/dev/null || true
  fi
}

# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  echo "requeue_on_signal: SIG$1 received; asking the training to checkpoint and stop" >&2
  if [ "$1" = USR1 ]; then requeue=1; fi
  if [ "$stop_asked" = 0 ]; then
    stop_asked=1
    stop_training
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

"$@" &
child=$!
if [ "$stop_asked" = 1 ]; then stop_training; fi

# `wait` returns early (status > 128) whenever a trap ran; wait again while the child lives.
while :; do
  wait "$child"
  status=$?
  if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
  break
done

if [ "$requeue" = 1 ]; then
  # 75: stopped after its checkpoint. 5: stopped, but checkpoints for s3:// were not all uploaded
  # in time (they stay in the run dir, which the next start resumes from). 143: killed by the
  # SIGTERM before the app installed its handler, so nothing trained since the last checkpoint.
  # Any other code is a failure (0: the run had finished).
  case "$status" in
    "$STOPPED" | 5 | 143)
      echo "requeue_on_signal: training stopped (exit $status); requeueing job ${SLURM_JOB_ID:?}" >&2
      scontrol requeue "$SLURM_JOB_ID"
      exit $?
      ;;
  esac
  echo "requeue_on_signal: not requeued: the training exited with $status" >&2
fi
exit "$status"
