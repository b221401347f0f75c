from modelfuse.cli import main
from modelfuse.demo import run_demo


def test_demo_merges_and_matches_the_formula(tmp_path):
    lines = []
    errors = run_demo(tmp_path / "demo", echo=lines.append)
    assert errors == {"soup": 0.0, "task-arithmetic": 0.0}
    assert (tmp_path / "demo" / "soup" / "model.safetensors").is_file()
    assert any("task_arithmetic" in line for line in lines)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert "largest difference" in capsys.readouterr().out
