"""The library stands apart from its experiments: importing it (and its command line) never
imports experiment code, and ``flora`` has no experiment subcommand."""

import subprocess
import sys


def test_import_flora_imports_no_experiment_code():
    code = (
        "import sys, flora, flora.cli, flora.training, flora.model_memory, flora.integrations.hf\n"
        "print([m for m in sys.modules if m.startswith(('flora_experiments', 'flora.evidence'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flora_has_no_compare_command(capsys):
    from flora.cli import main

    assert main(["compare", "lm"]) == 2
    assert "invalid choice: 'compare'" in capsys.readouterr().err


def test_the_version_is_written_once_and_the_package_is_typed():
    from importlib.metadata import version
    from pathlib import Path

    import flora

    assert version("flora-optim") == flora.__version__  # the metadata reads flora.__version__
    root = Path(__file__).resolve().parents[1]
    assert 'dynamic = ["version"]' in (root / "pyproject.toml").read_text()
    assert (Path(flora.__file__).parent / "py.typed").is_file()
