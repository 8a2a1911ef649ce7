"""A tiny model with every kind of parameter the accumulator meets, and its data.

Shared by the single-process tests and the torch.distributed workers (which import it in
spawned processes).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Embedding (right side), Conv1d (an N-d weight), Linear layers (both sides), LayerNorm
    and biases (uncompressed vectors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)  # 40 x 12: right side, dim 12
        self.conv = nn.Conv1d(12, 16, 3)  # 16 x 12 x 3 viewed as 16 x 36: left, dim 16
        self.fc = nn.Linear(16, 24)  # 24 x 16: right, dim 16
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 5)  # 5 x 24: left, dim 5 (kept at rank >= 5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx).transpose(1, 2)
        x = self.conv(x).mean(-1)
        x = self.norm(torch.tanh(self.fc(x)))
        return self.head(x)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(dtype)


def make_batches(
    count: int, batch: int = 4, seed: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 40, (batch, 7), generator=g), torch.randint(0, 5, (batch,), generator=g))
        for _ in range(count)
    ]


def loss_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    idx, target = batch
    return nn.functional.cross_entropy(model(idx), target)
