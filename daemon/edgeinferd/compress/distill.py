"""Knowledge distillation (Hinton et al., 2015) and the training loop every step shares.

The student learns from the teacher's temperature-softened distribution, which carries
how similar the classes look to the teacher ("dark knowledge"); hard labels alone do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from edgeinferd.compress import distributed
from edgeinferd.compress.progress import Progress
from edgeinferd.compress.recipe import Training
from edgeinferd.compress.sources import Split


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    T² keeps the soft term's gradients on the same scale as cross-entropy's whatever the
    temperature, so ``alpha`` means the same thing at T=2 and T=8. The teacher's logits
    are detached: only the student learns.
    """
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0.0 or teacher_logits is None:
        return hard
    soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    soft_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    soft = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def train(
    model: nn.Module,
    split: Split,
    training: Training,
    *,
    teacher: nn.Module | None = None,
    seed: int = 0,
    label: str = "train",
    show_progress: bool = True,
) -> nn.Module:
    """Train ``model`` in place (Adam, cosine schedule) and return it.

    Under torchrun the model is wrapped in DistributedDataParallel and each rank sees its
    own shard (DistributedSampler); ``batch_size`` stays the global batch, split over ranks,
    so a recipe behaves the same on one process or several.
    """
    if training.epochs == 0:
        return model
    size, rank = distributed.world()
    torch.manual_seed(seed)
    dataset = TensorDataset(split.x.float(), split.y)
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed
    )
    loader = DataLoader(dataset, batch_size=max(1, training.batch_size // size), sampler=sampler)
    wrapped: nn.Module = DistributedDataParallel(model) if size > 1 else model
    optimizer = torch.optim.Adam(
        wrapped.parameters(), lr=training.lr, weight_decay=training.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=training.epochs * len(loader)
    )
    if teacher is not None:
        teacher.eval()
    wrapped.train()
    with Progress(label, training.epochs, enabled=show_progress and rank == 0) as progress:
        for epoch in range(training.epochs):
            sampler.set_epoch(epoch)
            total, batches = 0.0, 0
            for x, y in loader:
                teacher_logits = None
                if teacher is not None and training.alpha > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                loss = distillation_loss(
                    wrapped(x),
                    teacher_logits,
                    y,
                    temperature=training.temperature,
                    alpha=training.alpha,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
                batches += 1
            progress.advance(note=f"loss {total / max(batches, 1):.4f}")
    model.eval()
    return model


def distill(
    teacher: nn.Module,
    student: nn.Module,
    split: Split,
    training: Training,
    *,
    seed: int = 0,
    label: str = "distill",
    show_progress: bool = True,
) -> nn.Module:
    """Train ``student`` against ``teacher``'s soft targets mixed with the labels."""
    return train(
        student,
        split,
        training,
        teacher=teacher,
        seed=seed,
        label=label,
        show_progress=show_progress,
    )
