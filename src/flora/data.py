"""Byte-level text corpora for ``flora train``: the Python standard library's own source (on
every machine with Python, so the default needs no download) or the user's text files."""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Corpus", "get_batch", "load_corpus", "stdlib_files"]


class CorpusError(ValueError):
    """A corpus that cannot be used (missing files, empty, too short for the block size)."""


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` files in a fixed (sorted) order, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _expand(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            if not found:
                raise CorpusError(f"folder {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"no such file or folder: {path}")
    return files


class Corpus:
    """Bytes of the training text split into train (first 90%) and held-out (last 10%)."""

    def __init__(self, data: Tensor, description: str) -> None:
        self.data, self.description = data, description
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]

    def check_block_size(self, block_size: int) -> None:
        if len(self.val) <= block_size + 1:
            need = (block_size + 2) * 10
            raise CorpusError(
                f"corpus too small ({len(self.data)} bytes) for block size {block_size}: "
                f"need at least {need} bytes"
            )


def load_corpus(
    paths: Sequence[str | Path] | None = None, *, max_bytes: int | None = None
) -> Corpus:
    """Concatenate the bytes of ``paths`` (files or folders; default: the stdlib source), up
    to ``max_bytes``."""
    files = stdlib_files() if not paths else _expand(paths)
    chunks, size = [], 0
    for path in files:
        try:
            chunk = path.read_bytes()
        except OSError as err:
            raise CorpusError(f"cannot read {path}: {err.strerror}") from err
        if max_bytes is not None:
            chunk = chunk[: max_bytes - size]
        chunks.append(chunk)
        size += len(chunk)
        if max_bytes is not None and size >= max_bytes:
            break
    if size == 0:
        raise CorpusError("the corpus is empty: " + ", ".join(map(str, paths or ["stdlib"])))
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
    what = "Python stdlib source" if not paths else f"{len(files)} file(s)"
    return Corpus(data, f"{what}, {size / 2**20:.2f} MiB")


def get_batch(
    source: Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows ``x`` and next-byte targets ``y``, both ``(batch_size, block_size)``."""
    ix = torch.randint(len(source) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([source[i : i + block_size] for i in ix])
    y = torch.stack([source[i + 1 : i + 1 + block_size] for i in ix])
    return x, y
