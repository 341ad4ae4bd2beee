"""The report: one row per stage, what each step gained (size, speed) and cost (accuracy).

Written three ways: markdown for people, JSON for tools (and the manifest), and a PNG of
accuracy against size and latency, which shows the trade-off at a glance.
"""

from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from edgeinferd.compress.evaluate import Measurement


@dataclass(frozen=True)
class StageResult:
    """A measured stage; ``notes`` holds step facts such as layer shapes or the int8 engine."""

    name: str
    kind: str
    measurement: Measurement
    notes: dict[str, Any] = field(default_factory=dict)


def processor() -> str:
    """The CPU's model name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(reference: float, value: float) -> float:
    return reference / value if value else float("inf")


def to_json(stages: list[StageResult], reference: str = "teacher") -> dict[str, Any]:
    """The report as data; ratios are relative to the ``reference`` stage (x > 1: better)."""
    base = next(s for s in stages if s.name == reference).measurement
    rows = []
    for stage in stages:
        m = stage.measurement
        rows.append(
            {
                "name": stage.name,
                "kind": stage.kind,
                **asdict(m),
                "size_vs_teacher": _ratio(base.size_bytes, m.size_bytes),
                "speed_vs_teacher_b1": _ratio(base.latency_b1_us, m.latency_b1_us),
                "speed_vs_teacher_b32": _ratio(base.latency_b32_us, m.latency_b32_us),
                "accuracy_delta_points": 100.0 * (m.accuracy - base.accuracy),
                "notes": stage.notes,
            }
        )
    return {
        "reference": reference,
        "machine": platform.machine(),
        "processor": processor(),
        "cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "latency": "median wall time per call, torch.set_num_threads(1), same process",
        "stages": rows,
    }


def to_markdown(report: dict[str, Any]) -> str:
    """A table a person can read in a terminal or on a code-hosting site."""
    lines = [
        "| stage | params | size | sparsity | accuracy | Δ acc (pts) | latency b1 | latency b32 "
        "| smaller | faster b1 | faster b32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["stages"]:
        lines.append(
            f"| {r['name']} | {r['parameters']:,} | {r['size_bytes'] / 1024:.1f} KiB "
            f"| {100 * r['sparsity']:.1f}% | {100 * r['accuracy']:.2f}% "
            f"| {r['accuracy_delta_points']:+.2f} | {r['latency_b1_us']:.0f} µs "
            f"| {r['latency_b32_us']:.0f} µs | {r['size_vs_teacher']:.2f}x "
            f"| {r['speed_vs_teacher_b1']:.2f}x | {r['speed_vs_teacher_b32']:.2f}x |"
        )
    lines += [
        "",
        f"Ratios are relative to `{report['reference']}`. Latency: {report['latency']}, "
        f"on {report['processor']} with torch {report['torch_version']}. Size: the "
        "TorchScript artifact on disk.",
    ]
    for r in report["stages"]:
        layers = r["layer_sparsity"]
        if r["kind"] == "prune" or r["notes"]:
            lines += ["", f"### {r['name']} ({r['kind']})", ""]
            for key, value in r["notes"].items():
                lines.append(f"- {key}: {value}")
            if r["kind"] == "prune":
                lines += ["", "| layer | sparsity |", "|---|---:|"]
                lines += [f"| {n} | {100 * s:.1f}% |" for n, s in layers.items()]
    return "\n".join(lines) + "\n"


def to_png(report: dict[str, Any]) -> bytes:
    """Accuracy against size and against batch-32 latency, one point per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["stages"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    panels = (
        ("size_bytes", 1 / 1024, "size on disk (KiB, log)"),
        ("latency_b32_us", 1.0, "latency, batch 32 (µs, log)"),
    )
    for axis, (key, scale, label) in zip(axes, panels, strict=True):
        xs = [r[key] * scale for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        axis.plot(xs, ys, "o-", color="tab:blue")
        for x, y, r in zip(xs, ys, rows, strict=True):
            axis.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xscale("log")
        axis.margins(x=0.12, y=0.12)
        axis.set_xlabel(label)
        axis.set_ylabel("held-out accuracy (%)")
        axis.grid(True, which="both", alpha=0.3)
    figure.suptitle("accuracy against size and latency, per compression stage")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def render(stages: list[StageResult]) -> tuple[dict[str, Any], str, bytes]:
    """``(json, markdown, png)`` for a list of measured stages."""
    data = to_json(stages)
    return data, to_markdown(data), to_png(data)


def dumps(data: dict[str, Any]) -> str:
    """JSON text of the report."""
    return json.dumps(data, indent=2, default=str) + "\n"
