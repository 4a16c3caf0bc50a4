"""The `dsfast` entry point: answers --help without importing torch, suggests a close command, no markup in help."""
import subprocess
import sys

from dsfast.cli import SUBCOMMANDS, main, usage


def test_help_imports_nothing_heavy():
    code = ("import sys, dsfast.cli; rc = dsfast.cli.main(['--help']); "
            "heavy = [m for m in ('torch', 'diffusers', 'deepspeed', 'numpy') if m in sys.modules]; "
            "assert rc == 0 and not heavy, heavy")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "usage: dsfast <command>" in p.stdout


def test_unknown_command_suggests(capsys):
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == "dsfast: unknown command 'trian', did you mean 'train'?"
    assert main(["zzz"]) == 2
    assert "unknown command 'zzz' (commands: train, dreambooth, sample, eval, plan, pretrain)" in capsys.readouterr().err


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out


def test_help_text_has_no_markup():
    text = usage()
    assert "``" not in text
    for name in SUBCOMMANDS:
        assert f"  {name} " in text


def test_plan_help_has_no_markup(capsys):
    try:
        main(["plan", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "``" not in out
