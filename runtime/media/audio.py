"""WAV files and resampling for float32 mono PCM, the contract's audio type."""

from __future__ import annotations

import io
import struct
import wave
from math import gcd
from pathlib import Path

import numpy as np

from mofa_omni.contract.errors import ContractError

_SAMPLE_TYPES = {1: (np.uint8, 128.0, 128.0), 2: (np.int16, 0.0, 32768.0), 4: (np.int32, 0.0, 2**31)}


def read_wav(path: str | Path | bytes, name: str = "") -> tuple[np.ndarray, int]:
    """Read a PCM WAV file (a path, or its bytes) as float32 mono in [-1, 1] (channels are
    averaged) and its rate. ``name`` names bytes in errors."""
    source = io.BytesIO(path) if isinstance(path, bytes) else str(path)
    path = name or ("the WAV bytes" if isinstance(path, bytes) else path)
    try:
        with wave.open(source, "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, RuntimeError, ValueError, struct.error) as error:
        # the standard library's reader raises RuntimeError, ValueError or struct.error for
        # some malformed chunk sizes (found by tests/test_fuzz.py)
        raise ContractError(f"{path}: not a PCM WAV file ({error or type(error).__name__})") \
            from None
    except OSError as error:
        raise ContractError(f"{path}: cannot be read ({error.strerror or error})") from None
    if width not in _SAMPLE_TYPES:
        raise ContractError(f"{path}: {8 * width}-bit WAV samples are not supported")
    dtype, offset, scale = _SAMPLE_TYPES[width]
    if len(frames) % (width * channels):
        raise ContractError(f"{path}: ends in the middle of a sample frame (truncated file)")
    samples = (np.frombuffer(frames, dtype).astype(np.float32) - offset) / scale
    return samples.reshape(-1, channels).mean(axis=1, dtype=np.float32), rate


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float32 mono PCM as a 16-bit WAV file."""
    Path(path).write_bytes(wav_bytes(audio, sample_rate))


def pcm16(audio: np.ndarray) -> bytes:
    """float32 PCM as 16-bit little-endian samples."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """float32 mono PCM as the bytes of a 16-bit WAV file."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(pcm16(audio))
    return out.getvalue()


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) to ``target_rate``; float32 in, float32 out."""
    if rate == target_rate:
        return audio
    from scipy.signal import resample_poly

    divisor = gcd(int(rate), int(target_rate))
    return resample_poly(audio, target_rate // divisor, rate // divisor).astype(np.float32)
