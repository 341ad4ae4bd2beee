"""Pruning: unstructured (zeros inside dense weights) and structured (whole units removed).

Unstructured pruning uses ``torch.nn.utils.prune`` and is made permanent with
``prune.remove``, so the artifact carries plain weights and no masks or hooks. Zeros
stored densely make a model neither smaller on disk nor faster; they matter when a sparse
format or a later quantization can exploit them. Structured pruning removes whole neurons
(Linear rows) or channels (Conv filters) with the smallest Ln norm and rebuilds the layers
smaller, which is what actually cuts size and latency on a CPU.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PASS_THROUGH = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers pruning applies to, by qualified name, in definition order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]


def prune_unstructured(model: nn.Module, amount: float, scope: str) -> nn.Module:
    """Zero the ``amount`` fraction of smallest-magnitude weights, per layer or globally.

    Per layer, every layer loses the same fraction; globally, one threshold applies to all
    layers, so layers with many small weights (usually the big ones) lose more. The masks
    stay on until :func:`make_permanent`, so fine-tuning cannot revive pruned weights.
    """
    layers = weighted_layers(model)
    if scope == "global":
        prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=amount
        )
    else:
        for _, module in layers:
            prune.l1_unstructured(module, "weight", amount=amount)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every pruning mask into its weight and drop the reparametrisation and hooks."""
    for module in model.modules():
        for name in ("weight", "bias"):
            if hasattr(module, f"{name}_mask"):
                prune.remove(module, name)
    return model


@dataclass(frozen=True)
class Cut:
    """Output units of ``layer`` to keep; ``consumer`` is the next weighted layer, which
    loses the matching inputs (``group`` inputs per unit after a Flatten)."""

    layer: str
    keep: torch.Tensor
    between: tuple[str, ...]
    consumer: str
    group: int


def _chain(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"structured pruning needs a chain of nn.Sequential layers; "
            f"{prefix or 'the model'} is {type(model).__name__}"
        )
    chain: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            chain += _chain(child, qualified + ".")
        else:
            chain.append((qualified, child))
    return chain


def _units(module: nn.Module) -> int:
    return int(_weight(module).shape[0])


def plan_structured(model: nn.Module, amount: float, norm: float) -> list[Cut]:
    """Choose, per hidden layer, the units to keep: the ``1 - amount`` fraction with the
    largest Ln norm of their incoming weights. The output layer is never cut."""
    chain = _chain(model)
    positions = [i for i, (_, m) in enumerate(chain) if isinstance(m, WEIGHTED)]
    cuts = []
    for a, b in itertools.pairwise(positions):
        name, layer = chain[a]
        consumer_name, consumer = chain[b]
        between = chain[a + 1 : b]
        group = 1
        for other_name, other in between:
            if isinstance(other, nn.Flatten):
                group = int(_weight(consumer).shape[1]) // _units(layer)
            elif not isinstance(other, _PASS_THROUGH + _NORMS):
                raise ValueError(
                    f"structured pruning cannot see through {other_name} "
                    f"({type(other).__name__}) between {name} and {consumer_name}"
                )
        if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"structured pruning does not handle grouped convolution {name}")
        method = prune.LnStructured(amount, n=norm, dim=0)
        weight = _weight(layer).detach()
        mask = method.compute_mask(weight, default_mask=torch.ones_like(weight))
        keep = mask.flatten(1).any(dim=1).nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError(f"amount {amount} would remove every unit of {name}")
        cuts.append(Cut(name, keep, tuple(n for n, _ in between), consumer_name, group))
    return cuts


def _consumer_inputs(cut: Cut) -> torch.Tensor:
    """Consumer input columns fed by the kept units (channel-major after a Flatten)."""
    offsets = torch.arange(cut.group)
    return (cut.keep[:, None] * cut.group + offsets[None, :]).flatten()


def mask_structured(model: nn.Module, cuts: list[Cut]) -> nn.Module:
    """Disconnect the cut units with pruning masks but keep every shape: the reference
    that :func:`shrink` must reproduce exactly, with fewer parameters."""
    modules = dict(model.named_modules())
    for cut in cuts:
        layer, consumer = modules[cut.layer], modules[cut.consumer]
        weight, consumer_weight = _weight(layer), _weight(consumer)
        rows = torch.zeros(_units(layer), dtype=torch.bool)
        rows[cut.keep] = True
        shape = [-1] + [1] * (weight.ndim - 1)
        prune.custom_from_mask(layer, "weight", rows.view(shape).expand_as(weight))
        if _bias(layer) is not None:
            prune.custom_from_mask(layer, "bias", rows)
        columns = torch.zeros(consumer_weight.shape[1], dtype=torch.bool)
        columns[_consumer_inputs(cut)] = True
        shape = [1, -1] + [1] * (consumer_weight.ndim - 2)
        prune.custom_from_mask(consumer, "weight", columns.view(shape).expand_as(consumer_weight))
    return model


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = module.bias
    assert bias is None or isinstance(bias, torch.Tensor)
    return bias


def _rebuilt(
    layer: nn.Module, rows: torch.Tensor | None, columns: torch.Tensor | None
) -> nn.Module:
    """A copy of ``layer`` (all hyperparameters kept) holding only the given rows/columns."""
    weight = _weight(layer).detach()
    bias = _bias(layer)
    bias = bias.detach() if bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = copy.deepcopy(layer)
    new.weight = nn.Parameter(weight.clone())
    if bias is not None:
        new.bias = nn.Parameter(bias.clone())
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = int(weight.shape[0]), int(weight.shape[1])
    else:
        assert isinstance(new, nn.Conv1d | nn.Conv2d)
        new.out_channels, new.in_channels = int(weight.shape[0]), int(weight.shape[1])
    return new


def _sliced_norm(norm: nn.Module, keep: torch.Tensor) -> nn.Module:
    assert isinstance(norm, _NORMS)
    new = type(norm)(
        keep.numel(),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    new.load_state_dict({k: (v[keep] if v.ndim else v) for k, v in norm.state_dict().items()})
    new.train(norm.training)
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def shrink(model: nn.Module, cuts: list[Cut]) -> nn.Module:
    """A copy of ``model`` with the cut units physically removed: smaller weight matrices
    in the cut layers and in the layers that consume them."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    rows = {cut.layer: cut.keep for cut in cuts}
    columns = {cut.consumer: _consumer_inputs(cut) for cut in cuts}
    for name in {*rows, *columns}:
        _replace(model, name, _rebuilt(modules[name], rows.get(name), columns.get(name)))
    for cut in cuts:
        for between in cut.between:
            if isinstance(modules[between], _NORMS):
                _replace(model, between, _sliced_norm(modules[between], cut.keep))
    return model


def prune_structured(model: nn.Module, amount: float, norm: float) -> nn.Module:
    """Remove the ``amount`` fraction of units with the smallest Ln norm from every hidden
    layer, returning a smaller model."""
    return shrink(model, plan_structured(model, amount, norm))
