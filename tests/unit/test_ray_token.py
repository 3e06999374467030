"""The command lines turn Ray's token mode on when a token is at hand, before Ray reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.common.ray_token import use_a_found_token

REPO = Path(__file__).resolve().parents[2]


def test_a_token_in_the_environment_a_named_file_or_the_default_file_turns_token_mode_on(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "nobody"))
    assert use_a_found_token(env := {}) is None and env == {}  # no token anywhere

    env = {"RAY_AUTH_TOKEN": "abc"}
    assert use_a_found_token(env) == "RAY_AUTH_TOKEN" and env["RAY_AUTH_MODE"] == "token"

    token = tmp_path / "token"
    token.write_text("  \n")
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    assert use_a_found_token(env) is None and "RAY_AUTH_MODE" not in env  # an empty file
    token.write_text("0123abcd\n")
    assert use_a_found_token(env) == str(token) and env["RAY_AUTH_MODE"] == "token"

    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("0123abcd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    env = {}
    assert use_a_found_token(env) == str(default) and env["RAY_AUTH_MODE"] == "token"

    env = {"RAY_AUTH_MODE": "disabled"}  # the user's own choice stands
    assert use_a_found_token(env) is None and env["RAY_AUTH_MODE"] == "disabled"


@pytest.mark.parametrize("command", ["orchestration.sweep", "orchestration.jobs"])
def test_the_command_lines_set_it_before_ray_reads_it(tmp_path, command):
    """Ray reads RAY_AUTH_MODE when it is imported: importing the command's module (which
    imports Ray on the way) must leave Ray itself in token mode."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("0123abcd" * 8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    probe = (
        f"import {command}, sys; from ray._raylet import get_authentication_mode, "
        "AuthenticationMode; assert 'ray' in sys.modules; "
        "print(get_authentication_mode() == AuthenticationMode.TOKEN)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "True", result.stderr
