"""dataflows/voice.yml end to end, with real models: answers, context, barge-in, bad input."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mofa_omni.contract.tasks import TranscriptionRequest
from mofa_omni.media.audio import read_wav, resample, write_wav
from mofa_omni.media.text import normalize_words, word_error_rate
from tests.dataflow_run import finish, node_process, start_dataflow
from tests.test_dataflow_models import run_dataflow

VOICE = Path(__file__).parents[1] / "dataflows" / "voice.yml"
pytestmark = pytest.mark.slow


def run_voice(tmp_path: Path, turns: dict[str, np.ndarray | bytes], *,
              vad: dict[str, str] | None = None, **env: str):
    """Run the voice graph on WAV turns (with ``vad`` added to the VAD node's settings);
    returns (transcript lines, reply WAV paths, log)."""
    from mofa_omni.launch import dataflows

    graph = VOICE
    if vad:
        graph = tmp_path / "voice.yml"
        graph.write_text(dataflows.dump(dataflows.with_env(dataflows.load(VOICE), "vad", **vad)))
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, audio in turns.items():
        if isinstance(audio, bytes):
            (inputs / name).write_bytes(audio)
        else:
            write_wav(inputs / name, audio, 16000)
    log = run_dataflow(graph, {"VOICE_INPUT": str(inputs), "VOICE_OUTPUT": str(outputs), **env})
    lines = (outputs / "transcript.txt").read_text().splitlines()
    return lines, sorted(outputs.glob("reply-*.wav")), log


def test_a_spoken_question_gets_a_relevant_spoken_answer(tmp_path, speak, model):
    lines, replies, log = run_voice(tmp_path, {"01.wav": speak("What is the capital of France?")})
    assert lines[0] == "user: What is the capital of France?", lines
    assert lines[1].startswith("assistant: ") and "[" not in lines[1], lines
    assert len(replies) == 1
    audio, rate = read_wav(replies[0])
    assert len(audio) / rate > 0.5
    heard = model("whisper-tiny.en").transcribe(TranscriptionRequest(audio, rate)).text
    said = lines[1].removeprefix("assistant: ")
    # The WAV speaks the reply. Piper samples noise on every synthesis, and whisper tiny hears
    # SmolLM2's "The capital of France is Paris." as "the capital of Francis Paris." (WER 0.33;
    # the former prompt's "Le Grand Paris is ..." measured 0 to 0.5 over repeated syntheses);
    # another sentence would be near 1.
    assert word_error_rate(said, heard) <= 0.5, (said, heard)
    assert "paris" in normalize_words(said), said  # the answer is right
    assert {"capital", "paris"} <= set(normalize_words(heard)), heard  # and it is what is heard
    # the question was transcribed while it was spoken (voice.yml's VAD sends snapshots)
    assert "utt-1 so far: " in log, log[-3000:]


def test_a_question_dora_dropped_is_asked_again_and_answered(tmp_path, speak):
    """The dialogue's first question never reaches the LLM (dropped as dora drops messages:
    DROP_MESSAGES keeps its stream number). It was the last message sent, so no gap shows it:
    the LLM's delivery report in the scheduler's status does, and the question is asked again
    within seconds, instead of the turn waiting out its reply timeout."""
    started = time.monotonic()
    lines, replies, log = run_voice(tmp_path, {"01.wav": speak("What is the capital of France?")},
                                    DROP_MESSAGES="chat:0", REPLY_TIMEOUT_S="120")
    # the question is reply-1, or reply-1~held where the pause's words were asked at once
    assert re.search(r"reply-1(~held)?: llm never received the question \(dora dropped it\): "
                     r"asked again", log), log[-3000:]
    assert lines[0] == "user: What is the capital of France?", lines
    assert lines[1].startswith("assistant: ") and "paris" in lines[1].lower(), lines
    assert len(replies) == 1 and time.monotonic() - started < 100


def test_the_second_turn_knows_the_first(tmp_path, speak):
    """Also with the turn ended sooner when the voice and the words say it is over (the
    settings voice.yml leaves commented out): both judges are heard on each pause."""
    lines, replies, log = run_voice(tmp_path, {
        "01.wav": speak("I have a dog named Max."),
        "02.wav": speak("What is my dog's name?"),
    }, vad={"TURN_MODEL": "smart-turn-v3", "COMPLETE_SILENCE_MS": "200"})
    users = [line for line in lines if line.startswith("user: ")]
    answers = [line for line in lines if line.startswith("assistant: ")]
    assert len(users) == 2 and len(answers) == 2 and len(replies) == 2, lines
    # Only the first turn said so. (SmolLM2-135M answers this one on every backend; asked where
    # the user lives after "I live in Paris" it drifts into French or "I'm not sure".)
    assert re.search(r"\bmax\b", answers[1].lower()), lines
    for judge in ("audio", "words"):
        assert re.search(rf"utt-2: {judge} says the turn (is over|goes on)", log), log[-3000:]


def test_talking_over_the_agent_interrupts_its_reply(tmp_path, speak):
    story = np.concatenate([speak("Tell me a long story about a dragon and a princess."),
                            np.zeros(16000 * 6, np.float32)])  # keep talking 6 s later
    lines, replies, _ = run_voice(
        tmp_path, {"01.wav": story, "02.wav": speak("Stop. What is the capital of France?")},
        TURN_TAKING="free")
    interrupted = [line for line in lines if line.endswith("[interrupted]")]
    assert len(interrupted) == 1 and interrupted[0].startswith("assistant: "), lines
    assert lines.index(interrupted[0]) < lines.index("user: Stop. What is the capital of France?")
    final_answer = lines[-1]
    assert final_answer.startswith("assistant: ") and "[" not in final_answer, lines
    assert len(replies) == 2  # the interrupted reply's audio is kept up to where it stopped


def test_odd_and_broken_input_is_converted_or_skipped(tmp_path, speak):
    question = speak("What is the capital of France?")
    stereo_48k = np.repeat(resample(question, 16000, 48000)[:, None], 2, axis=1)
    turns = {"01-empty.wav": b"RIFF\x24\x00\x00\x00WAVEfmt ", "02-silence.wav": np.zeros(32000, np.float32),
             "04-mono.wav": question}
    inputs = tmp_path / "stereo"
    inputs.mkdir()
    _write_int16(inputs / "03-stereo-48k.wav", stereo_48k, 48000)
    turns["03-stereo-48k.wav"] = (inputs / "03-stereo-48k.wav").read_bytes()
    # The silent turn gets no reply, so the source waits READY_TIMEOUT_S before the next one;
    # the same bound cuts a reply short if it takes longer (seen at 6 s on a loaded machine).
    lines, replies, log = run_voice(tmp_path, turns, READY_TIMEOUT_S="15")
    users = [line for line in lines if line.startswith("user: ")]
    assert users == ["user: What is the capital of France?"] * 2, lines
    assert len(replies) == 2
    assert "01-empty.wav" in log  # reported, and the graph went on


def test_a_model_that_cannot_load_answers_with_errors_and_the_graph_goes_on(tmp_path, speak):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[defaults]\ntext_generation = "broken-llm"\n[models.broken-llm]\n'
                       f'adapter = "mlx_lm"\ntasks = ["text_generation"]\nformat = "gguf"\n'
                       f'source = {{ path = "{broken}" }}\n')
    lines, replies, _ = run_voice(tmp_path, {"01.wav": speak("Hello there."),
                                             "02.wav": speak("Are you still there?")},
                                  MOFA_OMNI_CATALOG=str(catalog))
    errors = [line for line in lines if "[error: unavailable:" in line]
    assert len(errors) == 2 and "broken-llm" in errors[0], lines
    assert replies == []


def test_a_killed_asr_ends_the_turn_it_was_hearing_and_the_next_turn_is_answered(tmp_path, speak):
    """kill -9 of the ASR node while it transcribes (an out-of-memory kill, a segfault): the turn
    ends at once in an error line, dora restarts the node (voice.yml's restart_policy), the
    restarted node reloads its model and hears the next turn, which is answered."""
    from mofa_omni.launch import dataflows

    question = speak("What is the capital of France?")
    catalog = tmp_path / "catalog.toml"  # whisper-base: ~1 s a window here, time to kill it
    catalog.write_text('[defaults]\nspeech_recognition = "whisper-base"\n')
    inputs, outputs, trace_file = tmp_path / "in", tmp_path / "out", tmp_path / "trace.jsonl"
    inputs.mkdir()
    write_wav(inputs / "01.wav", question, 16000)
    write_wav(inputs / "02.wav", question, 16000)
    # The whole utterance is what the ASR transcribes when killed: no snapshots before it (a
    # kill while it transcribes a snapshot loses only that; the utterance goes to the restarted
    # node and is answered)
    whole = tmp_path / "voice.whole.yml"
    whole.write_text(dataflows.dump(dataflows.with_env(
        dataflows.load(VOICE), "vad", PARTIAL_EVERY_MS="0", TRANSCRIBE_ON_PAUSE="false")))
    process = start_dataflow(whole, {"VOICE_INPUT": str(inputs), "VOICE_OUTPUT": str(outputs),
                                     "MOFA_OMNI_CATALOG": str(catalog),
                                     "MOFA_OMNI_TRACE": str(trace_file)})
    try:
        deadline = time.monotonic() + 120
        while not asr_started(trace_file):  # the node's own trace: it began transcribing
            assert process.poll() is None and time.monotonic() < deadline, "never transcribing"
            time.sleep(0.02)
        node_process(process.pid, "asr").kill()
        log = finish(process, timeout=300)
    finally:
        process.kill()
    lines = (outputs / "transcript.txt").read_text().splitlines()
    assert lines[0] == "user:  [error: asr crashed: not heard]", (lines, log[-3000:])
    assert lines[1] == "user: What is the capital of France?", lines
    assert lines[2].startswith("assistant: ") and "paris" in lines[2].lower(), lines
    assert "asr crashed: dora restarts it" in log


def asr_started(trace_file: Path) -> bool:
    """Whether the ASR node's trace says it began serving a request."""
    if not trace_file.exists():
        return False
    return any('"node": "asr"' in line and '"event": "start"' in line
               for line in trace_file.read_text().splitlines())


def _write_int16(path: Path, audio: np.ndarray, rate: int) -> None:
    import wave

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(audio.shape[1])
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def test_the_sample_turns_run_under_a_coordinator(tmp_path):
    """`dora up && dora start dataflows/voice.yml --attach` on the checkout's own samples."""
    outputs = tmp_path / "out"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "DORA_COORDINATOR_PORT": str(_free_port())}
    dora = str(bin_dir / "dora")
    subprocess.run([dora, "up"], env=env, check=True, capture_output=True, timeout=60)
    try:
        started = subprocess.run([dora, "start", str(VOICE), "--attach",
                                  "--env", f"VOICE_OUTPUT={outputs}"],
                                 env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, (started.stdout + started.stderr)[-4000:]
    finally:
        subprocess.run([dora, "destroy"], env=env, capture_output=True, timeout=60)
    lines = (outputs / "transcript.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["user", "assistant"] * 2, lines
    assert len(list(outputs.glob("reply-*.wav"))) == 2
    # The demo answers right, in English (with the former prompt: "Le Grand Paris is ...").
    for answer, city in ((lines[1], "paris"), (lines[3], "rome")):
        words = set(normalize_words(answer))
        assert city in words and not words & {"le", "la", "il", "est", "di"}, lines


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_turn_whose_words_never_come_back_ends_and_the_next_is_answered(tmp_path, speak):
    """The ASR's first transcript is lost on the way (dropped on purpose, as dora drops one
    now and then; a crashed ASR leaves the dialogue the same way): that turn ends in an error
    line at the dialogue's deadline instead of stalling the conversation, and the next turn is
    heard and answered."""
    from mofa_omni.launch import dataflows

    graph = dataflows.with_env(dataflows.load(VOICE), "asr", DROP_MESSAGES="result:final:0")
    graph = dataflows.with_env(graph, "dialogue", REPLY_TIMEOUT_S="8")
    lossy = tmp_path / "voice.lossy.yml"
    lossy.write_text(dataflows.dump(graph))
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    write_wav(inputs / "01.wav", speak("What is the capital of France?"), 16000)
    write_wav(inputs / "02.wav", speak("What is the capital of Italy?"), 16000)
    run_dataflow(lossy, {"VOICE_INPUT": str(inputs), "VOICE_OUTPUT": str(outputs)})
    lines = (outputs / "transcript.txt").read_text().splitlines()
    assert lines[0] == "user:  [error: timeout: not heard in 8 s]", lines
    assert lines[1] == "user: What is the capital of Italy?", lines
    assert lines[2].startswith("assistant: ") and "[" not in lines[2], lines


def voiced(audio: np.ndarray) -> np.ndarray:
    """``audio`` without the silence before and after the voice (louder than 2 % of its peak)."""
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[loud[0]:loud[-1] + 1]


def test_a_pause_inside_a_sentence_does_not_end_the_turn(tmp_path, speak):
    """450 ms of silence mid-sentence, where the VAD waits for 600 ms: one turn, one reply. A
    reply asked on the words before the pause (held: voice.yml's SPECULATE) is cancelled when
    the sentence goes on, and never heard; the one asked on the whole sentence is released."""
    pause = np.zeros(int(16000 * 0.45), np.float32)
    sentence = np.concatenate([voiced(speak("What is the capital")), pause,
                               voiced(speak("of France?"))])
    lines, replies, log = run_voice(tmp_path, {"01.wav": sentence})
    users = [line for line in lines if line.startswith("user: ")]
    assert len(users) == 1 and {"capital", "france"} <= set(normalize_words(users[0])), lines
    assert sum(line.startswith("assistant: ") for line in lines) == 1 and len(replies) == 1
    held = re.findall(r"the words of the pause asked as (reply-\d+~held)", log)
    # Under load the ASR may skip a pause snapshot that a newer message overtook: then that
    # pause asked nothing held. Whatever was asked held is released (the whole sentence's
    # words, last) or cancelled, never both, and nothing but the last is released.
    for reply_id in held:
        released, cancelled = f"{reply_id} released" in log, f"{reply_id} cancelled" in log
        assert released != cancelled and (not released or reply_id == held[-1]), log[-3000:]
