"""Data-parallel training under torchrun: two CPU processes (gloo) stay in lockstep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = """
import hashlib, os, sys
import torch
from torch import nn
from edgeinferd.compress import distributed
from edgeinferd.compress.distill import distill
from edgeinferd.compress.recipe import Training
from edgeinferd.compress.sources import Split

def digest(model):
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().numpy().tobytes())
    return h.hexdigest()

rank = int(os.environ["RANK"])
generator = torch.Generator().manual_seed(0)
x = torch.randn(256, 16, generator=generator)
y = (x[:, 0] + x[:, 1] > 0).long()
torch.manual_seed(0)
teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
torch.manual_seed(100 + rank)  # a different student on each rank: DDP must make them one
student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
initial = digest(student)
training = Training(epochs=3, lr=1e-2, batch_size=32, alpha=0.5, temperature=2.0)
distill(teacher, student, Split(x, y), training, seed=0, show_progress=False)
size, _ = distributed.world()
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as out:
    out.write(f"{size} {initial} {digest(student)}")
distributed.shutdown()
"""

RECIPE = """
[teacher]
entry = "ddp_compress_models:teacher"
[teacher.train]
epochs = 2
[student]
entry = "ddp_compress_models:student"
[data]
train = "train.npz"
test = "test.npz"
[[steps]]
kind = "distill"
epochs = 2
[[steps]]
kind = "qat"
epochs = 1
[evaluation]
latency_repeats = 2
[output]
repository = "repo"
model = "ddp"
"""

MODELS = """
from torch import nn
def teacher():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
def student():
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
"""


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        command + args, cwd=cwd, capture_output=True, text=True, env=env, timeout=180, check=False
    )


def test_two_ranks_end_with_identical_weights(tmp_path: Path) -> None:
    """Two processes that start from different students finish distillation with the same
    weights: DDP synchronises the start and averages every gradient."""
    (tmp_path / "ddp_distill.py").write_text(SCRIPT)
    result = _torchrun([str(tmp_path / "ddp_distill.py"), str(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [r[0] for r in ranks] == ["2", "2"]
    assert ranks[0][1] != ranks[1][1]  # different initial weights...
    assert ranks[0][2] == ranks[1][2]  # ...identical trained weights
    assert ranks[0][2] not in (ranks[0][1], ranks[1][1])


def test_only_rank_zero_writes_the_version(tmp_path: Path) -> None:
    """A recipe run under torchrun trains on both ranks but writes one version, once."""
    generator = np.random.default_rng(0)
    x = generator.normal(size=(200, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "train.npz", x=x[:150], y=y[:150])
    np.savez(tmp_path / "test.npz", x=x[150:], y=y[150:])
    (tmp_path / "ddp_compress_models.py").write_text(MODELS)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    result = _torchrun(["-m", "edgeinferd.compress", "recipe.toml", "--quiet"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "repo" / "ddp").iterdir() if p.is_dir()] == ["1"]
    assert result.stdout.count("| int8-qat |") == 1
