"""microphone: captures the default input device as a stream of ~100 ms AudioChunks.

Configuration (env in the dataflow YAML):
    DEVICE      input device, a name or an index (default: the system's default input)
    RATE        capture rate in Hz (default: the device's own rate; the VAD node resamples)
    CHUNK_MS    length of one chunk (default 100)
    REQUEST_ID  the stream's request id (default mic)

Outputs:
    audio   AudioChunk stream (float32 mono), request_id REQUEST_ID, seq 0, 1, ...; never final;
            origin_ns = when the chunk's first sample was captured.

Needs sounddevice (PortAudio). Without it, or without an input device, the node exits with
code 2 and one line saying what to install or what is missing.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time

import numpy as np

from mofa_omni.config import env_float, env_int, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.tasks import AudioChunk
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode
from mofa_omni.voice.events import load_sounddevice

log = logging.getLogger("microphone")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("microphone"):
        sd = load_sounddevice()
        device = env_str("DEVICE", "") or None
        if device is not None and device.isdigit():
            device = int(device)
        chunk_ms = env_float("CHUNK_MS", 100, minimum=1)
        request_id = env_str("REQUEST_ID", "mic")
        rate = env_int("RATE", 0)
    try:
        info = sd.query_devices(device, kind="input")
        rate = rate or int(info["default_samplerate"])
    except (ValueError, sd.PortAudioError) as error:
        print(f"microphone: no audio input device ({error})", file=sys.stderr)
        return 2

    node = CheckedNode()
    blocks: queue.Queue[tuple[int, np.ndarray]] = queue.Queue()
    stopping = threading.Event()

    def captured(indata, frames, _time_info, status) -> None:  # PortAudio's thread
        if status:
            log.warning("capture: %s", status)
        blocks.put((time.time_ns() - round(frames * 1e9 / rate), indata[:, 0].copy()))

    def forward() -> None:  # sends from its own thread while the main thread waits for STOP
        seq = 0
        while not stopping.is_set() or not blocks.empty():
            try:
                origin, audio = blocks.get(timeout=0.2)
            except queue.Empty:
                continue
            node.send_output("audio", arrow.encode(AudioChunk(audio, rate)),
                             MessageMeta(request_id, seq, False, origin, time.time_ns()).to_dora())
            seq += 1

    sender = threading.Thread(target=forward, daemon=True)
    try:
        stream = sd.InputStream(device=device, samplerate=rate, channels=1, dtype="float32",
                                blocksize=max(1, round(rate * chunk_ms / 1000)), callback=captured)
    except sd.PortAudioError as error:
        print(f"microphone: cannot open {info['name']!r} at {rate} Hz ({error})", file=sys.stderr)
        return 2
    log.info("capturing %s at %d Hz", info["name"], rate)
    with stream:
        sender.start()
        for event in node:
            if event["type"] == "STOP":
                break
    stopping.set()
    sender.join(timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
