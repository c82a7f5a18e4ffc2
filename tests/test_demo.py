from hf_dgate.cli import main


def test_demo_runs_and_prints_head_report(capsys):
    assert main(["demo", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "heads:" in out and "parameters:" in out
