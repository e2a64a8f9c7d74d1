"""The ops files: slurm/, Dockerfile.cuda, aws/ and the submitit launcher config.

Linters from the dev extra (each wheel ships its binary): shellcheck for every shell script,
hadolint for the Dockerfile, cfn-lint for the CloudFormation template. Then what the files must
say (requeue and an early signal in every sbatch header, roles scoped to the stack's bucket and
repository, retries on the exit code of a checkpointed stop), the submitit launcher composed by
Hydra into the sbatch header submitit would submit, and slurm/requeue_on_signal.sh driven with
real signals: USR1 stops a real lunarl.train run (the toy counter agent) with a checkpoint and
requeues the job, through stand-ins for SLURM's commands (scontrol, scancel, srun).
"""

from __future__ import annotations

import email
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

BIN = Path(sys.executable).parent
SBATCH = sorted((REPO / "slurm").glob("*.sbatch"))
SHELL_SCRIPTS = sorted([*(REPO / "slurm").glob("*.sh"), *SBATCH, *(REPO / "aws").glob("*.sh"), *(REPO / "scripts").glob("*.sh")])
STACK = REPO / "aws" / "stack.yaml"
WRAPPER = REPO / "slurm" / "requeue_on_signal.sh"
STOP_CODE = 75  # run.stop_exit_code in the sbatch templates and aws/submit.sh; retried on by both


def linter(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[dev]'")
    return str(path)


def lint(*cmd: str, stdin: str | None = None) -> None:
    proc = subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}{proc.stderr}"


# --------------------------------------------------------------------------------------------
# Linters
# --------------------------------------------------------------------------------------------


def test_every_shell_script_passes_shellcheck():
    names = {p.relative_to(REPO).as_posix() for p in SHELL_SCRIPTS}
    assert {"slurm/requeue_on_signal.sh", "slurm/one_gpu.sbatch", "slurm/multi_node.sbatch", "aws/submit.sh",
            "scripts/device_dreamer.sh"} <= names
    lint(linter("shellcheck"), "--external-sources", *sorted(names))


def _cfn_template() -> dict:
    """aws/stack.yaml as plain data; CloudFormation's short tags (!Ref, !Sub, ...) become
    {"Fn::Name": value} / {"Ref": value}."""

    class Loader(yaml.SafeLoader):
        pass

    def tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {"Ref": value} if suffix == "Ref" else {f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", tag)
    return yaml.load(STACK.read_text(), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def _user_data_script() -> str:
    data = _cfn_template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    parts = [p for p in email.message_from_string(data).walk() if p.get_content_type() == "text/x-shellscript"]
    assert len(parts) == 1
    return parts[0].get_payload()


def test_the_user_data_and_its_spot_watcher_pass_shellcheck():
    script = _user_data_script()
    watcher = re.search(r"<<'WATCHER'\n(.*?)\nWATCHER\n", script, re.S)
    assert watcher, "the spot watcher is not in the launch template's user data"
    assert "spot/instance-action" in watcher.group(1) and "--signal=SIGTERM" in watcher.group(1)
    shellcheck = linter("shellcheck")
    lint(shellcheck, "--shell=bash", "-", stdin=script)
    lint(shellcheck, "--shell=bash", "-", stdin=watcher.group(1))


def test_dockerfile_passes_hadolint():
    lint(linter("hadolint"), "Dockerfile.cuda")


def test_cloudformation_template_passes_cfn_lint():
    lint(linter("cfn-lint"), "--include-checks", "I", "--", "aws/stack.yaml")


# --------------------------------------------------------------------------------------------
# What the files say
# --------------------------------------------------------------------------------------------


def test_dockerfile_caches_dependencies_and_runs_the_train_app_unprivileged():
    lines = [ln.strip() for ln in (REPO / "Dockerfile.cuda").read_text().splitlines()]
    logical = " ".join(ln for ln in lines if not ln.startswith("#")).replace("\\ ", "")
    instructions = [i.strip() for i in re.split(r"\s(?=(?:FROM|ARG|ENV|RUN|COPY|WORKDIR|LABEL|USER|ENTRYPOINT|CMD)\s)", logical)]
    base = instructions[0].split()[1]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), f"base image tag not pinned: {base}"
    copies = [i for i in instructions if i.startswith("COPY")]
    installs = [i for i, ln in enumerate(instructions) if "pip install" in ln]
    # The dependency install sees pyproject.toml only; the source comes after it.
    assert copies[0] == "COPY pyproject.toml ./"
    assert instructions.index(copies[0]) < installs[0] < instructions.index("COPY lunarl ./lunarl")
    assert "--no-deps -e ." in instructions[installs[-1]]
    assert any(i.startswith("USER ") and i.split()[1].split(":")[0] not in ("0", "root") for i in instructions)
    assert instructions[-2] == 'ENTRYPOINT ["python", "-m", "lunarl.train"]'
    text = "\n".join(lines)
    assert "MUJOCO_GL=egl" in text and "libegl1" in text and "--no-install-recommends" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def _sbatch_options(path: Path) -> dict[str, str]:
    options = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.split(None, 1)[1].partition("=")
            options[key] = value
    return options


@pytest.mark.parametrize("path", SBATCH, ids=lambda p: p.name)
def test_sbatch_headers_requeue_and_warn_ahead_of_the_time_limit(path):
    options = _sbatch_options(path)
    assert "--requeue" in options and options["--open-mode"] == "append"
    # USR1 to the batch shell only (B:), early enough to finish a chunk and save.
    warning = re.fullmatch(r"B:USR1@(\d+)", options["--signal"])
    assert warning and int(warning.group(1)) >= 120, options["--signal"]
    body = path.read_text()
    assert re.search(r"^exec slurm/requeue_on_signal\.sh ", body, re.M), "the wrapper must replace the batch shell"
    assert f"run.stop_exit_code={STOP_CODE}" in body and "run.dir=" in body
    assert "SLURM_JOB_ID" in body or "SLURM_ARRAY_JOB_ID" in body  # the run dir survives the requeue


def test_the_four_sbatch_layouts():
    one_gpu, one_node, multi, array = (
        _sbatch_options(REPO / "slurm" / f"{n}.sbatch") for n in ("one_gpu", "one_node", "multi_node", "array")
    )
    assert one_gpu["--gpus-per-node"] == "1" and one_gpu["--ntasks-per-node"] == "1"
    assert int(one_node["--gpus-per-node"]) > 1 and one_node["--ntasks-per-node"] == "1"
    # One process per GPU over several nodes, started by srun (jax.distributed reads SLURM_*).
    assert int(multi["--nodes"]) > 1 and multi["--ntasks-per-node"] == multi["--gpus-per-node"]
    assert "--gpus-per-task" not in multi and "--gpu-bind" not in multi
    assert "requeue_on_signal.sh srun " in (REPO / "slurm" / "multi_node.sbatch").read_text()
    assert "SLURM_ARRAY_TASK_ID" in (REPO / "slurm" / "array.sbatch").read_text()


def _statements(role: dict) -> list[dict]:
    return [s for p in role["Properties"]["Policies"] for s in p["PolicyDocument"]["Statement"]]


def _as_list(x):
    return x if isinstance(x, list) else [x]


def test_stack_roles_reach_only_the_bucket_and_the_repository():
    res = _cfn_template()["Resources"]
    bucket_refs = ({"Fn::GetAtt": "CheckpointBucket.Arn"}, {"Fn::Sub": "${CheckpointBucket.Arn}/*"})
    for name in ("JobRole", "ExecutionRole", "InstanceRole"):
        for st in _statements(res[name]):
            if "Fn::If" in st:  # the optional wandb secret: only that secret
                st = st["Fn::If"][1]
                assert st["Action"] == "secretsmanager:GetSecretValue" and st["Resource"] == {"Ref": "WandbApiKeySecretArn"}
                continue
            actions = _as_list(st["Action"])
            assert st["Effect"] == "Allow" and not any(a.endswith(":*") or a == "*" for a in actions), (name, actions)
            for action in actions:
                service = action.split(":")[0]
                if st["Resource"] == "*":
                    # Account-wide by nature (no resource-level scope), or the ECS agent's own calls.
                    registry_login = action == "ecr:GetAuthorizationToken" and name != "JobRole"
                    agent = name == "InstanceRole" and (service == "ecs" or action == "ec2:DescribeTags")
                    assert registry_login or agent, (name, action)
                elif service == "s3":
                    assert name == "JobRole" and st["Resource"] in bucket_refs, (name, st)
                elif service == "ecr":
                    assert name != "JobRole" and st["Resource"] == {"Fn::GetAtt": "Repository.Arn"}, (name, st)
                else:
                    assert service == "logs" and st["Resource"] == {"Fn::GetAtt": "LogGroup.Arn"}, (name, st)
    job = res["JobDefinition"]["Properties"]["ContainerProperties"]
    assert job["JobRoleArn"] == {"Fn::GetAtt": "JobRole.Arn"} and job["ExecutionRoleArn"] == {"Fn::GetAtt": "ExecutionRole.Arn"}
    access = res["CheckpointBucket"]["Properties"]["PublicAccessBlockConfiguration"]
    assert all(access[k] is True for k in ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    assert res["CheckpointBucket"]["Properties"]["BucketEncryption"]
    # IMDSv2 only, one hop: containers cannot borrow the instance role.
    metadata = res["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert metadata["HttpTokens"] == "required" and metadata["HttpPutResponseHopLimit"] == 1


def test_stack_runs_on_gpu_spot_and_retries_a_checkpointed_stop():
    res = _cfn_template()["Resources"]
    compute = res["ComputeEnvironment"]["Properties"]["ComputeResources"]
    assert compute["Type"] == "SPOT" and compute["AllocationStrategy"] in ("SPOT_PRICE_CAPACITY_OPTIMIZED", "SPOT_CAPACITY_OPTIMIZED")
    assert compute["MinvCpus"] == 0
    types = _cfn_template()["Parameters"]["InstanceTypes"]["Default"].split(",")
    assert types and all(re.fullmatch(r"g[56]\.\w+", t) for t in types)
    job = res["JobDefinition"]["Properties"]
    rules = job["RetryStrategy"]["EvaluateOnExit"]
    assert {"OnExitCode": str(STOP_CODE), "Action": "RETRY"} in rules
    assert {"OnExitCode": "5", "Action": "RETRY"} in rules  # an upload cut short: resume from S3's newest step
    assert any(r.get("OnStatusReason", "").startswith("Host EC2") and r["Action"] == "RETRY" for r in rules)
    assert rules[-1] == {"OnReason": "*", "Action": "EXIT"} and job["RetryStrategy"]["Attempts"] > 1
    assert f"run.stop_exit_code={STOP_CODE}" in job["ContainerProperties"]["Command"]
    submit = (REPO / "aws" / "submit.sh").read_text()
    assert f"run.stop_exit_code={STOP_CODE}" in submit and "checkpoint.dir=$CHECKPOINTS" in submit
    assert "ECS_CONTAINER_STOP_TIMEOUT=" in _user_data_script()


def test_submitit_launcher_config_composes_into_an_sbatch_header(tmp_path, fake_slurm, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from lunarl.run.schema import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", f"run.dir={tmp_path}/sweep"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["submitit_folder"] == f"{tmp_path}/sweep/.submitit/%j"
    assert launcher["max_num_timeout"] >= 1 and launcher["signal_delay_s"] >= 120
    # The parameters as hydra-submitit-launcher hands them to submitit, then submitit's sbatch file
    # (submitit's SLURM executor wants an srun on PATH).
    monkeypatch.setenv("PATH", fake_slurm["PATH"])
    init_keys = {"_target_", "submitit_folder", "max_num_timeout"}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm", slurm_max_num_timeout=launcher["max_num_timeout"])
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items() if k not in init_keys})
    header = executor._executor._make_submission_file_text("python -m lunarl.train", "0")  # noqa: SLF001
    for line in ("#SBATCH --requeue", f"#SBATCH --signal=USR2@{launcher['signal_delay_s']}", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=720", "#SBATCH --open-mode=append"):
        assert line in header.splitlines(), f"{line} not in\n{header}"


# --------------------------------------------------------------------------------------------
# slurm/requeue_on_signal.sh with real signals
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_slurm(tmp_path) -> dict[str, str]:
    """Stand-ins for scontrol, scancel and srun on PATH, logging their calls to tmp_path. srun
    behaves like the real one where it matters: it starts the task, and a SIGTERM to srun itself
    kills the task (SIGKILL); scancel --signal=TERM delivers SIGTERM to the task, as slurmstepd
    would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": 'echo "$*" >> "$FAKE_SLURM/scontrol.log"\n',
        "scancel": 'echo "$*" >> "$FAKE_SLURM/scancel.log"\nkill -TERM "$(cat "$FAKE_SLURM/task.pid")"\n',
        "srun": (
            "trap 'echo TERM >> \"$FAKE_SLURM/srun.signals\"; kill -KILL $task' TERM\n"
            '"$@" &\ntask=$!\necho $task > "$FAKE_SLURM/task.pid"\n'
            "while :; do wait $task; rc=$?; if [ $rc -gt 128 ] && kill -0 $task 2>/dev/null; then continue; fi; exit $rc; done\n"
        ),
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM": str(tmp_path), "SLURM_JOB_ID": "4242"}


def _stand_in_trainer(tmp_path: Path, finishes: bool = False, code: int = STOP_CODE) -> list[str]:
    """A process that stops like lunarl.train (SIGTERM -> exit 75) and marks when it runs."""
    script = tmp_path / "trainer.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"trap 'echo stopped > \"{tmp_path}/trainer.out\"; exit {code}' TERM\n"
        f"touch \"{tmp_path}/trainer.started\"\n"
        + ("sleep 0.5; exit 0\n" if finishes else "while :; do sleep 0.05; done\n")
    )
    script.chmod(0o755)
    return [str(script)]


def _start(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(WRAPPER), *cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _log(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("through_srun", [False, True], ids=["direct", "srun"])
def test_usr1_stops_the_training_then_requeues(through_srun, tmp_path, fake_slurm):
    env = {**os.environ, **fake_slurm}
    cmd = (["srun"] if through_srun else []) + _stand_in_trainer(tmp_path)
    proc = _start(cmd, env, tmp_path)
    _wait_for(tmp_path / "trainer.started", proc, 30)
    if through_srun:
        _wait_for(tmp_path / "task.pid", proc, 30)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert _log(tmp_path, "trainer.out") == ["stopped"]  # a SIGTERM reached the trainer and it stopped itself
    assert _log(tmp_path, "scontrol.log") == ["requeue 4242"]
    # Under srun the SIGTERM goes through scancel to the job's steps, never to srun itself.
    assert _log(tmp_path, "scancel.log") == (["--signal=TERM 4242"] if through_srun else [])
    assert _log(tmp_path, "srun.signals") == []


@pytest.mark.parametrize("code, requeued", [(5, True), (1, False)], ids=["upload-cut-short", "failed"])
def test_usr1_requeues_only_a_resumable_stop(code, requeued, tmp_path, fake_slurm):
    proc = _start(_stand_in_trainer(tmp_path, code=code), {**os.environ, **fake_slurm}, tmp_path)
    _wait_for(tmp_path / "trainer.started", proc, 30)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=30)
    assert _log(tmp_path, "scontrol.log") == (["requeue 4242"] if requeued else [])
    assert proc.returncode == (0 if requeued else code)


def test_term_stops_the_training_without_a_requeue(tmp_path, fake_slurm):
    proc = _start(_stand_in_trainer(tmp_path), {**os.environ, **fake_slurm}, tmp_path)
    _wait_for(tmp_path / "trainer.started", proc, 30)
    proc.send_signal(signal.SIGTERM)  # scancel or preemption: SLURM decides about a requeue
    proc.communicate(timeout=30)
    assert proc.returncode == STOP_CODE
    assert _log(tmp_path, "trainer.out") == ["stopped"] and _log(tmp_path, "scontrol.log") == []


def test_a_finished_run_is_not_requeued(tmp_path, fake_slurm):
    proc = _start(_stand_in_trainer(tmp_path, finishes=True), {**os.environ, **fake_slurm}, tmp_path)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and _log(tmp_path, "scontrol.log") == []


# A real lunarl.train run of the toy counter agent (tests/counter_agent.py): 2 seeds x 4 envs x
# 8 steps per iteration, chunks of 2 iterations (the program tests/test_agent_contract.py compiles,
# so the shared compilation cache has it), no periodic checkpoint, far from finishing.
COUNTER = [
    f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
    "agent=counter",
    "env=rover",
    "env.num_envs=4",
    "env.episode_length=5",
    "num_seeds=2",
    "run.log_every=2",
    "run.eval_every=0",
    "run.checkpoint_every=100000",
    "run.total_env_steps=100000000",
    "logger.wandb.mode=disabled",
    "logger.console=false",
    f"run.stop_exit_code={STOP_CODE}",
]


def test_usr1_checkpoints_a_real_training_run_and_requeues_the_job(tmp_path, app_env, fake_slurm):
    run_dir = tmp_path / "run"
    env = {**app_env, **fake_slurm}
    proc = _start([sys.executable, "-m", "lunarl.train", *COUNTER, f"run.dir={run_dir}"], env, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().strip()):  # a chunk ran: the app handles SIGTERM
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no chunk finished in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at iteration (\d+)/", out)
    assert stopped, out + err[-3000:]
    assert f"training stopped (exit {STOP_CODE}); requeueing job 4242" in err
    assert _log(tmp_path, "scontrol.log") == ["requeue 4242"]
    # The checkpoint of the iteration it stopped at (no periodic one was due), for the requeued job.
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert steps == [int(stopped.group(1))] and steps[0] % 2 == 0
    # A checkpointed stop is no error: the run dir keeps what Hydra and the app wrote.
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "config.yaml").exists()
