"""What a rollout video costs, per env: the compiled episode, drawing the frames on the host, and
encoding them (MP4 and GIF), for one full-length episode of a freshly initialised PPO policy.

    python scripts/bench_video.py [--envs rover,car_track,kuka] [--repeats 2]

Prints a table and writes ``bench_results/video.json``. The first recording of each env includes
compiling the episode (once per run, like the training loop's recorder); the later ones are what
every further video costs. Drawing is plain host work and grows with the episode length.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax

import lunarl
from lunarl.agents import ppo
from lunarl.run.video import VideoRecorder


def bench(name: str, repeats: int) -> dict:
    env = lunarl.envs.make(name)
    cfg = ppo.PPOConfig.build(num_envs=2, policy_hidden=(32, 32), value_hidden=(32, 32), episode_length=env.default_episode_length)
    params = ppo.policy_params(ppo.init(jax.random.PRNGKey(0), env, cfg))
    recorder = VideoRecorder(ppo.AGENT, env, cfg)
    out: dict = {"env": name, "episode_length": cfg.episode_length, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):
            fmt = "gif" if i == repeats else "mp4"
            t0 = time.perf_counter()
            v = recorder.record(params, jax.random.PRNGKey(i), Path(tmp) / f"v{i}.{fmt}")
            out["runs"].append({
                "format": fmt, "frames": v.frames, "bytes": v.path.stat().st_size,
                "rollout_s": v.rollout_seconds, "draw_s": v.render_seconds, "encode_s": v.encode_seconds,
                "total_s": time.perf_counter() - t0, "compiled_here": i == 0,
            })  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="rover,car_track,kuka")
    parser.add_argument("--repeats", type=int, default=2, help="MP4 recordings after the first (then one GIF)")
    args = parser.parse_args()
    results = [bench(name, args.repeats) for name in args.envs.split(",")]
    print(f"{'env':10} {'fmt':4} {'frames':>6} {'rollout s':>9} {'draw ms/frame':>13} {'encode ms/frame':>15} {'kB':>6}")
    for r in results:
        for run in r["runs"]:
            note = "  (includes compiling the episode)" if run["compiled_here"] else ""
            print(
                f"{r['env']:10} {run['format']:4} {run['frames']:6d} {run['rollout_s']:9.2f} "
                f"{1e3 * run['draw_s'] / run['frames']:13.1f} {1e3 * run['encode_s'] / run['frames']:15.1f} "
                f"{run['bytes'] / 1e3:6.0f}{note}"
            )
    path = Path("bench_results") / "video.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "backend": jax.default_backend(), "results": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
