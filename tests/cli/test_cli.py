import subprocess
import sys

from rqvae.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert "rqvae 0.1.0" in capsys.readouterr().out
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "rqvae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: rqvae" in r.stdout
