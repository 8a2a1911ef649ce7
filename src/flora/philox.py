r"""Philox4x32-10, the counter-based generator behind every seeded random number in Flora.

Philox (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
maps a 128-bit counter and a 64-bit key to four 32-bit words through ``rounds`` rounds of
two 32x32 -> 64-bit multiplications and xors, with the key bumped by Weyl constants between
rounds. Here it runs in int64 tensor arithmetic with the products split into 16-bit halves,
so nothing overflows and every backend (CPU, CUDA, MPS) gives the same words. The tests check
it against the Random123 known-answer vectors and a pure-Python implementation. On the CPU
the counters go through the rounds in chunks of :data:`CPU_CHUNK` (a few hundred KiB per
temporary, so the ~150 elementwise passes stay in cache: about 4x faster than one pass at 4M
counters, 1.5x at 1M, alike below 64K, ``benchmarks/results/philox_chunks_cpu.md``); each
counter's words do not depend on the chunking.

A *stream* is the key and the three high counter words, derived from a BLAKE2b digest of a
tuple (domain, seed, parameter key, window, name, ...); the low counter word indexes the
values. The projections (:mod:`flora.projection`) and the stochastic rounding of bf16
parameters (:mod:`flora.rounding`) draw from disjoint streams.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["CPU_CHUNK", "philox4x32", "philox4x32_streams", "random_words", "stream_words"]

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Random123's Philox4x32 multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # and Weyl key increments
_PHILOX_ROUNDS = 10
#: counters per pass through the rounds on the CPU (other devices take a tensor in one pass)
CPU_CHUNK = 1 << 14


def _rounds_(out: Tensor, even: Tensor, odd: Tensor, mult: Tensor, round_keys: Tensor) -> None:
    """Philox rounds on words 0, 2 (``even``) and 1, 3 (``odd``), both ``(2, ..., n)``;
    ``mult`` and ``round_keys[r]`` broadcast against them. Writes ``(4, ..., n)`` to ``out``."""
    for key in round_keys:
        a = (even >> 16) * mult  # < 2**48
        t = ((a & 0xFFFF) << 16).add_((even & 0xFFFF) * mult)  # < 2**49
        hi = (a >> 16).add_(t >> 32)
        lo = t.bitwise_and_(_MASK32)
        # (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1) and (lo1, lo0): words (0, 2) and (1, 3)
        even = hi.flip(0).bitwise_xor_(odd).bitwise_xor_(key)
        odd = lo.flip(0)
    out[0::2] = even
    out[1::2] = odd


def _chunk(device: torch.device, n: int) -> int:
    return CPU_CHUNK if device.type == "cpu" else max(n, 1)


def philox4x32(
    counter: Tensor, c1: int, c2: int, c3: int, k0: int, k1: int, *, rounds: int = _PHILOX_ROUNDS
) -> Tensor:
    """Philox4x32-``rounds`` of the counters ``(counter[i], c1, c2, c3)`` under key ``(k0, k1)``.

    ``counter`` is an int64 tensor of values in ``[0, 2**32)``; returns an int64 tensor of
    shape ``(4, len(counter))`` holding the four 32-bit output words. The 32x32 -> 64-bit
    products are split into 16-bit halves, so int64 never overflows on any backend. The
    projections use 10 rounds (Random123's default); fewer exist for tests of the tests.
    """
    counter = counter.reshape(-1)
    n, device = counter.numel(), counter.device
    mult = torch.tensor([[_PHILOX_M[0]], [_PHILOX_M[1]]], dtype=torch.int64, device=device)
    keys = []
    for _ in range(rounds):
        keys.append((k0, k1))
        k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
    round_keys = torch.tensor(keys, dtype=torch.int64, device=device).view(rounds, 2, 1)
    out = torch.empty(4, n, dtype=torch.int64, device=device)
    size = _chunk(device, n)
    for i in range(0, n, size):
        part = counter[i : i + size]
        even = torch.stack((part, torch.full_like(part, c2)))  # words 0 and 2
        odd = torch.tensor([[c1], [c3]], dtype=torch.int64, device=device).expand(2, len(part))
        _rounds_(out[:, i : i + size], even, odd, mult, round_keys)
    return out


def philox4x32_streams(counter: Tensor, streams: Tensor, *, rounds: int = _PHILOX_ROUNDS) -> Tensor:
    """:func:`philox4x32` for ``B`` streams at once: ``counter`` ``(B, n)`` int64, ``streams``
    ``(B, 5)`` int64 rows ``(c1, c2, c3, k0, k1)`` (:func:`stream_words`); returns
    ``(4, B, n)``, row ``b`` equal to ``philox4x32(counter[b], *streams[b])`` (the same
    integer ops, so the same words)."""
    c1, c2, c3, k0, k1 = streams.unbind(-1)  # (B,) each
    device, n = counter.device, counter.shape[-1]
    mult = torch.tensor(_PHILOX_M, dtype=torch.int64, device=device).view(2, 1, 1)
    r = torch.arange(rounds, dtype=torch.int64, device=device)[:, None]
    weyl = torch.tensor(_PHILOX_W, dtype=torch.int64, device=device)
    round_keys = torch.stack(  # (rounds, 2, B, 1): k + r W mod 2**32, as the loop bumps them
        ((k0[None] + r * weyl[0]) & _MASK32, (k1[None] + r * weyl[1]) & _MASK32), dim=1
    ).unsqueeze(-1)
    out = torch.empty(4, *counter.shape, dtype=torch.int64, device=device)
    size = max(1, _chunk(device, counter.numel()) // max(1, counter.shape[0]))
    for i in range(0, n, size):
        part = counter[:, i : i + size]
        even = torch.stack((part, c2[:, None].expand_as(part)))  # words 0 and 2: (2, B, n)
        odd = torch.stack((c1, c3))[:, :, None].expand(2, *part.shape)
        _rounds_(out[:, :, i : i + size], even, odd, mult, round_keys)
    return out


def stream_words(domain: str, *parts: object) -> tuple[int, int, int, int, int]:
    """(c1, c2, c3, k0, k1): the high counter words and the key of the stream named by
    ``domain`` and ``parts``, from a 20-byte BLAKE2b digest of their ``|``-joined text."""
    text = "|".join((domain, *map(str, parts)))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=20).digest()
    c1, c2, c3, k0, k1 = (int.from_bytes(digest[i : i + 4], "little") for i in range(0, 20, 4))
    return c1, c2, c3, k0, k1


def random_words(
    n: int,
    words: tuple[int, int, int, int, int],
    *,
    offset: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Words ``offset .. offset + n - 1`` of the stream ``words`` (:func:`stream_words`), as
    an int64 tensor of values in ``[0, 2**32)``: word ``i`` is output ``i % 4`` of counter
    ``i // 4``, so a slice of the stream does not depend on where it starts."""
    first, last = offset // 4, (offset + n + 3) // 4
    counter = torch.arange(first, max(last, first + 1), dtype=torch.int64, device=device)
    out = philox4x32(counter, *words).T.reshape(-1)
    start = offset - 4 * first
    return out[start : start + n]
