"""Knowledge distillation: the soft-target loss and what it teaches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from edgeinferd.compress.distill import distill, distillation_loss, train
from edgeinferd.compress.evaluate import accuracy
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


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 10, generator=generator)
    teacher = torch.randn(16, 10, generator=generator)
    labels = torch.randint(0, 10, (16,), generator=generator)
    return student, teacher, labels


def test_loss_depends_on_teacher_logits(logits: tuple[torch.Tensor, ...]) -> None:
    """Different teacher logits give a different loss: the teacher is actually consulted."""
    student, teacher, labels = logits
    a = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.7)
    b = distillation_loss(student, teacher * 2 + 1, labels, temperature=4.0, alpha=0.7)
    assert not torch.isclose(a, b)


def test_loss_depends_on_temperature(logits: tuple[torch.Tensor, ...]) -> None:
    """The temperature softens the distributions, so it changes the loss."""
    student, teacher, labels = logits
    a = distillation_loss(student, teacher, labels, temperature=1.0, alpha=0.7)
    b = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.7)
    assert not torch.isclose(a, b)


def test_alpha_zero_is_cross_entropy(logits: tuple[torch.Tensor, ...]) -> None:
    """With alpha = 0 only the hard labels count: the loss is plain cross-entropy."""
    student, teacher, labels = logits
    loss = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(student, labels))


def test_soft_term_is_scaled_kl(logits: tuple[torch.Tensor, ...]) -> None:
    """At alpha = 1 the loss is T² times the KL divergence of the softened distributions."""
    student, teacher, labels = logits
    t = 3.0
    expected = (
        t**2
        * (
            F.softmax(teacher / t, 1)
            * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))
        )
        .sum(1)
        .mean()
    )
    loss = distillation_loss(student, teacher, labels, temperature=t, alpha=1.0)
    torch.testing.assert_close(loss, expected)


def test_gradient_reaches_only_the_student() -> None:
    """Backpropagating the loss trains the student and leaves the teacher untouched."""
    torch.manual_seed(0)
    teacher, student = nn.Linear(8, 4), nn.Linear(8, 4)
    x, labels = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 0])
    loss = distillation_loss(student(x), teacher(x), labels, temperature=2.0, alpha=0.5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def _digits(count: int) -> tuple[Split, Split]:
    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    y = torch.from_numpy(digits.target).long()
    return Split(x[:count], y[:count]), Split(x[count:], y[count:])


def test_student_learns_from_soft_targets_alone() -> None:
    """With every label wrong, a student trained on the teacher's soft targets (alpha = 1)
    still classifies well, while one trained on the labels (alpha = 0) learns the wrong
    classes: the knowledge flows through the teacher's logits."""
    train_split, test_split = _digits(1000)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    train(teacher, train_split, Training(epochs=15, lr=3e-3), show_progress=False)
    scrambled = Split(train_split.x, (train_split.y + 1) % 10)
    results = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        training = Training(epochs=15, lr=3e-3, alpha=alpha, temperature=4.0)
        distill(teacher, student, scrambled, training, show_progress=False)
        results[alpha] = accuracy(student, test_split)
    assert accuracy(teacher, test_split) > 0.9
    assert results[1.0] > 0.75
    assert results[0.0] < 0.2
