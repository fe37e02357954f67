"""The README's commands are the ones CI and users run."""

from conftest import ROOT


def readme_commands() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_main_job_runs(tmp_path):
    """`onnxgrow demo`, the README's first command: inspect, widen x2, validate on the embedded model."""
    from typer.testing import CliRunner

    from onnxgrow.cli import app
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "outputs preserved" in result.output and (tmp_path / "tiny-gpt2.widen2x.onnx").is_file()
