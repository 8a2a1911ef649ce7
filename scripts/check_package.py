"""Prove the package as a user gets it: build the sdist, build the wheel from that sdist,
install the wheel into a fresh virtual environment that reuses this interpreter's torch
(nothing downloaded: ``pip install --no-index``), and run ``flora plan --model tiny`` there.

    python scripts/check_package.py [--keep]

Exit status 0 when every step passes; otherwise the failing step's output and status 1.
Run by ``make test`` after the test suite; about 30 s, most of it the isolated build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(what: str, cmd: list[str], cwd: Path) -> str:
    print(f"check_package: {what}", flush=True)
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        sys.exit(f"check_package: {what} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout


def check_wheel(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("flora/__init__.py", "flora/py.typed", "flora/optim/adafactor.py"):
        if needed not in names:
            sys.exit(f"check_package: {wheel.name} lacks {needed}")
    strays = [n for n in names if n.split("/")[0] in ("tests", "flora_experiments", "benchmarks")]
    if strays:
        sys.exit(f"check_package: {wheel.name} ships {strays[:5]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    import torch  # the torch the fresh environment will reuse

    torch_site = Path(torch.__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp(prefix="flora-package-"))
    try:
        dist = work / "dist"
        # `python -m build` makes the sdist, then the wheel from the unpacked sdist, so a file
        # the sdist forgets fails the wheel or the run below
        step("build sdist and wheel", [sys.executable, "-m", "build", "--outdir", str(dist), "."],
             ROOT)  # fmt: skip
        sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
        if len(sdists) != 1 or len(wheels) != 1:
            sys.exit(f"check_package: expected one sdist and one wheel in {dist}")
        check_wheel(wheels[0])
        venv = work / "venv"
        # without pip (and the old setuptools that comes with it, which would shadow the one
        # torch needs): this interpreter's pip installs into it (``pip --python``)
        step("fresh virtual environment",
             [sys.executable, "-m", "venv", "--without-pip", str(venv)], work)  # fmt: skip
        python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
        site = Path(
            step("its site-packages", [str(python), "-c", "import sysconfig; "
                 "print(sysconfig.get_paths()['purelib'])"], work).strip()
        )  # fmt: skip
        # reuse torch: its folder on the new environment's path (a .pth line adds the folder
        # only; the .pth files there, such as an editable install of flora, are not run)
        (site / "reuse-torch.pth").write_text(f"{torch_site}\n")
        step("install the wheel (no index)",
             [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index",
              str(wheels[0])], work)  # fmt: skip
        probe = "import flora, torch; print(flora.__file__, flora.__version__, torch.__version__)"
        where = step("import flora", [str(python), "-c", probe], work)
        if not where.startswith(str(site)):
            sys.exit(f"check_package: flora imported from {where.split()[0]}, not {site}")
        flora_cli = python.parent / "flora"
        plan = step("flora plan --model tiny", [str(flora_cli), "plan", "--model", "tiny"], work)
        if "Flora" not in plan or "AdamW" not in plan:
            sys.exit(f"check_package: unexpected plan output:\n{plan}")
        print(f"check_package: ok ({sdists[0].name}, {wheels[0].name}; {where.strip()})")
    finally:
        if args.keep:
            print(f"check_package: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
