"""``flora-experiments``: the pilot study's quick mode end to end on the real Fashion-MNIST
(installed on first use from Debian's package registry), and the command's errors."""

import json

import pytest

from flora_experiments.cli import main


@pytest.mark.slow  # about 15 s on 2 cores (a quarter of the training set)
def test_pilot_quick_end_to_end(tmp_path, capsys):
    argv = ["pilot", "--quick", "--out", str(tmp_path)]
    assert main([*argv, "--set", "train_limit=15000", "--set", "test_limit=2500"]) == 0
    assert "wrote" in capsys.readouterr().out
    payload = json.loads((tmp_path / "pilot_quick.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert set(rows) == {"sgd", "lora", "lora_b", "rp", "rrp"}
    assert payload["env"]["seed"] == 0 and payload["env"]["versions"]["torch"]
    # two step sizes always put the best on an edge: every sweep was widened past it
    assert all(len(r["points"]) >= 3 and r["sweep"].count(":") >= 3 for r in rows.values())
    # real data, real training: well above chance (0.1) for every method
    assert all(r["accuracy"] > 0.5 for r in rows.values())
    # LoRA(B) and RP are the same update (Observation 2.2)
    assert abs(rows["lora_b"]["accuracy"] - rows["rp"]["accuracy"]) < 0.01
    md = (tmp_path / "pilot_quick.md").read_text()
    assert "| rrp |" in md and "Reproduce:" in md and (tmp_path / "pilot_quick.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["table9"], "invalid choice"),
        (["pilot", "--optimizers", "adamw"], "--optimizers applies to"),
        (["lm", "--optimizers", "sophia", "--steps", "1"], "sophia"),
        (["pilot", "--steps", "0"], "positive integer"),
        (["lm", "--quick", "--set", "steps=x"], "steps takes a int value like"),
        (["lm", "--quick", "--set", "kappa_lr=fast"], "kappa_lr takes a number value"),
        (["pilot", "--quick", "--data", __file__], "is a file; it must be a folder"),
        (["pilot", "--quick", "--out", f"{__file__}/out"], "is a file, not a folder"),
    ],
)
def test_compare_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flora-experiments: error:") and message in err and "\n" not in err


def test_set_overrides_and_tag(tmp_path, capsys, monkeypatch):
    import flora_experiments.compare as compare_module

    seen = {}

    def fake_compare(name, **kwargs):
        seen.update(kwargs, name=name)
        return []

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    argv = ["accumulate", "--quick", "--set", "optimizer=adafactor"]
    argv += ["--set", "ranks=(32,)", "--set", "lr=0.01", "--tag", "adafactor"]
    assert main(argv) == 0
    assert seen["overrides"] == {"optimizer": "adafactor", "ranks": (32,), "lr": 0.01}
    assert seen["tag"] == "adafactor" and seen["name"] == "accumulate"
    assert main(["pilot", "--set", "epochs"]) == 2
    assert main(["pilot", "--tag", "../x"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_unknown_setting_is_refused(capsys):
    assert main(["pilot", "--quick", "--set", "colour=red"]) == 2
    assert "no setting(s) ['colour']" in capsys.readouterr().err


def test_every_experiment_is_on_the_command_line_with_both_sizes():
    import importlib
    from dataclasses import fields

    from flora_experiments.compare import EXPERIMENTS

    for name, exp in EXPERIMENTS.items():
        quick, full = exp.config(True), exp.config(False)
        assert type(quick) is type(full) and quick != full, name
        names = {f.name for f in fields(quick)}
        # --steps sets epochs or steps; --seed sets seed
        assert "seed" in names and ("epochs" in names or "steps" in names), name
        module = importlib.import_module(f"flora_experiments.{exp.module}")
        assert callable(getattr(module, exp.runner)), name
