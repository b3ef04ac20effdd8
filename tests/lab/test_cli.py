"""`lorakit experiment` rejects bad input with one line and exit code 2, before any work."""

from lorakit.cli.main import main


def test_bad_inputs(tmp_path, capsys):
    afile = tmp_path / "report.md"
    afile.write_text("x")
    assert main(["experiment", "params", "--quick", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["experiment", "params", "--quick", "--threads", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--threads 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
