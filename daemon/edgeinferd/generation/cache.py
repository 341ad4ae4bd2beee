"""The key/value cache: one preallocated row ("slot") per concurrent sequence.

Allocated once when a model loads, for ``max_sequences`` slots of ``context``
positions each, and written in place: a step never concatenates, re-pads or
copies whole caches, so its cost does not grow with how many steps came
before. The memory it reserves is fixed and stated at load (``nbytes``); the
pages are zero-filled by the kernel on first touch, so resident memory grows
only with the positions sequences actually reach.

Live sequences occupy slots ``0 .. n - 1``: a decode step over all of them
reads one contiguous view. When a sequence leaves, the sequence in the last
occupied slot moves into its place (``move``: one copy of that sequence's
filled positions).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, context: int, head_dim: int) -> None:
        shape = (layers, slots, kv_heads, context, head_dim)
        self.keys = torch.zeros(shape, dtype=torch.float32)
        self.values = torch.zeros(shape, dtype=torch.float32)
        self.slots = slots
        self.context = context

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def write(
        self,
        layer: int,
        first_slot: int,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [B, H, T, D] of rows ``first_slot..`` at ``positions`` [B, T];
        returns this layer's whole cache (keys, values), each [slots, H, context, D]."""
        rows = torch.arange(first_slot, first_slot + positions.shape[0]).unsqueeze(1)
        layer_keys = self.keys[layer]
        layer_values = self.values[layer]
        layer_keys[rows, :, positions] = keys.transpose(1, 2)
        layer_values[rows, :, positions] = values.transpose(1, 2)
        return layer_keys, layer_values

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target``."""
        if source == target or length == 0:
            return
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
