"""What an S3 checkpoint costs against a local one, per checkpoint, for a few state sizes.

    python scripts/bench_checkpoint.py [--sizes-mib 1,16,128] [--repeats 5]

Starts moto's S3 server on 127.0.0.1 in its own process (the ``moto[server]`` dev dependency)
and times the real
``lunarl.run.checkpoint.Checkpoints`` with ``checkpoint.dir`` local and ``s3://``:

* ``save call``: how long ``save`` blocks the training loop (the SHA-256 of the state and
  handing it to Orbax's async writer; the S3 upload runs in the mirror's thread);
* ``durable``: ``save`` then ``wait`` (on disk; for S3 also uploaded and committed), what the
  end of a run or a SIGTERM stop waits for;
* ``restore``: on an empty local disk, the newest checkpoint back into a TrainState (for S3
  including the download and its manifest check).

The state is random float32 (Orbax's compression gains little on it, as on trained weights).
Against a loopback server this measures lunarl's own overhead (hashing, one request per file,
the COMMIT manifest), not a network: on AWS add the bytes over the instance's bandwidth.
Prints a table, writes ``scripts/results/bench_checkpoint.json`` and ``scripts/results/s3.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import jax
import numpy as np

from lunarl.run.checkpoint import Checkpoints

RESULTS = Path(__file__).parent / "results"
BUCKET = "lunarl-bench"
CONFIG = {"env": {"name": "bench"}, "agent": {"name": "bench"}, "seed": 0, "num_seeds": 1}


def _state(mib: int, seed: int) -> dict:
    """``mib`` MiB of float32 in 8 leaves (a TrainState has several parameter/optimiser leaves)."""
    rng = np.random.default_rng(seed)
    n = mib * (1 << 20) // 4 // 8
    return {f"leaf{i}": jax.numpy.asarray(rng.standard_normal(n, dtype=np.float32)) for i in range(8)}


def _time_saves(directory: str, staging: str | None, mib: int, repeats: int) -> dict:
    ckpts = Checkpoints(directory, max_to_keep=2, staging=staging, upload_timeout=600)
    calls, durable = [], []
    try:
        for step in range(1, repeats + 1):
            state = _state(mib, step)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            ckpts.save(step, state, CONFIG, {"iteration": step})
            t1 = time.perf_counter()
            ckpts.wait()
            t2 = time.perf_counter()
            calls.append(t1 - t0)
            durable.append(t2 - t0)
    finally:
        ckpts.close()
    return {"save_call_s": statistics.median(calls), "durable_s": statistics.median(durable), "durable_all_s": durable}


def _time_restore(directory: str, staging: str | None, mib: int) -> float:
    t0 = time.perf_counter()
    ckpts = Checkpoints(directory, create=False, staging=staging, pull=("latest",))
    try:
        state, _, _ = ckpts.restore("latest", _state(mib, 0))
        jax.block_until_ready(state)
    finally:
        ckpts.close()
    return time.perf_counter() - t0


def bench(mib: int, repeats: int, tmp: Path) -> dict:
    local_dir = tmp / f"local-{mib}"
    local = _time_saves(str(local_dir), None, mib, repeats)
    url = f"s3://{BUCKET}/bench-{mib}"
    remote = _time_saves(url, str(tmp / f"staging-{mib}"), mib, repeats)
    files = sum(1 for p in (local_dir / "latest" / str(repeats)).rglob("*") if p.is_file())
    nbytes = sum(p.stat().st_size for p in (local_dir / "latest" / str(repeats)).rglob("*") if p.is_file())
    return {
        "state_mib": mib,
        "checkpoint_files": files,
        "checkpoint_mib": nbytes / (1 << 20),
        "local": local,
        "s3": remote,
        "s3_overhead_s": remote["durable_s"] - local["durable_s"],
        "restore_local_s": _time_restore(str(local_dir), None, mib),
        "restore_s3_empty_disk_s": _time_restore(url, str(tmp / f"fresh-{mib}"), mib),
    }


def _markdown(result: dict) -> str:
    rows = [
        "| state | files | save call local / S3 | durable local / S3 | S3 overhead | restore local / S3 (empty disk) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        rows.append(
            f"| {r['state_mib']} MiB ({r['checkpoint_mib']:.1f} MiB on disk) | {r['checkpoint_files']} "
            f"| {r['local']['save_call_s']:.3f} / {r['s3']['save_call_s']:.3f} s "
            f"| {r['local']['durable_s']:.3f} / {r['s3']['durable_s']:.3f} s "
            f"| +{r['s3_overhead_s']:.3f} s ({r['s3']['durable_s'] / r['local']['durable_s']:.1f}x) "
            f"| {r['restore_local_s']:.2f} / {r['restore_s3_empty_disk_s']:.2f} s |"
        )
    m = result["machine"]
    return "\n".join([
        "# S3 checkpoints: cost per checkpoint against local",
        "",
        f"Written by `python scripts/bench_checkpoint.py {result['args']}` on {result['date']}: "
        f"{m['platform']}, {m['cpus']} CPUs, load average {m['load_before']} before and "
        f"{m['load_after']} after (the machine is shared), JAX {m['jax']} on {m['backend']}. "
        "S3 is moto's server (its own process) on 127.0.0.1: no network, so this is lunarl's own overhead "
        "(hashing every file for the COMMIT manifest, one request per file, the listing); on AWS "
        "add the checkpoint's bytes over the instance's bandwidth. Medians over "
        f"{result['repeats']} saves.",
        "",
        *rows,
        "",
        "* **save call**: how long the training loop is blocked by a save (state digest, handing "
        "the arrays to Orbax's async writer). The upload runs in the mirror's thread, so S3 "
        "adds nothing here.",
        "* **durable**: save, then wait until it is on disk (S3: uploaded and committed). Only "
        "the end of a run and a SIGTERM stop wait for this; between checkpoints the upload "
        "overlaps training.",
        "* **restore**: the newest checkpoint back into a state; for S3 on an empty local dir "
        "(download, manifest check, then the same local restore).",
        "",
    ])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start_server() -> tuple[subprocess.Popen, str]:
    """moto's server in its own process (in this one it would take the GIL from the code timed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while not _listening(port):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench_checkpoint: error: moto's server did not start on 127.0.0.1:{port}")
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mib", default="1,16,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_checkpoint.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "s3.md")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats}: at least 1")

    for name in ("absl", "orbax", "botocore", "s3transfer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server, endpoint = _start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            sizes = [bench(int(s), args.repeats, Path(tmp)) for s in args.sizes_mib.split(",")]
    finally:
        server.terminate()
        server.wait(10)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "args": f"--sizes-mib {args.sizes_mib} --repeats {args.repeats}",
        "repeats": args.repeats,
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "load_before": round(load_before, 1),
            "load_after": round(os.getloadavg()[0], 1),
        },
        "sizes": sizes,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = _markdown(result)
    args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
