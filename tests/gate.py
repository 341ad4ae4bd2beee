"""A forward pass that waits on a gate the test holds, so "still running" is a fact.

Tests that must catch the daemon with a forward pass in progress (a full
queue, calls expiring while queued, a version swap with calls in flight, a
batch that waits for company) cannot make a model spin "long enough": what
is long enough on one machine is over in an instant on a faster one, and a
slower one turns a spin into a timeout. Here the model's forward pass calls
``torch.ops.edgeinfer_test.gate``, which returns only once the test has
opened the gate (a file appearing) or released that one pass (a token file
it removes), so a pass ends when the test says so.

The operator is implemented in Python with ``torch.library``; the daemon must
have it registered before it loads a model that calls it, so such daemons
start through ``LAUNCHER`` (``tests.conftest.Daemon``'s launcher), which
imports this module first. Everything else about the daemon is the real one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

NAMESPACE = "edgeinfer_test"
#: The longest a pass waits for its gate: only a test that forgot to open it reaches this.
LIMIT_S = 300.0
#: How often a waiting pass looks at its gate (polling a condition, not timing anything).
POLL_S = 0.002

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define("gate(Tensor x, str path) -> Tensor")


def _take_token(tokens: str) -> bool:
    """Remove one token file; only one waiting pass can remove each."""
    for name in sorted(os.listdir(tokens)):
        try:
            os.unlink(os.path.join(tokens, name))
        except FileNotFoundError:
            continue  # another pass took it
        return True
    return False


def _wait_for_gate(x: torch.Tensor, path: str) -> torch.Tensor:
    deadline = time.monotonic() + LIMIT_S
    tokens = path + ".tokens"
    while time.monotonic() < deadline:
        if os.path.exists(path) or _take_token(tokens):
            break
        time.sleep(POLL_S)
    return x.clone()


_library.impl("gate", _wait_for_gate, "CPU")


def launcher_text(source_root: str) -> str:
    """A script starting edgeinferd with the operator registered, ``tests`` found in
    ``source_root`` (this checkout, or where a container sees it)."""
    return f"""
import sys
sys.path.insert(0, {source_root!r})
import tests.gate  # registers {NAMESPACE}::gate before any model is loaded
from edgeinferd import cli
sys.exit(cli.main(sys.argv[1:]))
"""


LAUNCHER = launcher_text(str(Path(__file__).resolve().parent.parent))


class Gate:
    """The test's side: a path that does not exist until ``open()``, and a folder of tokens."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "gate-open"
        self.path.unlink(missing_ok=True)
        self.tokens = folder / "gate-open.tokens"
        self.tokens.mkdir(exist_ok=True)
        self._released = 0

    def open(self) -> None:
        """Let every pass through, now and later (until ``close()``)."""
        self.path.touch()

    def release(self, passes: int = 1) -> None:
        """Let exactly ``passes`` more forward passes through while the gate is closed."""
        for _ in range(passes):
            self._released += 1
            (self.tokens / f"{self._released:09d}").touch()

    def close(self) -> None:
        """Later passes wait again (those already let through are not stopped)."""
        self.path.unlink(missing_ok=True)

    @property
    def is_open(self) -> bool:
        return self.path.exists()


def write_launcher(folder: Path) -> Path:
    """A script that starts edgeinferd with the gate operator registered."""
    launcher = folder / "launch_gated.py"
    launcher.write_text(LAUNCHER)
    return launcher
