"""Settings from the environment (mofa_omni.config): each reader's value, default and message
for a bad value, and how a node ends on a bad setting -- one line naming the node and the
variable, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mofa_omni.config import (
    env_choice,
    env_float,
    env_int,
    env_pace,
    env_path,
    env_str,
    exit_on_bad_settings,
)
from mofa_omni.contract.errors import ConfigError, ContractError

NODES = Path(__file__).parents[1] / "nodes"


def test_env_str_strips_and_falls_back_to_the_default():
    assert env_str("X", "d", {"X": "  value "}) == "value"
    assert env_str("X", "d", {}) == "d"
    assert env_str("X", "d", {"X": "   "}) == "d"  # blank counts as unset


def test_env_str_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("MOFA_OMNI_TEST_SETTING", "here")
    assert env_str("MOFA_OMNI_TEST_SETTING", "d") == "here"
    monkeypatch.delenv("MOFA_OMNI_TEST_SETTING")
    assert env_str("MOFA_OMNI_TEST_SETTING", "d") == "d"


def test_env_path_is_relative_to_where_dora_was_started(tmp_path: Path):
    assert env_path("P", Path("/default"), {}) == Path("/default")
    assert env_path("P", Path("/default"), {"P": "/abs/file"}) == Path("/abs/file")
    assert env_path("P", Path("/default"), {"P": "rel/file", "PWD": str(tmp_path)}) == \
        tmp_path / "rel" / "file"
    assert env_path("P", Path("/default"), {"P": "~/x", "HOME": "/home/u"}).is_absolute()


def test_env_float():
    assert env_float("X", 1.5, {}) == 1.5
    assert env_float("X", 1.5, {"X": " 2 "}) == 2.0
    assert env_float("X", 1.5, {"X": "1"}, maximum=1) == 1.0
    with pytest.raises(ConfigError, match=r"^X='soon' is not a number$"):
        env_float("X", 1.5, {"X": "soon"})
    with pytest.raises(ConfigError, match=r"^X='nan' is not a number$"):
        env_float("X", 1.5, {"X": "nan"})
    with pytest.raises(ConfigError, match=r"^X='-1' must be at least 0$"):
        env_float("X", 1.5, {"X": "-1"})
    with pytest.raises(ConfigError, match=r"^X='0.5' must be at least 1$"):
        env_float("X", 1.5, {"X": "0.5"}, minimum=1)
    with pytest.raises(ConfigError, match=r"^X='1.5' must be at most 1$"):
        env_float("X", 0.5, {"X": "1.5"}, maximum=1)


def test_env_int():
    assert env_int("N", 96, {}) == 96
    assert env_int("N", 96, {"N": "12"}) == 12
    with pytest.raises(ConfigError, match=r"^N='2.5' is not a whole number$"):
        env_int("N", 96, {"N": "2.5"})
    with pytest.raises(ConfigError, match=r"^N='lots' is not a whole number$"):
        env_int("N", 96, {"N": "lots"})
    with pytest.raises(ConfigError, match=r"^N='0' must be at least 1$"):
        env_int("N", 96, {"N": "0"}, minimum=1)


def test_env_choice():
    modes = ("file", "speaker")
    assert env_choice("SINK", "file", modes, {}) == "file"
    assert env_choice("SINK", "file", modes, {"SINK": " Speaker "}) == "speaker"
    with pytest.raises(ConfigError, match=r"^SINK='radio': choose one of file, speaker$"):
        env_choice("SINK", "file", modes, {"SINK": "radio"})


def test_env_pace():
    assert env_pace("PACE", env={}) == 1.0
    assert env_pace("PACE", "fast", env={}) == float("inf")
    assert [env_pace("PACE", env={"PACE": p}) for p in ("realtime", "2.5", "FAST")] == \
        [1.0, 2.5, float("inf")]
    with pytest.raises(ConfigError, match=r"^PACE='slow': use realtime, fast, or a speed-up "):
        env_pace("PACE", env={"PACE": "slow"})


def test_bad_settings_end_the_node_with_one_line_and_code_2(capsys):
    with pytest.raises(SystemExit) as ended:
        with exit_on_bad_settings("vad"):
            env_float("THRESHOLD", 0.5, {"THRESHOLD": "x"})
    assert ended.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == "vad: THRESHOLD='x' is not a number\n"
    assert captured.out == ""


def test_any_caller_mistake_while_reading_settings_ends_the_node(capsys):
    with pytest.raises(SystemExit) as ended:
        with exit_on_bad_settings("wav_source"):
            raise ContractError("voice input /nowhere does not exist")
    assert ended.value.code == 2
    assert capsys.readouterr().err == "wav_source: voice input /nowhere does not exist\n"


def test_good_settings_and_other_errors_pass_through(capsys):
    with exit_on_bad_settings("vad"):
        threshold = env_float("THRESHOLD", 0.5, {"THRESHOLD": "0.6"})
    assert threshold == 0.6
    with pytest.raises(RuntimeError, match="a bug"):  # not a setting: keeps its traceback
        with exit_on_bad_settings("vad"):
            raise RuntimeError("a bug")
    assert capsys.readouterr().err == ""


# --- the node programs themselves, outside dora: they read their settings before joining -----

@pytest.mark.parametrize("node, env, line", [
    ("vad.py", {"THRESHOLD": "x"}, "vad: THRESHOLD='x' is not a number"),
    ("vad.py", {"THRESHOLD": "1.5"}, "vad: THRESHOLD='1.5' must be at most 1"),
    ("robot_sim.py", {"FRAME_EVERY": "0"}, "robot_sim: FRAME_EVERY='0' must be at least 1"),
    ("sentence_splitter.py", {"MAX_CHARS": "lots"},
     "sentence_splitter: MAX_CHARS='lots' is not a whole number"),
    ("dialogue.py", {"REPLY_TIMEOUT_S": "-5"}, "dialogue: REPLY_TIMEOUT_S='-5' must be at least 0"),
    ("wav_sink.py", {"PLAYBACK": "slow"},
     "wav_sink: PLAYBACK='slow': choose one of instant, realtime"),
    ("wav_source.py", {"TURN_TAKING": "polite"},
     "wav_source: TURN_TAKING='polite': choose one of wait, free"),
    ("scheduler.py", {"TICK_S": "soon"}, "scheduler: TICK_S='soon' is not a number"),
    ("omni_node.py", {"REQUEST_TIMEOUT_S": "never"},
     "omni-node: REQUEST_TIMEOUT_S='never' is not a number"),
    ("gateway.py", {"MAX_BODY_BYTES": "abc"},
     "gateway: MAX_BODY_BYTES='abc' is not a whole number"),
])
def test_a_node_with_a_bad_setting_says_so_in_one_line(node: str, env: dict[str, str], line: str):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DORA_")}
    result = subprocess.run([sys.executable, str(NODES / node)], env={**clean, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [line], result.stderr[-3000:]
