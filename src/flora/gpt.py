"""A small GPT (nanoGPT-style decoder) for ``flora train`` and ``flora plan``.

Byte-level by default (vocabulary 256), so it needs no tokenizer. ``SIZES`` holds presets,
from ``tiny`` (seconds on a CPU) to the GPT-2 family's shapes (for planning memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

__all__ = ["GPT", "SIZES", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


SIZES: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "medium": GPTConfig(n_layer=6, n_head=8, n_embd=256, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": GPTConfig(24, 16, 1024, 1024, 50257),
    "gpt2-large": GPTConfig(36, 20, 1280, 1024, 50257),
    "gpt2-xl": GPTConfig(48, 25, 1600, 1024, 50257),
}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.attn(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token + position embeddings, pre-LayerNorm blocks, an untied output head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        self.tok = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.block_size, d)
        self.blocks = nn.ModuleList(Block(d, config.n_head) for _ in range(config.n_layer))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        #: recompute each block in backward instead of keeping its activations (reentrant
        #: ``torch.utils.checkpoint``: only the block inputs are saved)
        self.activation_checkpointing = False

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab)``, or the mean cross-entropy when ``targets`` is given."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        checkpointing = self.activation_checkpointing and torch.is_grad_enabled()
        if checkpointing and not x.requires_grad:  # frozen embeddings (LoRA): reentrant
            x.requires_grad_(True)  # checkpointing needs an input that requires grad
        for block in self.blocks:
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True)
            else:
                x = block(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))
