"""Data loaders of the evidence harness on tiny inputs written here (no download)."""

import gzip
import struct

import pytest
import torch

from flora_experiments import datasets
from flora_experiments.datasets import DataError, fashion_mnist, read_idx, text_corpus


def write_idx(path, values: torch.Tensor, *, gz: bool = True, magic: bytes = b"\x00\x00\x08"):
    raw = magic + bytes([values.dim()]) + struct.pack(f">{values.dim()}I", *values.shape)
    raw += bytes(values.to(torch.uint8).flatten().tolist())
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def test_read_idx_plain_and_gzipped(tmp_path):
    images = torch.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b", images, gz=False)
    for name in ("a.gz", "b"):
        got = read_idx(tmp_path / name)
        assert got.dtype == torch.uint8 and torch.equal(got.long(), images)


def test_read_idx_rejects_bad_files(tmp_path):
    write_idx(tmp_path / "magic.gz", torch.zeros(2, 2), magic=b"\x01\x00\x08")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "magic.gz")
    write_idx(tmp_path / "type.gz", torch.zeros(2, 2), magic=b"\x00\x00\x0d")
    with pytest.raises(DataError, match="element type"):
        read_idx(tmp_path / "type.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:  # header says 2x2, only 3 values
        f.write(b"\x00\x00\x08\x02" + struct.pack(">2I", 2, 2) + b"\x01\x02\x03")
    with pytest.raises(DataError, match="expected 4 values"):
        read_idx(tmp_path / "short.gz")


def fake_fashion(root, n_train=5, n_test=3):
    folder = root / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", torch.full((n, 28, 28), 255))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", torch.arange(n) % 10)


def test_fashion_mnist_from_a_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION", tmp_path / "absent")
    fake_fashion(tmp_path)
    x, y = fashion_mnist("train", tmp_path)
    assert x.shape == (5, 28, 28) and x.dtype == torch.float32 and float(x.max()) == 1.0
    assert y.tolist() == [0, 1, 2, 3, 4] and y.dtype == torch.int64
    x, y = fashion_mnist("test", tmp_path, limit=2)
    assert x.shape == (2, 28, 28) and y.tolist() == [0, 1]
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("valid", tmp_path)


def test_mismatched_labels_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION", tmp_path / "absent")
    fake_fashion(tmp_path)
    folder = tmp_path / "fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.arange(2))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        fashion_mnist("test", tmp_path)


def test_text_corpus(tmp_path):
    works = tmp_path / "shakespeare-works"
    works.mkdir()
    (works / "hamlet.txt").write_text("To be, or not to be", encoding="utf-8")
    (works / "tempest.txt").write_text("Full fathom five", encoding="utf-8")
    assert list(datasets.shakespeare_works(tmp_path)) == ["hamlet", "tempest"]
    data = text_corpus("shakespeare", tmp_path, max_bytes=24)
    assert bytes(data.tolist()) == b"To be, or not to be\nFull" and data.dtype == torch.int64
    assert len(text_corpus("stdlib", max_bytes=1000)) == 1000
    with pytest.raises(ValueError, match="corpus"):
        text_corpus("c4")


INDEX = """Package: alpha
Description-md5: 0
Description-en: fast alpha tool
 Alpha is a tool that does
 one thing well.
 .
 It is fast.

Package: alpha-doc
Description-md5: 1
Description-en: documentation for alpha
 Alpha is a tool that does
 one thing well.
 .
 It is fast.

Package: beta
Description-md5: 2
Description-en: beta
 A synopsis of one word is too short to keep.

Package: gamma
Description-md5: 3
Description-en: a gamma library
 Gamma  computes   things.
Tag: trailing field, not description
"""


def test_parse_descriptions_joins_paragraphs_and_drops_repeats():
    pairs = datasets.parse_descriptions(INDEX, min_words=2, max_words=20)
    assert pairs == [
        ("Alpha is a tool that does one thing well. It is fast.", "fast alpha tool"),
        ("Gamma computes things.", "a gamma library"),
    ]
    assert datasets.parse_descriptions(INDEX, min_words=4, max_words=20)[1:] == []
    assert datasets.parse_descriptions(INDEX, min_words=2, max_words=5) == [
        ("Gamma computes things.", "a gamma library")
    ]


def test_release_sha256_reads_the_signed_index(tmp_path):
    release = tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease"
    release.write_text(
        "Suite: stable\nMD5Sum:\n 00ff 10 main/i18n/Translation-en.xz\nSHA256:\n"
        " aaaa 5 main/binary-amd64/Packages\n"
        " beef 6107304 main/i18n/Translation-en.xz\n"
    )
    url, sha = datasets._release_sha256(tmp_path, "main/i18n/Translation-en.xz")
    assert sha == "beef"  # the SHA256 section, not the MD5 one
    assert url == "http://deb.debian.org/debian/dists/bookworm/main/i18n/Translation-en.xz"
    with pytest.raises(DataError, match="apt-get update"):
        datasets._release_sha256(tmp_path, "main/i18n/Translation-de.xz")


def test_debian_descriptions_from_a_cached_index(tmp_path):
    import lzma

    folder = tmp_path / "debian-descriptions"
    folder.mkdir()
    long = " ".join(f"word{i}" for i in range(25))
    with lzma.open(folder / "Translation-en.xz", "wt", encoding="utf-8") as f:
        f.write(INDEX + f"\nPackage: delta\nDescription-en: the delta tool\n {long}\n")
    # the default keeps descriptions of 20 to 150 words: only delta's
    assert datasets.debian_descriptions(tmp_path) == [(long, "the delta tool")]
