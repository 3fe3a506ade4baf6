"""Pictures and video clips that clients send inline (``data:`` URLs of PNG or JPEG; MP4 or
WebM) as uint8 arrays (HWC; a clip (T, H, W, 3) and its frame rate).

The server never fetches a URL on a client's behalf: a picture must travel in the request.
Its size is read from the file's header and checked before any pixel is decoded, so an
oversized picture (or a decompression bomb) costs nothing; a clip's frames are counted as
they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps

from mofa_omni.contract.errors import ContractError
from mofa_omni.contract.tasks import validate_image

MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg")
FORMATS = ("PNG", "JPEG")


VIDEO_MEDIA_TYPES = ("video/mp4", "video/webm", "video/quicktime")


def picture_from_url(url: str, what: str, max_pixels: int) -> np.ndarray:
    """The picture of a ``data:image/png;base64,...`` (or JPEG) URL: uint8, HWC, 1, 3 or 4
    channels. ``what`` names the picture in errors; more than ``max_pixels`` is refused."""
    data = _data_of(url, what, MEDIA_TYPES, "pictures are read as image/png or image/jpeg",
                    "image", "picture")
    return decode_picture(data, what, max_pixels)


def clip_from_url(url: str, what: str, max_pixels: int, max_frames: int
                  ) -> tuple[np.ndarray, float]:
    """The frames (uint8 (T, H, W, 3)) and frame rate of a ``data:video/mp4;base64,...`` (or
    WebM) URL; a frame over ``max_pixels``, or more than ``max_frames`` frames, is refused."""
    from mofa_omni.media.video import read_mp4

    data = _data_of(url, what, VIDEO_MEDIA_TYPES, "clips are read as video/mp4 or video/webm",
                    "video", "clip")
    try:
        return read_mp4(data, max_frames=max_frames, max_pixels=max_pixels)
    except ContractError as error:
        raise ContractError(f"{what}: {error}") from None


def _data_of(url: str, what: str, media_types: tuple[str, ...], accepted: str, kind: str,
             noun: str) -> bytes:
    """The bytes of a base64 data URL of one of ``media_types`` (an ``image`` or a ``video``:
    ``kind``; a ``noun`` to the user); a ContractError naming ``what`` for a web address
    (never fetched) or anything malformed."""
    example = f"data:{media_types[0]};base64,..."
    if url[:8].lower().startswith(("http://", "https://")):
        raise ContractError(f"{what}: this server does not fetch {kind} URLs; send the {noun} "
                            f"inline as a data URL ({example})")
    if not url[:5].lower() == "data:":
        raise ContractError(f"{what}: expected a data URL ({example}), got {url[:24]!r}")
    header, comma, payload = url.partition(",")
    if not comma:
        raise ContractError(f"{what}: the data URL has no ',' before its data")
    media_type, *parameters = header[5:].split(";")
    if media_type.strip().lower() not in media_types:
        raise ContractError(f"{what}: {accepted}, got {media_type.strip() or 'no media type'!r}")
    if "base64" not in (p.strip().lower() for p in parameters):
        raise ContractError(f"{what}: the data URL must be base64-encoded (;base64,)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ContractError(f"{what}: the base64 data is malformed ({error})") from None


def decode_picture(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    """A PNG or JPEG file's pixels (uint8 HWC; EXIF rotation applied); a ContractError naming
    ``what`` for anything else, or for more than ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            # Our own limit is checked next; Pillow's bomb warning would only add noise.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            picture = PIL.Image.open(io.BytesIO(data), formats=FORMATS)
    except PIL.Image.DecompressionBombError as error:
        raise ContractError(f"{what}: the picture is too large ({error})") from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ContractError(f"{what}: not a PNG or JPEG picture") from None
    with picture:
        width, height = picture.size
        if width * height > max_pixels:
            raise ContractError(f"{what}: the picture is {width}x{height} ({width * height} "
                                f"pixels), over this server's limit of {max_pixels} pixels")
        try:
            pixels = _pixels(PIL.ImageOps.exif_transpose(picture))
        except (OSError, SyntaxError, ValueError) as error:
            raise ContractError(f"{what}: the {picture.format} data could not be decoded "
                                f"({error})") from None
    return validate_image(pixels, what=what)


def _pixels(picture: PIL.Image.Image) -> np.ndarray:
    """uint8 HWC with 1 (grey), 3 (RGB) or 4 (RGBA) channels, whatever the file's mode."""
    mode = picture.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey PNG: keep the high byte
        return np.ascontiguousarray((np.asarray(picture).astype(np.uint32) >> 8)
                                    .clip(0, 255).astype(np.uint8)[..., None])
    if mode == "P":
        picture = picture.convert("RGBA" if "transparency" in picture.info else "RGB")
    elif mode == "LA" or mode == "PA":
        picture = picture.convert("RGBA")
    elif mode == "1":
        picture = picture.convert("L")
    elif mode not in ("L", "RGB", "RGBA"):  # CMYK and YCbCr JPEGs, RGBX...
        picture = picture.convert("RGB")
    pixels = np.asarray(picture, dtype=np.uint8)
    return np.ascontiguousarray(pixels[..., None] if pixels.ndim == 2 else pixels)
