"""Byte-level text corpora for ``flora train``: the Python standard library's own source (on
every machine with Python, so the default needs no download) or the user's text files."""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Corpus", "get_batch", "is_text", "load_corpus", "stdlib_files"]


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


def is_text(sample: bytes) -> bool:
    """Whether ``sample`` (a file's first bytes) looks like text: no NUL byte, and UTF-8 up to
    a multi-byte character cut at its end."""
    if b"\0" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(sample) - 3 and err.reason == "unexpected end of data"
    return True


class Corpus:
    """Bytes of the training text split into train (first 90%) and held-out (last 10%).

    ``spans`` gives ``(file, start, end)`` byte ranges of the files in ``data``, so that the
    held-out files can be named."""

    def __init__(
        self, data: Tensor, description: str, spans: Sequence[tuple[str, int, int]] = ()
    ) -> None:
        self.data, self.description = data, description
        self.split = int(0.9 * len(data))
        self.train, self.val = data[: self.split], data[self.split :]
        self.spans = list(spans)

    @property
    def held_out_description(self) -> str:
        """Which files the held-out split (the last 10% of the bytes) comes from."""
        held = [(f, start < self.split) for f, start, end in self.spans if end > self.split]
        text = f"the last 10% of the bytes ({len(self.val):,})"
        if not held:
            return text
        names = [f + (" (its end)" if partial else "") for f, partial in held]
        shown = (
            names if len(names) <= 4 else [*names[:2], f"... {len(names) - 3} more ...", names[-1]]
        )
        return f"{text}: {', '.join(shown)}"

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
    to ``max_bytes``, reading no more of any file than is needed. Files that are not text
    (a NUL byte or invalid UTF-8 in their first 8 KiB) are skipped and named."""
    files = stdlib_files() if not paths else _expand(paths)
    chunks, spans, skipped, size = [], [], [], 0
    for path in files:
        want = None if max_bytes is None else max_bytes - size
        try:
            with open(path, "rb") as f:
                chunk = f.read() if want is None else f.read(want)
        except OSError as err:
            raise CorpusError(f"cannot read {path}: {err.strerror}") from err
        if not is_text(chunk[:8192]):
            skipped.append(str(path))
            continue
        chunks.append(chunk)
        spans.append((str(path), size, size + len(chunk)))
        size += len(chunk)
        if max_bytes is not None and size >= max_bytes:
            break
    note = ""
    if skipped:
        shown = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        note = f"; skipped {len(skipped)} non-text file(s): {shown}"
    if size == 0:
        raise CorpusError("the corpus is empty: " + ", ".join(map(str, paths or ["stdlib"])) + note)
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
    what = "Python stdlib source" if not paths else f"{len(spans)} file(s)"
    return Corpus(data, f"{what}, {size / 2**20:.2f} MiB{note}", spans)


def get_batch(
    source: Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows ``x`` and next-byte targets ``y``, both ``(batch_size, block_size)``."""
    ix = torch.randint(len(source) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([source[i : i + block_size] for i in ix])
    y = torch.stack([source[i + 1 : i + 1 + block_size] for i in ix])
    return x, y
