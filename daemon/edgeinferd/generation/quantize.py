"""Weight forms of a language model's matrices, and the kernels that multiply by them.

Every choice of number format and kernel lives here, so a newcomer finds it in
one place (as in gpt-fast's ``quantize.py``). A matrix is stored in the
version folder's safetensors file under a prefix ``P`` in one of three forms:

``none`` (fp32)
    ``P.weight`` float32 [out, in]: exactly the source's weights.
``int8``
    ``P.int8`` int8 [out, in] and ``P.scale`` float32 [out]: symmetric, one
    scale per output channel; activations stay in floating point (weight-only).
``int4``
    ``P.int4`` uint8 [out, in / 2] (two 4-bit codes a byte, the even column in
    the low nibble), ``P.scale`` and ``P.min`` float32 [out, in / 32]: groups of
    32 weights, each ``code * scale + min`` -- the same arithmetic as GGUF's
    Q4_1, so a Q4_1 source is kept bit for bit.

Why weight-only: per-tensor activation quantization (``torch.ao`` dynamic
int8) raised SmolLM2's perplexity from 12.4 to 40 on this project's
measurements; language models have outlier activation channels that one scale
per tensor cannot hold. The int4 kernel is ``aten._weight_int4pack_mm_for_cpu``
fed bf16 activations and scales (``KERNEL_DTYPE``); the rest of the model stays
fp32. The int8 kernel is ``aten._weight_int8pack_mm``, also in bf16: fast for
prefill, but slower than fp32 for one-token decode steps on this CPU.
Measured speeds and perplexities are in benchmarks/llm.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional

FORMS = ("none", "int8", "int4")
#: The embedding table (and the output layer, tied to it or not) per form. int4 keeps it
#: in fp32, as llama.cpp keeps SmolLM2's at 8 bits: re-quantizing that Q8_0 table to 4
#: bits raised perplexity by 5% on one chunk, and a bf16 table (logits rounded to bf16)
#: changed the greedy answer to the reference question; with an fp32 table, int4 layers
#: stayed within 0.1% of fp32's perplexity and gave fp32's answer.
EMBEDDING_FORMS = {"none": "none", "int8": "int8", "int4": "none"}
#: The form ``edgeinferd import`` writes unless told otherwise: smallest, fastest
#: measured, and lossless for Q4_1 sources (benchmarks/llm.md).
DEFAULT_FORM = "int4"
GROUP = 32
#: The activations' type inside the int4 and int8 kernels. Their fp32 paths measured
#: 10-25x slower than their bf16 paths here (a 256-row prefill chunk through the int8
#: kernel: 1.4 s in fp32, 56 ms in bf16, 68 ms for a dense fp32 matmul).
KERNEL_DTYPE = torch.bfloat16


class Matrix:
    """One weight matrix [out, in], in whatever form it was stored.

    ``matmul`` multiplies activations [..., in] by its transpose; ``rows``
    returns selected rows as fp32 (an embedding lookup, for tied embeddings).
    """

    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class DenseMatrix(Matrix):
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.to(torch.float32).contiguous()
        self.out_features, self.in_features = self.weight.shape

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]

    def nbytes(self) -> int:
        return self.weight.numel() * 4


#: The int8 kernel's inner dimension is padded with zero columns to a multiple of this:
#: ``aten._weight_int8pack_mm`` in bf16 crashes the process (SIGSEGV, torch 2.13 on an
#: AVX-512 CPU) for two rows or more when it is not one, e.g. 100 or 104 columns. Zero
#: weights times zero activations leave every product as it was.
INT8_INNER_MULTIPLE = 16


class Int8Matrix(Matrix):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.out_features, self.in_features = codes.shape
        self._pad = -self.in_features % INT8_INNER_MULTIPLE
        #: [out, in + pad]: the kernel's operand, and the embedding rows' (sliced) source.
        #: Always a copy, even by zero columns: given the loaded tensor itself instead,
        #: the kernel crashed the same way for the tiny test models (cause not settled;
        #: the loaded storage's alignment is a guess).
        self.codes = functional.pad(codes, (0, self._pad)).contiguous()
        self.scale = scale.to(torch.float32).contiguous()
        self._kernel_scale = self.scale.to(KERNEL_DTYPE)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
        if self._pad:
            flat = functional.pad(flat, (0, self._pad))
        out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self._kernel_scale)
        return out.to(torch.float32).reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.codes[ids, : self.in_features]
        return codes.to(torch.float32) * self.scale[ids].unsqueeze(-1)

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


class Int4Matrix(Matrix):
    """Layers only: the embedding table is never int4 (see EMBEDDING_FORMS), so the
    stored nibbles are dropped once repacked for the kernel."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> None:
        self.out_features = int(packed.shape[0])
        self.in_features = int(packed.shape[1]) * 2
        codes = unpack_int4(packed).to(torch.int32)
        self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale = scale.to(torch.float32)
        # The kernel computes (code - 8) * scale + zero: zero = min + 8 * scale.
        self._scale_and_zero = (
            torch.stack([scale, minimum.to(torch.float32) + 8 * scale], dim=-1)
            .transpose(0, 1)
            .to(KERNEL_DTYPE)
            .contiguous()
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(KERNEL_DTYPE)
        out: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self._kernel_weight, GROUP, self._scale_and_zero
        )
        return out.to(torch.float32).reshape(*shape[:-1], self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an int4 matrix is never an embedding table")

    def nbytes(self) -> int:
        return int(
            self._kernel_weight.numel() * self._kernel_weight.element_size()
            + self._scale_and_zero.numel() * self._scale_and_zero.element_size()
        )


# -- packing -----------------------------------------------------------------


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n / 2] -> uint8 codes [..., n]: low nibble first."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., n] -> [..., n / 2], the even column in the low nibble."""
    pairs = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


# -- quantizing (at import time) ---------------------------------------------


def quantize(weight: torch.Tensor, form: str) -> dict[str, torch.Tensor]:
    """An fp32 matrix [out, in] in ``form``, as the tensors stored for it (without prefix)."""
    weight = weight.to(torch.float32)
    if form == "none":
        return {"weight": weight.contiguous()}
    if form == "int8":
        absmax = weight.abs().amax(dim=1).clamp(min=1e-12)
        scale = absmax / 127.0
        codes = torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return {"int8": codes.contiguous(), "scale": scale.contiguous()}
    if form == "int4":
        out, columns = weight.shape
        if columns % GROUP:
            raise ValueError(
                f"int4 needs the input size to be a multiple of {GROUP}, not {columns}"
            )
        groups = weight.reshape(out, columns // GROUP, GROUP)
        low = groups.amin(dim=-1)
        high = groups.amax(dim=-1)
        scale = ((high - low) / 15.0).clamp(min=1e-12)
        codes = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
        return int4_tensors(codes.reshape(out, columns).to(torch.uint8), scale, low)
    raise ValueError(f"unknown weight form {form!r}; expected one of {', '.join(FORMS)}")


def int4_tensors(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Stored tensors for codes [out, in] (0..15) with per-group scale and min [out, in / 32]."""
    return {
        "int4": pack_int4(codes).contiguous(),
        "scale": scale.to(torch.float32).contiguous(),
        "min": minimum.to(torch.float32).contiguous(),
    }


def stored_form(tensors: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    """Which form a matrix was stored in, or None when it is absent."""
    if f"{prefix}.weight" in tensors:
        return "none"
    if f"{prefix}.int8" in tensors:
        return "int8"
    if f"{prefix}.int4" in tensors:
        return "int4"
    return None


def load_matrix(tensors: Mapping[str, torch.Tensor], prefix: str) -> Matrix:
    """The matrix stored under ``prefix``; KeyError names what is missing."""
    form = stored_form(tensors, prefix)
    if form == "none":
        return DenseMatrix(tensors[f"{prefix}.weight"])
    if form == "int8":
        return Int8Matrix(tensors[f"{prefix}.int8"], tensors[f"{prefix}.scale"])
    if form == "int4":
        return Int4Matrix(
            tensors[f"{prefix}.int4"], tensors[f"{prefix}.scale"], tensors[f"{prefix}.min"]
        )
    raise KeyError(f"{prefix}.weight (or .int8 / .int4)")
