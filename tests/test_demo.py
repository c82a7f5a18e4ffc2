from hf_dgate.cli import main


def test_demo_runs_and_prints_head_report(capsys):
    assert main(["demo", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "heads:" in out and "parameters:" in out


def test_default_demo_shows_settled_exact_zeros(capsys):
    """The first impression the README promises: most heads of the copy task go to exact zero (none grey)."""
    assert main(["demo"]) == 0
    report = capsys.readouterr().out.split("D-Gating sparsity")[-1]
    zero, total = map(int, report.split("heads: ")[1].split(" zero")[0].split("/"))
    assert zero >= total // 2 and "grey" not in report
