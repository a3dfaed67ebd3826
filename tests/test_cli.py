"""The ``fastbptt`` command: commands imported only when run, a loud error for one that cannot be
loaded, and help for every option."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from fastbptt import cli
from fastbptt.cli import COMMANDS, command_parser, main

# Runs `fastbptt --help` and `fastbptt info` in a fresh interpreter, then reports which command
# modules were imported after each
_IMPORTS_SCRIPT = """
import contextlib, io, json, sys
from fastbptt.cli import COMMANDS, main

def loaded():
    return sorted({module for module, _ in COMMANDS.values() if module in sys.modules})

with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
    after_help = loaded()
    status = main(["info"])
print(json.dumps({"help": after_help, "info": loaded(), "status": status}))
"""


def test_help_and_info_import_no_other_command():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _IMPORTS_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result == {"help": [], "info": ["fastbptt.info"], "status": 0}


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastbptt [-h] COMMAND ...")
    for name, (_, help_text) in COMMANDS.items():
        assert re.search(rf"^ +{name} +{re.escape(help_text)}$", out, re.MULTILINE), name
    assert cli.DESCRIPTION[:40] in out and "examples:" in out and "fastbptt predict --checkpoint" in out
    assert ":data:" not in out and "imported only when" not in out  # the module docstring is for developers


def test_command_help_is_the_full_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastbptt train [-h]")
    assert "--max-steps" in out and "--on-nonfinite" in out and "--warmup-steps N" in out
    with pytest.raises(SystemExit):
        main(["predict", "-h"])
    out = capsys.readouterr().out
    assert out.startswith("usage: fastbptt predict") and "--prefix" in out


def test_unknown_command_and_options_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["info", "--nope"])
    assert exc.value.code == 2
    assert "fastbptt info: error: unrecognized arguments: --nope" in capsys.readouterr().err


@pytest.mark.parametrize("source,expected", [
    (None, "ModuleNotFoundError: No module named 'fastbptt.no_such_module'"),
    ("import gone_optional_dependency\n", "ModuleNotFoundError: No module named 'gone_optional_dependency'; "
                                          'install the optional dependencies with: pip install "fastbptt[bench]"'),
    ("raise RuntimeError('broken at import')\n", "RuntimeError: broken at import"),
], ids=["missing-module", "missing-dependency", "raises"])
def test_a_command_that_cannot_be_loaded_is_an_error_and_the_others_work(source, expected, tmp_path, monkeypatch,
                                                                         capsys):
    module = "fastbptt.no_such_module"
    if source is not None:
        module = f"broken_command_{tmp_path.name}"
        (tmp_path / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "bench", (module, COMMANDS["bench"][1]))
    assert main(["bench", "--quick"]) == 2
    assert capsys.readouterr().err == f"fastbptt: error: the 'bench' command cannot be loaded: {expected}\n"
    assert main(["info"]) == 0
    assert "fastbptt" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help(name):
    parser, _ = command_parser(name)
    missing = [action.option_strings[0] if action.option_strings else action.dest
               for action in parser._actions if not action.help or not action.help.strip()]
    assert missing == []
    assert parser.prog == f"fastbptt {name}" and parser.description
