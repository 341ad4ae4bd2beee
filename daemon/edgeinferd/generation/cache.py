"""The key/value caches of the sequences decoding together, as one padded tensor.

Row *i* holds sequence *i*'s keys and values for its first ``lengths[i]``
positions; the rest of the row is padding, hidden by the mask handed to the
model. Rows are added when sequences join and dropped when they leave, so a
step costs one call however many sequences take part. Only one thread (the
step in progress) touches a KVBatch at a time.
"""

from __future__ import annotations

import torch

_MIN_CAPACITY = 64


class KVBatch:
    def __init__(self, layers: int, heads: int, head_dim: int, context: int, dtype: torch.dtype):
        self.context = context
        self._geometry = (layers, 2, heads)
        self._head_dim = head_dim
        self._dtype = dtype
        self.cache = torch.zeros(0, layers, 2, heads, _MIN_CAPACITY, head_dim, dtype=dtype)
        self.lengths = torch.zeros(0, dtype=torch.int64)

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.cache.shape[4])

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        capacity = max(min(capacity, self.context), needed)
        grown = self.cache.new_zeros(*self.cache.shape[:4], capacity, self._head_dim)
        grown[:, :, :, :, : self.capacity] = self.cache
        self.cache = grown

    def add(self, kv: torch.Tensor) -> int:
        """Append a sequence's cache [L, 2, H, n, D] as a new row; returns the row."""
        length = int(kv.shape[3])
        self._grow(length + 1)
        row = self.cache.new_zeros(1, *self.cache.shape[1:])
        row[0, :, :, :, :length] = kv
        self.cache = torch.cat([self.cache, row])
        self.lengths = torch.cat([self.lengths, torch.tensor([length], dtype=torch.int64)])
        return self.rows - 1

    def keep(self, rows: list[int]) -> None:
        """Drop every row not listed; the kept rows keep their order."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.int64)
        self.cache = self.cache.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        if not rows:
            self.cache = self.cache[:, :, :, :, :_MIN_CAPACITY].contiguous()

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache up to the longest row, and which of its slots are real."""
        longest = max(int(self.lengths.max().item()), 1) if self.rows else 1
        mask = torch.arange(longest).unsqueeze(0) < self.lengths.unsqueeze(1)
        return self.cache[:, :, :, :, :longest], mask

    def append(self, new: torch.Tensor) -> None:
        """Write one new position [B, L, 2, H, D] at the end of each row."""
        self._grow(int(self.lengths.max().item()) + 2)
        rows = torch.arange(self.rows)
        self.cache[rows, :, :, :, self.lengths] = new
        self.lengths = self.lengths + 1
