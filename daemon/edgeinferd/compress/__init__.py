"""The compression toolchain: a recipe in, a served-ready compressed model out.

Knowledge distillation, pruning (unstructured and structured) and int8 quantization
(dynamic, static, quantization-aware training), written straight into a model repository
with a report of what each step gained and cost. See docs/compression.md.
"""

from edgeinferd.compress.cli import main
from edgeinferd.compress.evaluate import evaluate_artifact

__all__ = ["evaluate_artifact", "main"]
