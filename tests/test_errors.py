"""A user error ends the command and the recipes with one message and exit status 2; bugs keep their traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam2_peft.cli import run
from sam2_peft.data import DataError
from sam2_peft.errors import ConfigError, UserError, run_command

ROOT = Path(__file__).resolve().parents[1]


def test_a_user_error_is_one_message_and_status_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(["eval", "--model", "tiny-random", "--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sam2-peft: error: ") and err.count("error:") == 1
    assert str(tmp_path / "nowhere") in err and "Traceback" not in err


def test_unknown_flags_and_bad_values_are_user_errors(capsys):
    for argv, message in ((["train", "--lerning_rate", "1"], "Unknown flag(s) ['--lerning_rate', '1']"),
                          (["train", "--mask_type", "blobs"], "`--mask_type blobs` is unknown")):
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(monkeypatch):
    def bad_data(argv):
        raise DataError("mask of another size")

    with pytest.raises(DataError):
        run_command(bad_data, ["--debug"])
    monkeypatch.setenv("SAM2_PEFT_DEBUG", "1")
    with pytest.raises(DataError):
        run_command(bad_data, [])
    monkeypatch.delenv("SAM2_PEFT_DEBUG")
    with pytest.raises(ZeroDivisionError):
        run_command(lambda argv: 1 / 0, [])
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, UserError)


def test_a_recipe_prints_its_data_error_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SAM2_PEFT_DEBUG", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "decoder_only.py"), "--model", "tiny-random", "--data",
         str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "decoder_only.py: error: " in result.stderr and result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr
