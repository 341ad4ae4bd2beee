"""int8 quantization: the only module that knows which torch quantization API is used.

Chosen path: torch's eager-mode ``torch.ao.quantization`` with the fbgemm/x86 or qnnpack
kernels. On the CPUs measured (docs/compression.md) it is the path where int8 is faster
than fp32 without compiling anything; its successor, torchao, runs int8 linear layers
slower than fp32 on CPU unless the model goes through ``torch.compile``, which an edge
daemon loading TorchScript does not do. Eager int8 models can only be saved as TorchScript.

``torch.ao.quantization`` is deprecated upstream and warns on every call; the warnings are
silenced here, and only here, because the deprecation is known and the replacement is
slower for our models. If the choice changes, this is the file to rewrite.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd

API = "torch.ao.quantization (eager mode)"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the known deprecation warnings of eager quantization and TorchScript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quant_min and quant_max.*")
        warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor.*deprecated.*")
        yield


def resolve_engine(engine: str) -> str:
    """The kernel library to use: given by the recipe, or picked from the CPU.

    x86 (fbgemm plus oneDNN) is fastest on Intel/AMD; qnnpack is the one built for ARM.
    """
    if engine == "auto":
        machine = platform.machine().lower()
        engine = "x86" if machine in ("x86_64", "amd64", "i386", "i686") else "qnnpack"
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"quantization engine {engine!r} is not built into this torch; "
            f"available: {', '.join(torch.backends.quantized.supported_engines)}"
        )
    torch.backends.quantized.engine = engine
    return engine


def _fusable(model: nn.Module) -> list[list[str]]:
    """Conv+BN(+ReLU), Conv+ReLU and Linear+ReLU runs inside Sequential containers."""
    patterns: list[tuple[type[nn.Module], ...]] = [
        (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
        (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
        (nn.Conv2d, nn.BatchNorm2d),
        (nn.Conv1d, nn.BatchNorm1d),
        (nn.Conv2d, nn.ReLU),
        (nn.Conv1d, nn.ReLU),
        (nn.Linear, nn.ReLU),
        (nn.Linear, nn.BatchNorm1d),
    ]
    groups: list[list[str]] = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        i = 0
        while i < len(children):
            for pattern in patterns:
                run = children[i : i + len(pattern)]
                if len(run) == len(pattern) and all(
                    type(m) is t for (_, m), t in zip(run, pattern, strict=True)
                ):
                    groups.append([f"{prefix}.{n}" if prefix else n for n, _ in run])
                    i += len(pattern) - 1
                    break
            i += 1
    return groups


def _wrapped(model: nn.Module, engine: str, *, qat: bool) -> nn.Module:
    wrapper = tq.QuantWrapper(model)
    groups = [[f"module.{name}" for name in group] for group in _fusable(model)]
    if qat:
        wrapper.train()
        if groups:
            tq.fuse_modules_qat(wrapper, groups, inplace=True)
        wrapper.qconfig = tq.get_default_qat_qconfig(engine)
    else:
        wrapper.eval()
        if groups:
            tq.fuse_modules(wrapper, groups, inplace=True)
        wrapper.qconfig = tq.get_default_qconfig(engine)
    return wrapper


def quantize_dynamic(model: nn.Module, engine: str = "auto") -> nn.Module:
    """int8 weights, activations quantized on the fly per batch: no calibration needed."""
    with quiet():
        resolve_engine(engine)
        model = model.eval()
        quantized = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
        return cast(nn.Module, quantized)


def quantize_static(
    model: nn.Module,
    calibration: torch.Tensor,
    engine: str = "auto",
    *,
    batch_size: int = 64,
    on_batch: Callable[[], None] | None = None,
) -> nn.Module:
    """int8 weights and activations, with activation ranges observed on ``calibration``;
    fused Linear+ReLU / Conv+BN+ReLU, wrapped in QuantStub/DeQuantStub."""
    import copy

    with quiet():
        engine = resolve_engine(engine)
        wrapper = _wrapped(copy.deepcopy(model), engine, qat=False)
        tq.prepare(wrapper, inplace=True)
        with torch.no_grad():
            for start in range(0, calibration.shape[0], batch_size):
                wrapper(calibration[start : start + batch_size].float())
                if on_batch is not None:
                    on_batch()
        return cast(nn.Module, tq.convert(wrapper, inplace=True))


def prepare_qat(model: nn.Module, engine: str = "auto") -> nn.Module:
    """Insert fake quantization so fine-tuning learns weights that survive int8 rounding."""
    import copy

    with quiet():
        engine = resolve_engine(engine)
        wrapper = _wrapped(copy.deepcopy(model), engine, qat=True)
        return cast(nn.Module, tq.prepare_qat(wrapper, inplace=True))


def convert_qat(model: nn.Module) -> nn.Module:
    """Turn a QAT-trained model into real int8 modules."""
    with quiet():
        model.eval()
        return cast(nn.Module, tq.convert(model, inplace=False))


_QUANTIZED_WEIGHTED = (nnq.Linear, nnqd.Linear, nnq.Conv1d, nnq.Conv2d)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds int8 weights."""
    return any(isinstance(m, _QUANTIZED_WEIGHTED) for m in model.modules())


def int8_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized (qint8) weight tensors of an eager int8 model, by layer name."""
    found = {}
    with quiet():
        for name, module in model.named_modules():
            if isinstance(module, _QUANTIZED_WEIGHTED):
                found[name] = cast(Any, module).weight()
    return found


def scripted_int8_weights(model: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """The same, read back from a loaded TorchScript artifact's packed parameters."""
    found = {}
    with quiet():
        for name, module in model.named_modules():
            packed = getattr(module, "_packed_params", None)
            if not isinstance(packed, torch.ScriptObject):
                continue
            layer = name.removesuffix("._packed_params")
            if "Linear" in str(packed._type()):
                found[layer] = torch.ops.quantized.linear_unpack(packed)[0]
            else:
                found[layer] = torch.ops.quantized.conv2d_unpack(packed)[0]
    return found


def layer_weights(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Float ``(weight, bias)`` of every Linear/Conv layer, int8 ones dequantized, so size
    and sparsity are measured the same way before and after quantization."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    with quiet():
        for name, module in model.named_modules():
            if isinstance(module, _QUANTIZED_WEIGHTED):
                layer = cast(Any, module)
                found[name] = (layer.weight().dequantize(), layer.bias())
            elif isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
                found[name] = (module.weight.detach(), module.bias)
    return found
