"""dialogue: the voice agent's conversation — history, system prompt, turn-taking, barge-in.

Configuration (env in the dataflow YAML):
    SYSTEM_PROMPT   the assistant's instructions (default: a brief voice assistant, one
                    short sentence; benchmarks/voice_quality.py compares others)
    MAX_TOKENS      longest reply in tokens (default 96)
    MAX_HISTORY     messages of the conversation the LLM sees, the question included (default 16)
    REPLY_TIMEOUT_S a reply not spoken this long after the question is cancelled and reported
                    as a timeout, so a lost message never stalls the conversation (default 180)
    VOICE_OUTPUT    folder where transcript.txt is written (default: out/voice of this checkout)
    VOICE           an omni model's voice (default: its first)
    OMNI_RETRY_S    with a cascade (below): how long turns go to it once the omni model could
                    not serve, before the omni model is tried again (default 60)
    SPECULATE       "true": ask the words of a pause (the ASR's transcript of the VAD's pause
                    snapshot, see its TRANSCRIBE_ON_PAUSE) at once as a held reply, released
                    to the sink if the utterance ends with them, else cancelled (default
                    false; needs `hearing`, and `release` wired to a sink that holds replies)

Inputs:
    transcript      Transcript of an utterance (an ASR node's `result`); partial ones of an
                    utterance still spoken (`final: false`, see the VAD's PARTIAL_EVERY_MS) are
                    logged as they come
    utterance       or the utterance itself (a VAD's `utterance`), for an omni model that
                    hears: it is asked as an OmniRequest to answer aloud (dataflows/voice.omni.yml)
    asr_error       ErrorReport of the ASR: that utterance gets no reply (the transcript says why)
    hearing         optional, the VAD's `utterance` as it goes to the ASR (its snapshots are
                    skipped): the turn waits for
                    its words; if the ASR node crashes (or the words do not come within
                    REPLY_TIMEOUT_S) the turn ends with the reason instead of stalling
    speech_started  the VAD heard the user begin to speak: barge in on a running reply
    reply           TextChunk stream of the LLM (an omni model's AudioChunks there are the
                    sink's: skipped)
    llm_error       ErrorReport of the LLM
    tts_error       ErrorReport of the TTS
    spoken          the sink's `done`: a reply's audio is complete
    control         optional, a Realtime node's `control` (mofa_omni.voice.events `voice.*`): a
                    client's session opened (a new conversation, its instructions and reply
                    settings) or closed (its reply stops; what is heard until the next one gets
                    no reply), its response.cancel, the part of a reply it played
    cascade_reply   optional, with `hear` and `cascade_chat`: the cascade's LLM `result` (an omni
                    graph's stand-in ASR + LLM + TTS, for when the omni model cannot serve:
                    refused memory, not loaded in time, crashed; dataflows/voice.omni.yml)
    cascade_error   the cascade LLM's `error`
    status          optional, the scheduler's `status`: the delivery reports of the model nodes
                    reading `chat`, `hear` and `cascade_chat`. A question (or an utterance for
                    the cascade's ASR) a report shows never arrived (dora dropped it; the last
                    one sent shows no gap) is sent again, up to twice, then the reply (or turn)
                    ends in an error, in seconds rather than after REPLY_TIMEOUT_S. A node we
                    wait for on a machine the scheduler lost (its nodes fell silent) ends the
                    reply (or the turns it was hearing) with that reason, as a crash would

The node ends once `utterance` (or, without it, `transcript`) is closed (no more turns) and
the last reply is over.

Outputs:
    chat        ChatRequest (OmniRequest for an utterance) with the whole conversation,
                request_id `reply-N`, origin_ns = when the user stopped speaking
    cancel      request ids to stop (connect it to the LLM, splitter, TTS and sink `cancel`)
    turn_done   the reply to a turn is over (connect it to wav_source's `ready` to take turns)
    hear        optional (the cascade): an utterance the omni model could not serve, for the
                cascade's ASR (TranscriptionRequest, request_id = the turn); its words come back
                on `transcript`
    cascade_chat  optional (the cascade): the ChatRequest of such a turn, for the cascade's LLM
    release     request ids of held replies that answer their turn after all (connect it to
                the sink's `release`; see SPECULATE)
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from mofa_omni.config import env_choice, env_float, env_int, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ContractError, ErrorKind
from mofa_omni.contract.tasks import (
    AudioChunk,
    ChatRequest,
    ErrorReport,
    TextChunk,
    Transcript,
    TranscriptionRequest,
)
from mofa_omni.node import trace
from mofa_omni.node.delivery import Awaiting
from mofa_omni.node.host import MessageMeta, dora_node_id
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.node.wiring import readers, source_node
from mofa_omni.scheduler.messages import Status, from_arrow
from mofa_omni.voice.dialogue import (
    HEARING_RATE,
    Action,
    Ask,
    Cancel,
    Dialogue,
    Hear,
    Release,
    TranscriptLine,
    TurnDone,
    out_of_reach,
)
from mofa_omni.voice.events import is_held, read_event, voice_output

log = logging.getLogger("dialogue")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("dialogue"):  # fail fast, before joining the graph
        dialogue = Dialogue(max_tokens=env_int("MAX_TOKENS", 96, minimum=1),
                            max_history=env_int("MAX_HISTORY", 16, minimum=1),
                            voice=env_str("VOICE", ""),
                            speculate=env_choice("SPECULATE", "false", ("true", "false")) == "true",
                            omni_retry_s=env_float("OMNI_RETRY_S", 60.0))
        reply_timeout = env_float("REPLY_TIMEOUT_S", 180)
        if prompt := env_str("SYSTEM_PROMPT", ""):
            dialogue.system_prompt = prompt
        out_dir = voice_output()
    node = CheckedNode()
    node_id = dora_node_id("dialogue")
    # the node whose `result` is our `transcript`: its crash leaves utterances unheard
    inputs = node.node_config().get("inputs") or {}
    dialogue.hearing_node = source_node(inputs.get("transcript", ""))
    outputs = set(node.node_config().get("outputs") or [])
    dialogue.cascade = {"hear", "cascade_chat"} <= outputs
    if dialogue.cascade:
        dialogue.omni_node = source_node(inputs.get("reply", ""))
    turns_input = "utterance" if "utterance" in inputs else "transcript"
    out_dir.mkdir(parents=True, exist_ok=True)
    transcript = (out_dir / "transcript.txt").open("w", buffering=1)
    descriptor = node.dataflow_descriptor()
    # who checks the delivery of what we send on each output (the omni model or the LLM on
    # `chat`, the cascade's ASR on `hear`, the cascade's LLM on `cascade_chat`)
    delivery_checks = {output: check for output in ("chat", "hear", "cascade_chat")
                       if (check := question_reader(descriptor, node_id, output))}
    # the nodes whose results we wait for: one on a lost machine will not answer
    path_nodes = {source_node(inputs[input_id]) for input_id in (
        "transcript", "reply", "llm_error", "tts_error", "spoken", "cascade_reply",
        "cascade_error") if input_id in inputs}
    asked: dict[str, Ask] = {}  # the question of the reply under way, to ask it again
    to_hear: dict[str, Hear] = {}  # the cascade's turns not heard yet, to send them again

    def ask(question: Ask) -> None:
        meta = MessageMeta(question.reply_id, 0, True, question.origin_ns, time.time_ns())
        to_cascade = dialogue.cascade and isinstance(question.request, ChatRequest)
        output = "cascade_chat" if to_cascade else "chat"
        seq = node.send_output(output, arrow.encode(question.request), meta.to_dora())
        trace.record(node_id, "send", output, meta)
        asked.clear()
        asked[question.reply_id] = question
        if output in delivery_checks:
            delivery_checks[output].sent(question.reply_id, seq, time.time_ns())

    def hear(turn: Hear) -> None:
        meta = MessageMeta(turn.turn_id, 0, True, turn.origin_ns, time.time_ns())
        seq = node.send_output("hear", arrow.encode(TranscriptionRequest(turn.audio,
                                                                         HEARING_RATE)),
                               meta.to_dora())
        to_hear[turn.turn_id] = turn
        if "hear" in delivery_checks:
            delivery_checks["hear"].sent(turn.turn_id, seq, time.time_ns())

    def answer_began(request_id: str) -> None:
        asked.pop(request_id, None)
        to_hear.pop(request_id, None)
        for questions in delivery_checks.values():
            questions.arrived(request_id)

    def check_delivery(value) -> list[Action]:
        """The model nodes' reports: ask again what one never received, or end that reply;
        a node of ours on a machine the scheduler lost: end what it was doing."""
        status = from_arrow(value)
        if not isinstance(status, Status):
            return []
        actions: list[Action] = []
        for gone, why in out_of_reach(status, path_nodes).items():
            if ended := dialogue.node_crashed(gone, time.time_ns(), time.monotonic(), why=why):
                log.error("%s", why)
                actions += ended
        for output, questions in delivery_checks.items():
            report = next((n for n in status.nodes if n.node == questions.node), None)
            heard = output == "hear"
            pending, what = (to_hear, "the utterance") if heard else (asked, "the question")
            for lost in questions.check(report.delivery) if report else []:
                if lost.request_id not in pending:
                    continue  # that turn or reply is over
                if lost.again:
                    log.warning("%s: %s never received %s (dora dropped it): %s again",
                                lost.request_id, questions.node, what,
                                "sent" if heard else "asked")
                    (hear if heard else ask)(pending[lost.request_id])
                    continue
                answer_began(lost.request_id)
                why = f"lost: {questions.node} never received {what}, sent " \
                      f"{1 + questions.resends} times"
                actions += dialogue.not_heard(lost.request_id, why) if heard else \
                    dialogue.reply_failed(lost.request_id, why)
        return actions

    def act(actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Ask() as question:
                    if is_held(question.reply_id):
                        log.info("%s: the words of the pause asked as %s",
                                 question.request.messages[-1].content, question.reply_id)
                    ask(question)
                case Hear() as turn:
                    log.warning("%s: the cascade hears it (%s cannot serve; tried again in "
                                "%g s)", turn.turn_id, dialogue.omni_node, dialogue.omni_retry_s)
                    hear(turn)
                case Cancel(reply_id):
                    answer_began(reply_id)
                    if is_held(reply_id):
                        log.info("%s cancelled", reply_id)  # the utterance went on, or a barge-in
                    node.send_output("cancel", pa.array([reply_id]), {"request_id": reply_id})
                case Release(reply_id):
                    log.info("%s released: the utterance ended with its words", reply_id)
                    node.send_output("release", pa.array([reply_id]), {"request_id": reply_id})
                case TurnDone(turn_id):
                    node.send_output("turn_done", pa.array([turn_id]), {"request_id": turn_id})
                case TranscriptLine() as line:
                    log.info("%s", line.render())
                    transcript.write(line.render() + "\n")

    def heard_sound(meta: MessageMeta, utterance: TranscriptionRequest) -> list[Action]:
        if not meta.final:  # a snapshot of speech under way: the utterance follows
            return []
        return dialogue.heard_sound(meta.request_id, utterance.audio, utterance.sample_rate,
                                    meta.origin_ns, time.monotonic())

    def reply(meta: MessageMeta, chunk: TextChunk | AudioChunk) -> list[Action]:
        answer_began(meta.request_id)
        if isinstance(chunk, AudioChunk):  # an omni model speaking: the sink's to play
            return []
        return dialogue.reply_text(meta.request_id, chunk.text, chunk.final)

    def llm_failed(meta: MessageMeta, error: ErrorReport) -> list[Action]:
        answer_began(meta.request_id)
        return dialogue.reply_failed(meta.request_id, error.summary(), time.monotonic(),
                                     error.kind in (ErrorKind.UNAVAILABLE, ErrorKind.TIMEOUT))

    def not_heard(meta: MessageMeta, error: ErrorReport) -> list[Action]:
        answer_began(meta.request_id)
        return dialogue.not_heard(meta.request_id, error.summary())

    pauses: dict[str, int] = {}  # turn -> origin_ns of its last pause snapshot

    def pause_snapshot(meta: MessageMeta, metadata: dict) -> None:
        """The VAD sent a snapshot of ``meta.request_id``: note when it is its pause's."""
        if metadata.get("pause"):
            pauses[meta.request_id] = meta.origin_ns
            while len(pauses) > 64:
                pauses.pop(next(iter(pauses)))

    def heard(meta: MessageMeta, transcript: Transcript) -> list[Action]:
        answer_began(meta.request_id)  # a turn the cascade hears: its words came
        if not meta.final:  # words of an utterance still spoken
            words = transcript.text.split()
            settled, rest = words[:transcript.settled_words], words[transcript.settled_words:]
            log.info("%s so far: %s", meta.request_id,
                     " | ".join(" ".join(part) for part in (settled, rest) if part))
            if pauses.get(meta.request_id) == meta.origin_ns:  # the words of a pause
                return dialogue.heard_pause(meta.request_id, transcript.text, meta.origin_ns,
                                            time.monotonic())
            return []
        return dialogue.heard(meta.request_id, transcript.text, meta.origin_ns, time.monotonic())

    handlers = {
        "transcript": lambda meta, value: heard(meta, arrow.decode(value, Transcript)),
        "utterance": lambda meta, value: heard_sound(meta, arrow.decode(value,
                                                                       TranscriptionRequest)),
        "asr_error": lambda meta, value: not_heard(meta, arrow.decode(value, ErrorReport)),
        "hearing": lambda meta, value: dialogue.sent_to_be_heard(
            meta.request_id, time.monotonic(), meta.sent_ns) if meta.final else [],
        "speech_started": lambda meta, value: dialogue.speech_started(),
        "reply": lambda meta, value: reply(meta, arrow.decode_one_of(value,
                                                                     (TextChunk, AudioChunk))),
        "llm_error": lambda meta, value: llm_failed(meta, arrow.decode(value, ErrorReport)),
        "cascade_reply": lambda meta, value: reply(meta, arrow.decode(value, TextChunk)),
        "cascade_error": lambda meta, value: dialogue.reply_failed(
            meta.request_id, arrow.decode(value, ErrorReport).summary()),
        "tts_error": lambda meta, value: dialogue.speech_failed(
            meta.request_id, arrow.decode(value, ErrorReport).summary()),
        "spoken": lambda meta, value: dialogue.spoken(meta.request_id),
        "status": lambda meta, value: check_delivery(value),
        "control": lambda meta, value: dialogue.control(*read_event(value)),
    }
    heard_all = False  # the ASR's stream ended: no more turns will come
    while (event := node.next(timeout=1.0)) is not None:
        act(dialogue.expire(time.monotonic(), reply_timeout))
        if event["type"] == "INPUT_CLOSED" and event["id"] == turns_input:
            heard_all = True
        elif event["type"] in ("NODE_RESTARTED", "NODE_FAILED"):  # see dora's restart_policy
            log.error("%s crashed%s", event["id"],
                      "" if event["type"] == "NODE_FAILED" else ": dora restarts it")
            act(dialogue.node_crashed(event["id"], time.time_ns(), time.monotonic()))
        elif event["type"] == "INPUT" and event["id"] in handlers:
            meta = MessageMeta.from_dora(event.get("metadata"), event["id"])
            if event["id"] == "hearing" and not meta.final:
                pause_snapshot(meta, event.get("metadata") or {})
            if event["id"] in ("transcript", "utterance", "reply", "cascade_reply", "spoken"):
                trace.record(node_id, "recv", event["id"], event.get("metadata"))
            try:
                act(handlers[event["id"]](meta, event["value"]))
            except ContractError as error:
                log.error("%s %s: %s", event["id"], meta.request_id, error)
        # The graph has a cycle (dialogue -> llm -> dialogue): ending here, once the last
        # reply is over, closes the cycle's inputs so every node downstream finishes too.
        # (A turn sent to the cascade's ASR still has its words to come.)
        if heard_all and dialogue.active is None and \
                not (turns_input == "utterance" and dialogue.transcribing):
            break
    transcript.close()



def question_reader(descriptor: dict, node_id: str, output: str) -> Awaiting | None:
    """What checks the delivery of our questions on ``output``: the one model node input that
    reads it (None if none or several do)."""
    found = readers(descriptor, f"{node_id}/{output}")
    return Awaiting(*found[0]) if len(found) == 1 else None


if __name__ == "__main__":
    main()
