"""``python -m lunarl.evaluate run.dir=PATH [checkpoint=latest|best|ITERATION] eval.episodes=N``.

Restores a checkpoint of a training run (env, agent and network shape come from the config saved
with it), runs ``eval.episodes`` vmapped episodes with the deterministic policy of every seed, and
prints and saves (``<run.dir>/eval-<which>-<iteration>.json``) the mean and std of the return, the
success rate and the episode length. ``eval.video=true`` also writes a video of one deterministic
episode of seed 0's policy to ``<run.dir>/videos/`` (MP4; ``eval.video_format=gif`` for a GIF).
``+env.FIELD=VALUE`` evaluates in a variant of the saved env (other reward weights, more rocks),
as long as the observation and action sizes stay the same.
A run trained with ``checkpoint.dir=s3://...`` (or ``checkpoint_dir=s3://bucket/prefix`` with
any ``run.dir`` for the output, e.g. on another machine) is evaluated from the bucket: the
checkpoint is downloaded into ``~/.cache/lunarl/s3/`` (``$XDG_CACHE_HOME``), nothing is written
to the bucket.
Exit codes: 0 done; 1 missing run dir or checkpoint, an unreachable bucket, or a bad override (the message names it);
4 the checkpoint is damaged (every array is read and checked against the digest saved with it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lunarl.run.cli import fail, quiet_libraries, release_stderr, run_app
from lunarl.run.schema import ConfigError, EvalAppSchema, check_bounds, register_schemas

__all__ = ["evaluate_run", "main"]

EXIT_DAMAGED = 4

register_schemas()


def _env_variant(env: Any, name: str, overrides: dict[str, Any]) -> Any:
    """``env`` with ``overrides`` applied to its config, checked like the train app's ``env.*``."""
    import lunarl.envs

    try:
        variant = lunarl.envs.env_class(name)(env.config.replace(**overrides))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"env override {overrides}: {e}") from e
    if (variant.observation_size, variant.action_size) != (env.observation_size, env.action_size):
        raise ConfigError(
            f"env override {overrides} changes the observation or action size "
            f"({env.observation_size}, {env.action_size}) -> ({variant.observation_size}, "
            f"{variant.action_size}); the policy cannot act in that env"
        )
    return variant


def evaluate_run(app: EvalAppSchema) -> dict[str, Any]:
    """Evaluate a checkpoint of ``app.run.dir``; returns what is written to the JSON file."""
    import jax

    from lunarl.run.checkpoint import CheckpointError
    from lunarl.run.evaluation import eval_keys, eval_row, make_evaluator
    from lunarl.run.restore import checkpoint_dir_of, restore_run

    run_dir = Path(app.run.dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"no run directory at {run_dir}")
    saved = restore_run(app.checkpoint_dir or checkpoint_dir_of(run_dir), app.checkpoint)
    plan, env, agent, meta = saved.plan, saved.env, saved.agent, saved.meta
    params = jax.vmap(agent.policy_params)(saved.state)
    if app.env:
        # The state above was restored with the saved env (its shapes); only acting uses the variant.
        env = _env_variant(env, plan.env_name, app.env)
    evaluator = make_evaluator(agent, env, plan.agent_config, app.eval.episodes, app.eval.deterministic)
    if plan.population is not None:  # every member on its seeds' episodes; eval/ is the best member
        keys = plan.population.eval_keys(app.eval.seed, meta["iteration"])
        row = plan.population.eval_row(jax.device_get(evaluator(params, keys)))
    else:
        keys = eval_keys(app.eval.seed, meta["iteration"], plan.cfg.num_seeds)
        row = eval_row(jax.device_get(evaluator(params, keys)))
    result: dict[str, Any] = {
        "env_overrides": dict(app.env),
        "checkpoint": app.checkpoint,
        "iteration": meta["iteration"],
        "global_step": meta["global_step"],
        "env": plan.env_name,
        "agent": agent.name,
        "episodes_per_seed": app.eval.episodes,
        "deterministic": app.eval.deterministic,
        **row,
    }
    stem = f"eval-{app.checkpoint}-{meta['iteration']}" + "".join(f"-{k}={v}" for k, v in app.env.items())
    if app.eval.video:
        from lunarl.run.video import VideoRecorder

        if app.eval.video_format not in ("mp4", "gif"):
            raise ConfigError(f"eval.video_format={app.eval.video_format!r}: allowed mp4, gif")
        seed0 = jax.tree.map(lambda x: x[0], params)
        name = f"{stem}-step{meta['global_step']:09d}.{app.eval.video_format}"
        video = VideoRecorder(agent, env, plan.agent_config, app.eval.video_format).record(seed0, keys[0], run_dir / "videos" / name)
        result["video"] = str(video.path)
    result["saved"] = str(run_dir / f"{stem}.json")
    Path(result["saved"]).write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    release_stderr()  # Hydra composed the config: its errors are behind us
    quiet_libraries()
    from lunarl.run.checkpoint import CheckpointDamaged, CheckpointError

    try:
        app: EvalAppSchema = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        check_bounds(app, "")
        result = evaluate_run(app)
    except CheckpointDamaged as e:
        fail("lunarl.evaluate", f"{e}; evaluate an older one with checkpoint=ITERATION", EXIT_DAMAGED)
    except (ConfigError, CheckpointError) as e:
        fail("lunarl.evaluate", str(e))
    except Exception as e:  # omegaconf's MissingMandatoryValue for run.dir, and the like
        if type(e).__module__.startswith("omegaconf"):
            fail("lunarl.evaluate", " ".join(str(e).split()))
        raise
    variant = "".join(f" {k}={v}" for k, v in result["env_overrides"].items())
    print(
        f"{result['env']}{variant} @ iteration {result['iteration']} ({result['global_step']:,} env steps), "
        f"{result['episodes_per_seed']} episodes per seed: return {result['eval/episode_return']:.2f} "
        f"± {result['eval/episode_return_std']:.2f}, success {result['eval/success_rate']:.1%}, "
        f"length {result['eval/episode_length']:.1f}"
    )
    print(f"saved {result['saved']}" + (f" and {result['video']}" if "video" in result else ""))


if __name__ == "__main__":
    # ``env.FIELD=VALUE`` (or ``+env.FIELD=VALUE``) evaluates in a variant of the saved env.
    run_app("lunarl.evaluate", main, EvalAppSchema, appended_groups=("env",))
