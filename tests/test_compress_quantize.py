"""int8 quantization: the artifacts really hold int8 weights and stay close to fp32."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from edgeinferd.compress import quantize
from edgeinferd.compress.distill import train
from edgeinferd.compress.evaluate import accuracy, load_artifact_bytes, predict
from edgeinferd.compress.export import to_torchscript
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


# Stated error bounds of int8 against fp32 on held-out digits (logits reach about 20).
MAX_ABS_LOGIT_DIFF = 1.5
MIN_ARGMAX_AGREEMENT = 0.98
MAX_ACCURACY_LOSS = 0.02


@pytest.fixture(scope="module")
def digits() -> tuple[Split, Split]:
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target, test_size=0.3, random_state=0, stratify=data.target
    )
    return (
        Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long()),
        Split(torch.from_numpy(x_test), torch.from_numpy(y_test).long()),
    )


@pytest.fixture(scope="module")
def fp32(digits: tuple[Split, Split]) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    return train(model, digits[0], Training(epochs=20, lr=3e-3), show_progress=False)


def _roundtrip(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    loaded = load_artifact_bytes(to_torchscript(model, example))
    assert isinstance(loaded, torch.jit.ScriptModule)
    return loaded


def _assert_close_to_fp32(quantized: nn.Module, fp32: nn.Module, test: Split) -> None:
    reference, got = predict(fp32, test.x), predict(quantized, test.x)
    agreement = float((reference.argmax(1) == got.argmax(1)).float().mean())
    assert (reference - got).abs().max() <= MAX_ABS_LOGIT_DIFF
    assert agreement >= MIN_ARGMAX_AGREEMENT
    assert accuracy(quantized, test) >= accuracy(fp32, test) - MAX_ACCURACY_LOSS


def _assert_int8_artifact(loaded: torch.jit.ScriptModule, layers: int) -> None:
    weights = quantize.scripted_int8_weights(loaded)
    assert len(weights) == layers
    assert all(w.dtype == torch.qint8 for w in weights.values())


def test_dynamic_artifact_has_int8_weights_and_tracks_fp32(
    digits: tuple[Split, Split], fp32: nn.Module
) -> None:
    """Dynamic quantization stores every Linear weight as int8 in the saved TorchScript and
    its logits stay within the stated error of fp32."""
    quantized = quantize.quantize_dynamic(fp32)
    loaded = _roundtrip(quantized, digits[1].x[:2])
    _assert_int8_artifact(loaded, 3)
    _assert_close_to_fp32(loaded, fp32, digits[1])


def test_static_quantization_fuses_and_calibrates(
    digits: tuple[Split, Split], fp32: nn.Module
) -> None:
    """Static quantization fuses Linear+ReLU into int8 LinearReLU modules, with activation
    ranges from the calibration set, and keeps fp32's accuracy within the stated error."""
    quantized = quantize.quantize_static(fp32, digits[0].x[:256])
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert kinds.count("LinearReLU") == 2
    assert quantize.is_quantized(quantized)
    loaded = _roundtrip(quantized, digits[1].x[:2])
    _assert_int8_artifact(loaded, 3)
    _assert_close_to_fp32(loaded, fp32, digits[1])


def test_calibration_sets_the_activation_scale(
    digits: tuple[Split, Split], fp32: nn.Module
) -> None:
    """The input quantizer's scale comes from the calibration data: inputs ten times larger
    give a ten times larger scale."""
    small = quantize.quantize_static(fp32, digits[0].x[:256])
    large = quantize.quantize_static(fp32, digits[0].x[:256] * 10)
    ratio = float(large.quant.scale) / float(small.quant.scale)
    assert ratio == pytest.approx(10.0, rel=0.05)


def test_qat_produces_int8_and_keeps_accuracy(digits: tuple[Split, Split], fp32: nn.Module) -> None:
    """QAT fine-tunes with fake quantization, then converts to int8 modules that keep fp32's
    accuracy within the stated error."""
    prepared = quantize.prepare_qat(fp32, "auto")
    assert any("FakeQuantize" in type(m).__name__ for m in prepared.modules())
    train(prepared, digits[0], Training(epochs=2, lr=1e-4), show_progress=False)
    quantized = quantize.convert_qat(prepared)
    assert quantize.is_quantized(quantized)
    assert all(w.dtype == torch.qint8 for w in quantize.int8_weights(quantized).values())
    loaded = _roundtrip(quantized, digits[1].x[:2])
    assert accuracy(loaded, digits[1]) >= accuracy(fp32, digits[1]) - MAX_ACCURACY_LOSS


def test_int8_artifact_is_much_smaller() -> None:
    """int8 weights take a quarter of fp32's bytes, so a model whose size is mostly weights
    gets an artifact well over 3.5x smaller (TorchScript code adds a fixed overhead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU()).eval()
    example = torch.rand(2, 64)
    int8 = quantize.quantize_static(model, torch.rand(128, 64))
    assert len(to_torchscript(model, example)) > 3.5 * len(to_torchscript(int8, example))


@pytest.fixture
def engine_restored() -> Iterator[None]:
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


@pytest.mark.usefixtures("engine_restored")
@pytest.mark.parametrize(
    ("machine", "engine"), [("x86_64", "x86"), ("AMD64", "x86"), ("aarch64", "qnnpack")]
)
def test_engine_follows_the_machine(
    monkeypatch: pytest.MonkeyPatch, machine: str, engine: str
) -> None:
    """With engine = "auto", x86 CPUs get the x86 kernels and ARM ones get qnnpack."""
    monkeypatch.setattr(quantize.platform, "machine", lambda: machine)
    assert quantize.resolve_engine("auto") == engine
    assert torch.backends.quantized.engine == engine


@pytest.mark.usefixtures("engine_restored")
def test_engine_from_the_recipe_wins() -> None:
    """An engine named in the recipe is used whatever the machine."""
    assert quantize.resolve_engine("qnnpack") == "qnnpack"
    assert torch.backends.quantized.engine == "qnnpack"


def test_static_quantization_fuses_conv_bn_relu(digits: tuple[Split, Split]) -> None:
    """A Conv+BatchNorm+ReLU block becomes one int8 ConvReLU2d (BatchNorm folded in), and the
    int8 convnet keeps fp32's predictions on the digits as 8x8 images."""
    as_images = [Split(s.x.view(-1, 1, 8, 8), s.y) for s in digits]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    train(model, as_images[0], Training(epochs=4, lr=3e-3), show_progress=False)
    quantized = quantize.quantize_static(model, as_images[0].x[:256])
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert "ConvReLU2d" in kinds
    assert "BatchNorm2d" not in kinds
    loaded = _roundtrip(quantized, as_images[1].x[:2])
    assert set(quantize.scripted_int8_weights(loaded)) == {"module.0", "module.4"}
    _assert_close_to_fp32(loaded, model, as_images[1])
