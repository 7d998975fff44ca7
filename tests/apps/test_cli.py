"""The ``tlbptt`` command: its help, its errors, and what ``tlbptt costs --help`` imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tlbptt.cli import COMMANDS, main

CLI = Path(__file__).resolve().parents[2] / "src" / "tlbptt" / "cli.py"
COSTS_HELP = "try:\n    main(['costs', '--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code\n"


def _tlbptt() -> list[str]:
    script = Path(sys.executable).parent / "tlbptt"  # the console script pip installed
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tlbptt.cli"]


def test_help_exits_0_and_lists_every_command():
    done = subprocess.run([*_tlbptt(), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tlbptt {")
    listed = [line.split()[0] for line in done.stdout.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == list(COMMANDS)


def test_missing_or_unknown_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "error: a command is required" in capsys.readouterr().err
    assert main(["cost"]) == 2
    assert "error: unknown command 'cost'" in capsys.readouterr().err
    assert main(["-h"]) == 0 and "commands:" in capsys.readouterr().out


def test_costs_command_parses_its_options_before_importing_torch_or_lightning():
    """``cli.py`` imports nothing of ``lightning_tlbptt`` at module level; ``costs --help`` answers from argparse."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('tlbptt_cli', {str(CLI)!r})\n"
        "cli = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(cli)\n"
        "main = cli.main\n"
        + COSTS_HELP
        + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'lightning_tlbptt')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *help_text, loaded = done.stdout.splitlines()
    assert help_text[0].startswith("usage: tlbptt costs") and "--classifier-pool" in "\n".join(help_text)
    assert loaded == "[]"


def test_costs_help_through_the_console_script_does_not_load_lightning():
    code = "import sys\nfrom tlbptt.cli import main\n" + COSTS_HELP + "print('lightning' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("False")


def test_demo_prints_the_table_and_says_what_it_means(capfd):
    # one step per sample and one epoch: the programme, not the figures (those are README's, from a full run)
    assert main(["demo", "--T", "1", "--epochs", "1", "--batch-size", "500", "--setting", "1,1"]) == 0
    out, err = capfd.readouterr()
    assert "GPU available" not in err and "Trainer.fit" not in err and "TruncatedLocalBPTT(" not in err  # no notes
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("BPTT", "TLBPTT"))]
    assert rows == ["BPTT", "TLBPTT(k=1,"]
    assert "lr 0.195312" in out  # the paper's EMNIST rate, 0.4 at batch 1,024, scaled to the batch of 500
    assert "docs/results.md" in out
