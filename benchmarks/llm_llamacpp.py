"""llama.cpp, the reference: built from source once into the cache, then run as its own tools.

The source is the llama.cpp vendored in the ``llama-cpp-python`` sdist on PyPI (the only
index this benchmark assumes), built for the CPU with only the tools measured here. The
build never runs in the test suite: it takes about a quarter of an hour on two cores.

``GGML_NATIVE`` is off on purpose: a native build enables every extension the CPU reports,
and some virtual machines report AMX while trapping its instructions (SIGILL). The x86
extensions are listed one by one from /proc/cpuinfo instead, AMX always off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from llm_inputs import cache_dir, pip_download

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-perplexity", "llama-completion")

# GGML option -> the /proc/cpuinfo flags it needs (all of them).
_X86_OPTIONS = {
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_options(flags: set[str]) -> list[str]:
    """Configure options: CPU only, no network, no server or web UI, AMX off."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF",
        "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_AMX_BF16=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
    ]
    for option, needed in _X86_OPTIONS.items():
        enabled = all(flag in flags for flag in needed)
        options.append(f"-D{option}={'ON' if enabled else 'OFF'}")
    return options


def source_dir() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, unpacked into the cache."""
    target = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (target / "CMakeLists.txt").exists():
        return target
    downloads = cache_dir() / "dl"
    sdist = downloads / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        sdist = pip_download(
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", downloads, "--no-binary", ":all:"
        )
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if member.name.startswith(prefix) and "/.git/" not in member.name:
                member.name = member.name[len(prefix) :]
                members.append(member)
        archive.extractall(partial, members=members, filter="data")
    partial.rename(target)
    return target


@dataclass(frozen=True)
class Build:
    bin: Path
    options: list[str]
    source: Path

    def tool(self, name: str) -> Path:
        return self.bin / name


def build(jobs: int = 2) -> Build:
    """Configure and build the tools (at nice 19) unless the cached build has these options."""
    source = source_dir()
    build_dir = source / "build-cpu"
    options = cmake_options(cpu_flags())
    stamp = build_dir / "edgeinfer-bench-options.txt"
    bin_dir = build_dir / "bin"
    wanted = "\n".join(options)
    up_to_date = stamp.exists() and stamp.read_text() == wanted
    if up_to_date and all((bin_dir / tool).exists() for tool in TOOLS):
        return Build(bin_dir, options, source)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    if shutil.which("cmake") is None:
        raise SystemExit(
            "cmake is needed to build llama.cpp: apt-get install cmake build-essential"
        )
    print(f"building llama.cpp ({', '.join(TOOLS)}) in {build_dir}; this takes a while")
    nice = ["nice", "-n", "19"]
    subprocess.run(
        [*nice, "cmake", "-S", str(source), "-B", str(build_dir), *generator, *options],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [*nice, "cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *TOOLS],
        check=True,
    )
    stamp.write_text(wanted)
    return Build(bin_dir, options, source)


@dataclass(frozen=True)
class Run:
    stdout: str
    stderr: str
    wall_s: float
    #: Peak resident set size of the tool, as GNU time -v reports it (the kernel's maxrss).
    max_rss_bytes: int


def run_tool(command: list[str], timeout: float = 1800) -> Run:
    """Run one tool to completion (``command`` from ``timed``: its peak RSS is parsed)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise SystemExit(f"{command[0]} ran past {timeout} s") from None
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return Run(stdout, stderr, wall, _max_rss(stderr))


def _max_rss(stderr: str) -> int:
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(match.group(1)) * 1024 if match else 0


def timed(command: list[str]) -> list[str]:
    """Prefix ``/usr/bin/time -v`` so the tool's peak RSS lands at the end of its stderr."""
    time_binary = shutil.which("time") or "/usr/bin/time"
    if not os.path.exists(time_binary):
        raise SystemExit("GNU time is needed for llama.cpp's peak RSS: apt-get install time")
    return [time_binary, "-v", *command]


class LlamaCpp:
    """The llama.cpp tools on one GGUF file with a fixed thread count."""

    def __init__(self, tools: Build, model: Path, threads: int) -> None:
        self.tools = tools
        self.model = model
        self.threads = threads

    def _base(self, tool: str) -> list[str]:
        return [str(self.tools.tool(tool)), "-m", str(self.model), "-t", str(self.threads)]

    def bench(self, prompt: int, generate: int, repetitions: int) -> tuple[dict[str, float], Run]:
        """llama-bench: prompt processing (ppN) and one-sequence generation (tgN) tokens/s."""
        command = self._base("llama-bench")
        command += ["-p", str(prompt), "-n", str(generate), "-r", str(repetitions), "-o", "json"]
        run = run_tool(timed(command))
        results = json.loads(run.stdout)
        speeds: dict[str, float] = {}
        for row in results:
            if row["n_prompt"] and not row["n_gen"]:
                speeds["prefill"] = float(row["avg_ts"])
            elif row["n_gen"] and not row["n_prompt"]:
                speeds["decode"] = float(row["avg_ts"])
        return speeds, run

    def batched(
        self, prompt: int, generate: int, parallel: list[int]
    ) -> tuple[dict[int, dict[str, float]], Run]:
        """llama-batched-bench: per number of sequences, decode tokens/s over all of them."""
        context = max(parallel) * (prompt + generate) + 256 * max(parallel)
        command = self._base("llama-batched-bench")
        command += ["-c", str(context), "-b", "2048", "-ub", "512"]
        command += ["-npp", str(prompt), "-ntg", str(generate)]
        command += ["-npl", ",".join(map(str, parallel)), "--output-format", "jsonl"]
        run = run_tool(timed(command))
        rows: dict[int, dict[str, float]] = {}
        for line in (run.stdout + "\n" + run.stderr).splitlines():
            line = line.strip()
            if line.startswith("{") and '"speed_tg"' in line:
                row = json.loads(line)
                rows[int(row["pl"])] = {
                    "decode": float(row["speed_tg"]),
                    "prefill": float(row["speed_pp"]),
                }
        missing = [n for n in parallel if n not in rows]
        if missing:
            raise SystemExit(
                f"llama-batched-bench gave no row for {missing}:\n{run.stderr[-2000:]}"
            )
        return rows, run

    def perplexity(self, text_file: Path, context: int) -> tuple[dict[str, float], Run]:
        command = [*self._base("llama-perplexity"), "-f", str(text_file), "-c", str(context)]
        run = run_tool(timed(command))
        match = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stderr)
        chunks = re.search(r"calculating perplexity over (\d+) chunks", run.stderr)
        if match is None or chunks is None:
            raise SystemExit(f"llama-perplexity printed no estimate:\n{run.stderr[-3000:]}")
        result = {
            "perplexity": float(match.group(1)),
            "error": float(match.group(2)),
            "chunks": float(chunks.group(1)),
        }
        return result, run

    def complete(self, prompt: str, tokens: int) -> tuple[str, float, Run]:
        """Greedy completion of ``prompt``: (text, load time in s as llama.cpp reports it, run)."""
        command = self._base("llama-completion")
        command += ["-p", prompt, "-n", str(tokens), "--temp", "0", "-c", "2048"]
        command += ["-no-cnv", "--no-display-prompt"]
        run = run_tool(timed(command))
        text = run.stdout.replace("[end of text]", "").rstrip()
        load = re.search(r"load time =\s*([0-9.]+) ms", run.stderr)
        if load is None:
            raise SystemExit(f"llama-completion reported no load time:\n{run.stderr[-3000:]}")
        return text, float(load.group(1)) / 1000, run
