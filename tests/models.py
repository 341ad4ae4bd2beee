"""Small real models for the tests, written into a model repository.

Each builder saves a real artifact (TorchScript or torch.export) and the
config.toml the daemon reads, so tests exercise the same loading path as
production. Nothing here is mocked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

MLP_CONFIG = """
max_batch_size = 32
[[inputs]]
name = "x"
dtype = "float32"
shape = [16]
[[outputs]]
name = "y"
dtype = "float32"
shape = [4]
"""


def mlp_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def write_model(repo: Path, name: str, config: str, version: str = "1") -> Path:
    folder = repo / name / version
    folder.mkdir(parents=True, exist_ok=True)
    (repo / name / "config.toml").write_text(config)
    return folder


def add_mlp(
    repo: Path, name: str = "mlp", version: str = "1", seed: int = 0, config: str = MLP_CONFIG
) -> nn.Module:
    """A batched float32 classifier head, 16 -> 4, as TorchScript."""
    module = mlp_module(seed)
    folder = write_model(repo, name, config, version)
    torch.jit.script(module).save(str(folder / "model.pt"))
    return module


class Adder(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


def add_adder(repo: Path, name: str = "adder") -> None:
    """An unbatched int64 model with two inputs and two outputs, as a torch.export program."""
    folder = write_model(
        repo,
        name,
        """
[[inputs]]
name = "a"
dtype = "int64"
shape = [-1]
[[inputs]]
name = "b"
dtype = "int64"
shape = [-1]
[[outputs]]
name = "sum"
dtype = "int64"
shape = [-1]
[[outputs]]
name = "product"
dtype = "int64"
shape = [-1]
""",
    )
    n = torch.export.Dim("n", min=1, max=1 << 20)
    example = (torch.arange(3), torch.arange(3))
    program = torch.export.export(Adder(), example, dynamic_shapes=({0: n}, {0: n}))
    torch.export.save(program, str(folder / "model.pt2"))


class Picky(nn.Module):
    """Raises inside its forward pass when any input is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        return x * 2


def add_picky(repo: Path, name: str = "picky") -> None:
    folder = write_model(
        repo,
        name,
        """
max_batch_size = 8
[[inputs]]
name = "x"
dtype = "float32"
shape = [2]
[[outputs]]
name = "y"
dtype = "float32"
shape = [2]
""",
    )
    torch.jit.script(Picky()).save(str(folder / "model.pt"))


class Slow(nn.Module):
    """Spins for ``x[0, 0]`` rounds of a 256x256 matmul (a few tenths of a millisecond each)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(256) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight
        for _ in range(int(x[0, 0].item())):
            state = torch.mm(state, self.weight) + self.weight
        return x + state[0, 0] * 0


def scalar_config(max_batch_size: int, tables: str = "") -> str:
    """The config of a model taking and returning one float32 per row (x -> y), plus ``tables``."""
    return f"""
max_batch_size = {max_batch_size}
[[inputs]]
name = "x"
dtype = "float32"
shape = [1]
[[outputs]]
name = "y"
dtype = "float32"
shape = [1]
{tables}"""


#: Its pass time depends on the input's value, not its size, so it must never run
#: on the event loop (a long call would hold every other caller).
NEVER_INLINE = "inline_max_us = 0\n"
SLOW_CONFIG = scalar_config(1, "[instances]\ncount = 2\n" + NEVER_INLINE)


def add_slow(repo: Path, name: str = "slow", config: str = SLOW_CONFIG) -> None:
    folder = write_model(repo, name, config)
    torch.jit.script(Slow()).save(str(folder / "model.pt"))


def add_corrupt(repo: Path, name: str = "corrupt") -> None:
    folder = write_model(repo, name, MLP_CONFIG)
    (folder / "model.pt").write_bytes(b"PK\x03\x04 this is not a model" * 10)


def add_pickled(repo: Path, name: str = "pickled") -> None:
    folder = write_model(repo, name, MLP_CONFIG)
    torch.save(mlp_module(), str(folder / "model.pt"))


def add_with_manifest(repo: Path, name: str, tamper: bool = False) -> None:
    """An MLP with a manifest; ``tamper`` changes the artifact after the digest was taken."""
    add_mlp(repo, name)
    artifact = repo / name / "1" / "model.pt"
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    manifest = {
        "artifact": "model.pt",
        "format": "torchscript",
        "sha256": digest,
        "stages": [{"name": "teacher", "parameters": 676}],
    }
    (repo / name / "1" / "manifest.json").write_text(json.dumps(manifest))
    if tamper:
        with artifact.open("ab") as file:
            file.write(b"\0")
