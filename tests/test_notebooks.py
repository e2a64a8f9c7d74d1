"""Every notebook in notebooks/ runs top to bottom (so the docs cannot rot)."""

import os
from pathlib import Path

import nbformat
import pytest
from conftest import FAST_COMPILE_FLAGS
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# About a minute each on an idle 2-core CPU (kuka's MJX compile; a real training run with
# evaluations and a video; the world model notebook trains a Dreamer agent for a few minutes), so
# they run in `make test-all`; the quickstart stays in `make test`.
SLOW = {"environments.ipynb", "ppo_rover.ipynb", "world_model.ipynb"}
CASES = [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p for p in NOTEBOOKS]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path, monkeypatch):
    if path.name not in SLOW:  # compile-bound: the app tests' fast-compile flags (the kernel inherits them)
        monkeypatch.setenv("XLA_FLAGS", f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip())
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
