"""Whisper's input features in NumPy: the log-mel spectrogram of a 30 s window.

The same numbers as whisper's reference code (and mlx_whisper's, which runs it on MLX): a
400-point Hann-windowed STFT every 160 samples of 16 kHz audio, reflect-padded, the power
spectrum through 80 (or 128) Slaney-style mel filters, log10, clamped to 8 below the maximum,
scaled. NumPy's FFT does it in ~20 ms on a CPU where MLX's CPU backend takes ~80 ms (and
~1.8 s for its first call in a process).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
WINDOW_SAMPLES = 30 * SAMPLE_RATE


@lru_cache(maxsize=2)
def mel_filters(n_mels: int = 80) -> np.ndarray:
    """(n_mels, N_FFT // 2 + 1) Slaney mel filterbank, area-normalised (librosa's default,
    which whisper's filters were made with)."""
    def hz_to_mel(hz):
        hz = np.asarray(hz, np.float64)
        linear = hz / (200.0 / 3)
        log_region = hz >= 1000.0
        return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0)
                        / (np.log(6.4) / 27.0), linear)

    def mel_to_hz(mel):
        mel = np.asarray(mel, np.float64)
        linear = mel * (200.0 / 3)
        return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), linear)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:] - mel_points[:-2]))[:, None]
    return weights.astype(np.float32)


def log_mel(window: np.ndarray, n_mels: int = 80, samples: int = WINDOW_SAMPLES) -> np.ndarray:
    """(n_mels, samples // 160) features of up to ``samples`` (30 s) of 16 kHz mono float32
    audio, zero-padded to that length."""
    audio = np.zeros(samples, np.float32)
    audio[:min(len(window), samples)] = window[:samples]
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
    hann = np.hanning(N_FFT + 1)[:-1].astype(np.float32)
    spectrum = np.fft.rfft(frames * hann, axis=-1)[:-1]
    power = spectrum.real ** 2 + spectrum.imag ** 2
    log_spec = np.log10(np.maximum(power @ mel_filters(n_mels).T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return np.ascontiguousarray(((log_spec + 4.0) / 4.0).T, dtype=np.float32)
