"""The library stands apart from its experiments: importing it (and its command line) never
imports experiment code, and ``flora`` has no experiment subcommand."""

import subprocess
import sys


def test_import_flora_imports_no_experiment_code():
    code = (
        "import sys, flora, flora.cli, flora.training, flora.planner, flora.integrations.hf\n"
        "print([m for m in sys.modules if m.startswith(('flora_experiments', 'flora.evidence'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_flora_has_no_compare_command(capsys):
    from flora.cli import main

    assert main(["compare", "lm"]) == 2
    assert "invalid choice: 'compare'" in capsys.readouterr().err
