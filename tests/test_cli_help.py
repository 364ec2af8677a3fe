"""Every subcommand answers -h/--help with its usage and exit status 0, without composing a
config or touching a run (`learnforget eval --help` used to reach Hydra as an override)."""

from __future__ import annotations

import pytest

from learnforget.cli import COMMANDS, OWN_HELP, command_usage, main


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c not in OWN_HELP])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_commands_usage(cmd, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([cmd, flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:\n") and f"learnforget {cmd}" in out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_usage_of_a_command_is_its_block_of_the_overview():
    text = command_usage("mitigate")
    assert "RUN_DIR [--lambda 0.75]" in text and "sibling run" in text
    assert "learnforget data" not in text
    assert all(command_usage(c).count("\n") >= 1 for c in COMMANDS)


@pytest.mark.parametrize("cmd", ["sweep", "analyze", "demo"])
def test_commands_with_their_own_help_exit_zero(cmd, capsys):
    try:
        rc = main([cmd, "--help"])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 0
    assert "usage" in capsys.readouterr().out.lower()
