"""PNG files from uint8 HWC frames, with the standard library only (for saved camera views)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from mofa_omni.contract.tasks import validate_image

_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def png_bytes(pixels: np.ndarray) -> bytes:
    """The PNG encoding of ``pixels`` (uint8, HWC with 1, 3 or 4 channels)."""
    pixels = validate_image(pixels)
    height, width, channels = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8),  # filter type 0 per row
                           pixels.reshape(height, width * channels)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))
