"""Results files: table, raw JSON and plot, each with command, versions, seed and machine."""

import json

import pytest

from flora_experiments.report import Results, environment


def test_write_markdown_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    res = Results(
        name="demo",
        title="Demo",
        columns=[("opt", "optimizer"), ("ppl", "ppl"), ("bytes", "state bytes"), ("x", "x")],
        seed=7,
        rows=[{"opt": "flora", "ppl": 3.14159, "bytes": 123456789, "x": None}],
        notes=["a note"],
        curves={"flora": [(1, 2.0), (2, 1.5)]},
    )
    written = res.write(tmp_path)
    assert [p.name for p in written] == ["demo.md", "demo.json", "demo.png"]
    md = (tmp_path / "demo.md").read_text()
    assert "| flora | 3.142 | 123,456,789 | – |" in md
    assert "Reproduce: `" in md and "Seed 7" in md and "torch " in md and "a note" in md
    assert "![plot](demo.png)" in md
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert payload["env"]["seed"] == 7 and payload["rows"][0]["bytes"] == 123456789
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_no_curves_no_plot(tmp_path):
    res = Results(name="t", title="T", columns=[("a", "a")], seed=0, rows=[{"a": 1}])
    assert [p.name for p in res.write(tmp_path)] == ["t.md", "t.json"]
    assert "png" not in (tmp_path / "t.md").read_text()


def test_environment_records_versions_and_machine():
    env = environment(3)
    assert env["seed"] == 3 and env["versions"]["torch"] != "not installed"
    assert env["machine"]["cpu_count"] >= 1 and "command" in env
