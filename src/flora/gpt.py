"""A small GPT (nanoGPT-style decoder) for ``flora train`` and ``flora plan``.

Byte-level by default (vocabulary 256), so it needs no tokenizer. ``SIZES`` holds presets,
from ``tiny`` (seconds on a CPU) to the GPT-2 family's shapes (for planning memory).

``vocab_chunks`` stores the token embedding and the head as that many row blocks of the
vocabulary, each its own parameter (``tok.weights.0``, ..., ``head.weights.0``, ...): the
same function, initialised to the same values as the unchunked model from the same seed
(the full matrices are drawn, then split), but backward produces each block's gradient on
its own, so with step-in-backward (:mod:`flora.lean`) the largest gradient, and the
optimizer's workspace for it, is one block instead of a whole vocabulary matrix.
:func:`lean_config` picks the number of blocks the lean preset uses. The optimizer then
keeps statistics per block (Adafactor's column factors, the parameter RMS, one projection
per block).

``tie_embeddings`` computes the head with the embedding's own parameters through
:func:`flora.accumulation.tied_use`, so under an accumulator each block's head gradient is
compressed as it is formed instead of being held until the embedding's backward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from flora.accumulation import tied_use

__all__ = ["GPT", "SIZES", "ChunkedEmbedding", "ChunkedLinear", "GPTConfig", "lean_config"]


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    vocab_size: int = 256
    #: row blocks of the token embedding and the head (1: one matrix each)
    vocab_chunks: int = 1
    #: the head's weight is the token embedding's (GPT-2's weight tying; one parameter,
    #: or one per vocabulary block, initialised N(0, 0.02) as GPT-2's)
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(
                f"tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}"
            )
        for name, value in asdict(self).items():
            if name == "tie_embeddings":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.vocab_chunks > self.vocab_size:
            raise ValueError(
                f"vocab_chunks ({self.vocab_chunks}) must be at most vocab_size ({self.vocab_size})"
            )


def lean_config(config: GPTConfig) -> GPTConfig:
    """``config`` with the vocabulary in as many row blocks as it takes for none to exceed
    the largest matrix of a block (the MLP's ``4 n_embd x n_embd``): ``ceil(vocab_size /
    (4 n_embd))``, 17 for GPT-2's 50,257 x 768; a byte vocabulary stays one matrix from
    n_embd 64 up."""
    return replace(config, vocab_chunks=-(-config.vocab_size // (4 * config.n_embd)))


def _chunk_rows(weight: Tensor, chunks: int) -> list[nn.Parameter]:
    return [nn.Parameter(w.clone()) for w in weight.tensor_split(chunks)]


class ChunkedEmbedding(nn.Module):
    """``nn.Embedding(num, dim)`` stored as ``chunks`` row blocks ``weights[i]`` (the first
    ``num % chunks`` one row longer), initialised like it (N(0, 1), drawn whole, then
    split). The lookup adds each block's rows for the indices it holds and exact zeros
    elsewhere, so it returns exactly what the embedding of the concatenated blocks would."""

    def __init__(self, num: int, dim: int, chunks: int) -> None:
        super().__init__()
        weight = torch.empty(num, dim)
        nn.init.normal_(weight)
        self.weights = nn.ParameterList(_chunk_rows(weight, chunks))
        sizes = [w.shape[0] for w in self.weights]
        self.starts = [sum(sizes[:i]) for i in range(chunks)]

    def forward(self, idx: Tensor) -> Tensor:
        out = None
        for start, weight in zip(self.starts, self.weights, strict=True):
            local = idx - start
            inside = (local >= 0) & (local < weight.shape[0])
            part = F.embedding(local.clamp(0, weight.shape[0] - 1), weight)
            part = part * inside.unsqueeze(-1).to(part.dtype)
            out = part if out is None else out + part
        assert out is not None
        return out


class ChunkedLinear(nn.Module):
    """``nn.Linear(dim, num, bias=False)`` stored as ``chunks`` row blocks of its weight
    ``weights[i]``, initialised like it (Kaiming-uniform, drawn whole, then split); the
    output is the concatenation of the blocks' outputs."""

    def __init__(self, dim: int, num: int, chunks: int) -> None:
        super().__init__()
        weight = torch.empty(num, dim)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.weights = nn.ParameterList(_chunk_rows(weight, chunks))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.linear(x, w) for w in self.weights], dim=-1)


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
    """Token + position embeddings, pre-LayerNorm blocks, an output head: untied (N(0, 1)
    embedding, ``nn.Linear``'s head), or with ``tie_embeddings`` the embedding's own weight,
    drawn N(0, 0.02) as in GPT-2 (a head of N(0, 1) weights would start at huge logits),
    applied through :func:`flora.accumulation.tied_use`."""

    #: the tied head's gradients reach an accumulator apart from the embedding's
    routes_shared_gradients = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.n_embd
        chunks = config.vocab_chunks
        self.tok: nn.Module = (
            nn.Embedding(config.vocab_size, d)
            if chunks == 1
            else ChunkedEmbedding(config.vocab_size, d, chunks)
        )
        self.pos = nn.Embedding(config.block_size, d)
        self.blocks = nn.ModuleList(Block(d, config.n_head) for _ in range(config.n_layer))
        self.ln = nn.LayerNorm(d)
        self.head: nn.Module = (
            nn.Linear(d, config.vocab_size, bias=False)
            if chunks == 1
            else ChunkedLinear(d, config.vocab_size, chunks)
        )
        if config.tie_embeddings:  # the head reuses the embedding's parameters
            tied = [self.tok.weight] if chunks == 1 else list(self.tok.weights)
            with torch.no_grad():  # drawn whole, then split: the same values in blocks
                whole = torch.empty(config.vocab_size, d, device=tied[0].device)
                rows = whole.normal_(0.0, 0.02).tensor_split(chunks)
                for weight, block in zip(tied, rows, strict=True):
                    weight.copy_(block)
            if chunks == 1:
                self.head.weight = self.tok.weight
            else:
                self.head.weights = self.tok.weights
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
        if self.config.tie_embeddings:  # the embedding's weights, routed apart (tied_use)
            h = self.ln(x)
            tied = [self.tok.weight] if self.config.vocab_chunks == 1 else self.tok.weights
            logits = torch.cat([F.linear(h, tied_use(w)) for w in tied], dim=-1)
        else:
            logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))
