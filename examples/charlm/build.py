"""Build the charlm example: a byte-level language model, a distilled student, its int8 twin.

    python examples/charlm/build.py --out REPO

Everything is trained here, from text that ships with Python (the standard
library's pydoc topics), so nothing is downloaded. Writes three servable
models into the model repository REPO (charlm-teacher, charlm-student,
charlm-int8) and REPO/report.md + report.json comparing them; the report is
also printed. On a two-core CPU the whole build takes several minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import pydoc_data.topics
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import nn

from edgeinferd.compress.distill import distillation_loss
from edgeinferd.generation import loop
from edgeinferd.generation.engine import GenerationEngine
from edgeinferd.generation.model import GenerativeModel, load_generative
from edgeinferd.generation.params import validate
from edgeinferd.generation.sequence import GenerationSummary
from edgeinferd.generation.tokenizer import ByteTokenizer
from edgeinferd.generation.transformer import (
    DecoderLM,
    TransformerShape,
    quantize_int8,
    to_torchscript,
    write_model,
)
from edgeinferd.repository import Repository

SEED = 0
CONTEXT = 256
TEACHER = TransformerShape(vocab_size=256, context=CONTEXT, dim=256, layers=4, heads=4)
STUDENT = TransformerShape(vocab_size=256, context=CONTEXT, dim=128, layers=2, heads=4)
PROMPT = "The for statement"
BENCH_PROMPT = "Lists are mutable sequences"
BENCH_TOKENS = 128


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """The pydoc topics as bytes: the first 90% for training, the rest held out."""
    topics = pydoc_data.topics.topics
    data = "\n".join(topics[key] for key in sorted(topics)).encode("utf-8")
    tokens = torch.tensor(list(data), dtype=torch.int64)
    split = int(len(tokens) * 0.9)
    return tokens[:split], tokens[split:]


def windows(
    data: torch.Tensor, batch: int, length: int, generator: torch.Generator
) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()])


def train(
    model: DecoderLM,
    data: torch.Tensor,
    steps: int,
    *,
    lr: float,
    batch: int,
    length: int,
    teacher: DecoderLM | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    label: str,
) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay; with a teacher, token-level distillation."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    started = time.perf_counter()
    loss_value = float("nan")
    for step in range(steps):
        x = windows(data, batch, length, generator)
        inputs, labels = x[:, :-1], x[:, 1:].reshape(-1)
        logits = model.logits(inputs).reshape(-1, model.shape.vocab_size)
        if teacher is None:
            loss = F.cross_entropy(logits, labels)
        else:
            with torch.no_grad():
                soft = teacher.logits(inputs).reshape(-1, teacher.shape.vocab_size)
            # Each token position is one "example": KL over the next-byte distribution.
            loss = distillation_loss(logits, soft, labels, temperature=temperature, alpha=alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.item())
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log(f"  {label}: step {step + 1}/{steps} loss {loss_value:.3f} ({elapsed:.0f} s)")
    model.eval()
    return {
        "steps": steps,
        "batch": batch,
        "length": length,
        "lr": lr,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(loss_value, 4),
        **({"temperature": temperature, "alpha": alpha} if teacher is not None else {}),
    }


def heldout_loss(forward: Any, data: torch.Tensor, length: int = CONTEXT) -> float:
    """Mean next-byte cross-entropy (nats) over non-overlapping held-out windows."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(data) - length - 1, length * 8):
            rows = [
                data[s : s + length + 1]
                for s in range(start, min(start + length * 8, len(data) - length - 1), length)
            ]
            x = torch.stack(rows)
            logits = forward(x[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss.item())
            count += x[:, 1:].numel()
    return total / count


async def engine_run(model: GenerativeModel, concurrent: int) -> dict[str, float]:
    """``concurrent`` greedy generations at once through the daemon's engine."""
    with ThreadPoolExecutor(2) as executor:
        engine = GenerationEngine(model, max(concurrent, 1), executor)
        params = validate(model, BENCH_PROMPT, max_new_tokens=BENCH_TOKENS)

        async def one() -> GenerationSummary:
            async for event in engine.stream(engine.submit(params)):
                if isinstance(event, GenerationSummary):
                    return event
            raise RuntimeError("no summary")

        started = time.perf_counter()
        summaries = await asyncio.gather(*(one() for _ in range(concurrent)))
        wall = time.perf_counter() - started
        await engine.close()
    tokens = sum(s.generated_tokens for s in summaries)
    return {
        "tokens_per_second": tokens / wall,
        "ttft_ms_p50": statistics.median(s.time_to_first_token_s for s in summaries) * 1000,
    }


def measure_speed(model: GenerativeModel) -> dict[str, float]:
    asyncio.run(engine_run(model, 1))  # warm caches and allocator
    one = asyncio.run(engine_run(model, 1))
    eight = asyncio.run(engine_run(model, 8))
    return {
        "tokens_per_second_b1": round(one["tokens_per_second"], 1),
        "ttft_ms_b1": round(one["ttft_ms_p50"], 2),
        "tokens_per_second_8_concurrent": round(eight["tokens_per_second"], 1),
        "ttft_ms_p50_8_concurrent": round(eight["ttft_ms_p50"], 2),
    }


def sample_text(model: GenerativeModel) -> str:
    params = validate(model, PROMPT, max_new_tokens=160, temperature=0.7, top_k=40, seed=SEED)
    return PROMPT + loop.generate(model, params).text


def raw_loop_speed(model: GenerativeModel) -> float:
    params = validate(model, BENCH_PROMPT, max_new_tokens=BENCH_TOKENS)
    loop.generate(model, params)
    started = time.perf_counter()
    loop.generate(model, params)
    return BENCH_TOKENS / (time.perf_counter() - started)


def compare_formats(student: DecoderLM, int8_model: GenerativeModel) -> dict[str, Any]:
    """TorchScript vs torch.export: decoding speed of the same weights in each format."""
    results: dict[str, Any] = {
        "int8 torchscript": {"tokens_per_second": round(raw_loop_speed(int8_model), 1)}
    }
    batch, count = torch.export.Dim("batch"), torch.export.Dim("count")
    past = torch.export.Dim("past")
    example = (
        torch.zeros(2, 3, dtype=torch.int64),
        torch.zeros(2, 3, dtype=torch.int64),
        torch.zeros(2, STUDENT.layers, 2, STUDENT.heads, 4, STUDENT.head_dim),
        torch.ones(2, 4, dtype=torch.bool),
    )
    dynamic = (
        {0: batch, 1: count},
        {0: batch, 1: count},
        {0: batch, 4: past},
        {0: batch, 1: past},
    )
    for label, module in (("float32", student), ("int8", quantize_int8(student))):
        key = f"{label} torch.export"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(module, example, dynamic_shapes=dynamic)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.pt2"
                torch.export.save(program, str(path))
                loaded = torch.export.load(str(path)).module()
            exported = GenerativeModel(
                int8_model.config, loaded, int8_model.tokenizer, int8_model.geometry
            )
            results[key] = {"tokens_per_second": round(raw_loop_speed(exported), 1)}
        except Exception as error:
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            results[key] = {"failed": f"{type(error).__name__}: {reason}"}
    scripted = GenerativeModel(
        int8_model.config, to_torchscript(student), int8_model.tokenizer, int8_model.geometry
    )
    results["float32 torchscript"] = {"tokens_per_second": round(raw_loop_speed(scripted), 1)}
    return results


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {platform.system()}"


def render(report: dict[str, Any]) -> str:
    rows = [
        "| model | parameters | size on disk | held-out loss (nats/byte) | perplexity |"
        " tokens/s, 1 sequence | first token, 1 sequence | tokens/s, 8 concurrent |"
        " first token p50, 8 concurrent |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["models"].items():
        rows.append(
            f"| {name} | {m['parameters']:,} | {m['size_bytes'] / 1024:.0f} KiB |"
            f" {m['heldout_loss']:.4f} | {m['perplexity']:.2f} |"
            f" {m['tokens_per_second_b1']:.0f} | {m['ttft_ms_b1']:.1f} ms |"
            f" {m['tokens_per_second_8_concurrent']:.0f} |"
            f" {m['ttft_ms_p50_8_concurrent']:.1f} ms |"
        )
    baseline = report.get("baseline")
    lines = [
        f"# charlm build report ({report['date']})",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}.",
        f"Data: {report['data']['train_bytes']:,} training bytes and"
        f" {report['data']['heldout_bytes']:,} held-out bytes of the pydoc topics.",
        "",
        *rows,
        "",
        "Speed: greedy generations of"
        f" {BENCH_TOKENS} tokens from a {len(BENCH_PROMPT)}-byte prompt through the daemon's"
        " generation engine, in process (no gRPC). 8 concurrent: total generated tokens over"
        " the wall time of all eight; first-token time includes waiting for a step.",
    ]
    if baseline:
        lines += [
            "",
            f"Without distillation, the student's shape trained on labels alone for the same"
            f" steps reaches a held-out loss of {baseline['heldout_loss']:.4f}"
            f" (perplexity {baseline['perplexity']:.2f}).",
        ]
    lines += ["", "## TorchScript vs torch.export (one sequence, raw decoding loop)", ""]
    lines += ["| artifact | tokens/s |", "|---|---|"]
    for key, value in report["formats"].items():
        shown = value.get("tokens_per_second", value.get("failed"))
        lines.append(f"| {key} | {shown} |")
    lines += ["", "## Samples (temperature 0.7, top-k 40, seed 0)", ""]
    for name, m in report["models"].items():
        lines += [f"**{name}**", "", "```", m["sample"], "```", ""]
    lines += ["## Training", "", "```json", json.dumps(report["training"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def build(out: Path, teacher_steps: int, student_steps: int, baseline: bool) -> dict[str, Any]:
    # The engine logs every generation at debug level; the benchmarks make hundreds.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.manual_seed(SEED)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    train_data, heldout = load_text()
    tokenizer = ByteTokenizer()
    training: dict[str, Any] = {}

    log(f"teacher: {TEACHER}")
    teacher = DecoderLM(TEACHER)
    training["teacher"] = train(
        teacher, train_data, teacher_steps, lr=2e-3, batch=16, length=128, label="teacher"
    )
    log(f"student: {STUDENT}, distilled")
    torch.manual_seed(SEED + 1)
    student = DecoderLM(STUDENT)
    training["student"] = train(
        student,
        train_data,
        student_steps,
        lr=3e-3,
        batch=16,
        length=128,
        teacher=teacher,
        label="student",
    )
    baseline_facts = None
    if baseline:
        log("baseline: the student's shape without distillation")
        torch.manual_seed(SEED + 1)
        plain = DecoderLM(STUDENT)
        training["baseline"] = train(
            plain, train_data, student_steps, lr=3e-3, batch=16, length=128, label="baseline"
        )
        loss = heldout_loss(plain.logits, heldout)
        baseline_facts = {"heldout_loss": round(loss, 4), "perplexity": round(math.exp(loss), 3)}

    int8 = quantize_int8(student)
    artifacts = {
        "charlm-teacher": (teacher, to_torchscript(teacher), TEACHER, teacher.logits),
        "charlm-student": (student, to_torchscript(student), STUDENT, student.logits),
        "charlm-int8": (student, to_torchscript(int8), STUDENT, int8.logits),
    }
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "torch": torch.__version__,
        "data": {"train_bytes": len(train_data), "heldout_bytes": len(heldout)},
        "models": {},
        "training": training,
    }
    if baseline_facts:
        report["baseline"] = baseline_facts
    repository = Repository(out)
    loaded: dict[str, GenerativeModel] = {}
    for name, (source, scripted, shape, forward) in artifacts.items():
        log(f"evaluating {name}")
        loss = heldout_loss(forward, heldout)
        stages = {
            "charlm-teacher": "trained on bytes",
            "charlm-student": "distilled from charlm-teacher",
            "charlm-int8": "charlm-student with dynamic int8 Linear weights",
        }
        write_model(
            out,
            name,
            scripted,
            shape,
            tokenizer,
            max_sequences=16,
            manifest={
                "technique": stages[name],
                "parameters": sum(p.numel() for p in source.parameters()),
                "heldout_loss": round(loss, 4),
            },
        )
        config = repository.read_config(name)
        files = repository.version_files(config)
        model = loaded[name] = load_generative(config, files)
        report["models"][name] = {
            "parameters": sum(p.numel() for p in source.parameters()),
            "size_bytes": files.artifact.stat().st_size,
            "heldout_loss": round(loss, 4),
            "perplexity": round(math.exp(loss), 3),
            **measure_speed(model),
            "sample": sample_text(model),
        }
    log("comparing TorchScript and torch.export")
    report["formats"] = compare_formats(student, loaded["charlm-int8"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model repository to write")
    parser.add_argument("--teacher-steps", type=int, default=320)
    parser.add_argument("--student-steps", type=int, default=320)
    parser.add_argument("--no-baseline", action="store_true", help="skip the undistilled student")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = build(args.out, args.teacher_steps, args.student_steps, not args.no_baseline)
    print(render(report))
    log(f"built in {time.perf_counter() - started:.0f} s; wrote {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
