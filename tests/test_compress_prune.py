"""Pruning: the sparsity asked for, permanence, and structured pruning that really shrinks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from edgeinferd.compress import prune
from edgeinferd.compress.distill import train
from edgeinferd.compress.evaluate import count_parameters, layer_sparsity, total_sparsity
from edgeinferd.compress.recipe import Training
from edgeinferd.compress.sources import Split


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run no slower on one thread, and then do not fight other test processes
    for the cores (spinning OpenMP threads slow everyone down many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 5)
    )
    with torch.no_grad():
        model[2].weight.mul_(0.1)  # a layer of small weights, for global pruning to prefer
    return model


def _assert_no_pruning_left(model: nn.Module) -> None:
    for name, module in model.named_modules():
        keys = {n for n, _ in module.named_parameters(recurse=False)}
        keys |= {n for n, _ in module.named_buffers(recurse=False)}
        assert not {k for k in keys if k.endswith(("_orig", "_mask"))}, name
        assert not module._forward_pre_hooks, name


@pytest.mark.parametrize("amount", [0.3, 0.75])
def test_layer_pruning_gives_each_layer_the_asked_sparsity(amount: float) -> None:
    """Per-layer L1 pruning zeroes that fraction in every layer and leaves no masks or hooks."""
    model = prune.make_permanent(prune.prune_unstructured(_mlp(), amount, "layer"))
    for name, module in prune.weighted_layers(model):
        expected = round(amount * module.weight.numel()) / module.weight.numel()
        assert layer_sparsity(model)[name] == pytest.approx(expected)
    _assert_no_pruning_left(model)


def test_global_pruning_uses_one_threshold_across_layers() -> None:
    """Global pruning hits the asked total, and no surviving weight is smaller than a pruned one
    anywhere in the model, so the small-weight layer loses the most."""
    original = _mlp()
    magnitudes = torch.cat(
        [m.weight.detach().abs().flatten() for _, m in prune.weighted_layers(original)]
    )
    model = prune.make_permanent(prune.prune_unstructured(_mlp(), 0.5, "global"))
    weights = torch.cat([m.weight.detach().flatten() for _, m in prune.weighted_layers(model)])
    assert total_sparsity(model) == pytest.approx(round(0.5 * weights.numel()) / weights.numel())
    assert magnitudes[weights != 0].min() >= magnitudes[weights == 0].max()
    per_layer = layer_sparsity(model)
    assert per_layer["2"] == max(per_layer.values())
    assert len(set(per_layer.values())) > 1
    _assert_no_pruning_left(model)


def test_pruned_weights_stay_zero_through_fine_tuning() -> None:
    """Fine-tuning happens with the masks on, so pruned weights cannot grow back."""
    model = prune.prune_unstructured(_mlp(), 0.6, "layer")
    torch.manual_seed(1)
    data = Split(torch.randn(64, 20), torch.randint(0, 5, (64,)))
    before = {n: m.weight_orig.detach().clone() for n, m in prune.weighted_layers(model)}
    train(model, data, Training(epochs=3, lr=1e-2), show_progress=False)
    model = prune.make_permanent(model)
    assert any(not torch.equal(before[n], m.weight) for n, m in prune.weighted_layers(model))
    assert total_sparsity(model) == pytest.approx(0.6, abs=0.01)


def test_structured_pruning_removes_neurons_and_shrinks_the_next_layer() -> None:
    """Cutting 30% of neurons makes the layers physically narrower and the model smaller."""
    model = _mlp()
    shrunk = prune.prune_structured(model, 0.3, 2)
    assert (shrunk[0].out_features, shrunk[2].in_features) == (35, 35)
    assert (shrunk[2].out_features, shrunk[4].in_features) == (28, 28)
    assert shrunk[4].out_features == 5
    assert count_parameters(shrunk) < 0.6 * count_parameters(model)


def test_structured_pruning_keeps_the_largest_norm_neurons() -> None:
    """Every kept neuron's incoming-weight L2 norm is at least every removed one's."""
    model = _mlp()
    cut = prune.plan_structured(model, 0.3, 2)[0]
    norms = model[0].weight.detach().norm(dim=1)
    dropped = torch.ones(50, dtype=torch.bool)
    dropped[cut.keep] = False
    assert norms[cut.keep].min() >= norms[dropped].max()


def test_shrunk_mlp_computes_what_the_masked_mlp_computes() -> None:
    """The shrunk model's outputs equal those of the full-size model with the cut neurons
    masked out: shrinking changes the cost, not the function."""
    model = _mlp()
    cuts = prune.plan_structured(model, 0.3, 2)
    shrunk = prune.shrink(model, cuts)
    masked = prune.mask_structured(model, cuts)
    x = torch.randn(32, 20)
    torch.testing.assert_close(shrunk(x), masked(x))


def test_shrunk_convnet_computes_what_the_masked_convnet_computes() -> None:
    """The same holds through Conv+BatchNorm+ReLU and a Flatten into a Linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 10),
    )
    model.train()
    model(torch.randn(16, 1, 8, 8))  # non-trivial BatchNorm running statistics
    model.eval()
    cuts = prune.plan_structured(model, 0.5, 1)
    shrunk = prune.shrink(model, cuts)
    masked = prune.mask_structured(model, cuts)
    assert (shrunk[0].out_channels, shrunk[1].num_features, shrunk[3].in_channels) == (4, 4, 4)
    assert shrunk[6].in_features == 3 * 36
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(shrunk(x), masked(x))


def test_structured_pruning_refuses_models_it_cannot_follow() -> None:
    """A model that is not a chain of Sequential layers is refused, not silently broken."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.a(x)

    with pytest.raises(ValueError, match="Sequential"):
        prune.prune_structured(Residual(), 0.5, 2)
