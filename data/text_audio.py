"""Text and audio pp ops: random byte windows of text, log-mel spectrograms of waveforms.

`text_window` cuts a long text (e.g. a `docs` record) to at most a number of UTF-8 bytes for a
byte-level model: `text_window(256)|tokenize('bytes', 258, key='text', out='text')` gives 258
ids, bos + up to 256 bytes + eos, padded. `log_mel_spectrogram` turns a 1-D waveform into a
(frames, mels) float32 array, in numpy.
"""
from __future__ import annotations

import numpy as np

from vistax.data import preprocess as pp

MAX_UTF8_BYTES = 4  # the longest UTF-8 encoding of one character


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _utf8(value, key: str) -> bytes:
    """UTF-8 bytes of the text in `key`: str, bytes, or a 0-d numpy array of either."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (str, np.str_)):
        return str(value).encode("utf-8")
    if isinstance(value, (bytes, np.bytes_)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{key!r} holds bytes that are not UTF-8 text ({e})") from e
        return bytes(value)
    what = (f"a {value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
            else type(value).__name__)
    raise ValueError(f"{key!r} holds {what}; expected one text (str or UTF-8 bytes)")


def utf8_window(data: bytes, length: int, rng: np.random.Generator) -> bytes:
    """A random slice of UTF-8 `data` of at most `length` bytes that starts and ends on
    character boundaries; `data` itself when it is no longer than `length`.

    The start is drawn uniformly among the character boundaries from which `length` bytes
    remain; the window then takes as many whole characters as fit, so it is at most 3 bytes
    shorter than `length` (never empty when length >= MAX_UTF8_BYTES).
    """
    if len(data) <= length:
        return data
    codes = np.frombuffer(data, np.uint8)
    # Continuation bytes are 0b10xxxxxx; every other byte starts a character.
    boundaries = np.append(np.flatnonzero((codes & 0xC0) != 0x80), len(data))
    starts = boundaries[boundaries <= len(data) - length]  # never empty: 0 is a boundary
    start = int(starts[rng.integers(len(starts))])
    end = int(boundaries[np.searchsorted(boundaries, start + length, side="right") - 1])
    return data[start:end]


@pp.register("text_window")
def text_window(length: int, key: str = "text") -> pp.Op:
    """Replaces the text in `key` (str, UTF-8 bytes, or a 0-d array of either) by a random
    window of at most `length` UTF-8 bytes, as a str; it never splits a character, and a
    text of at most `length` bytes is kept whole. length >= 4 (one character of any size)."""
    length = _positive_int(length, "length", MAX_UTF8_BYTES)

    def op(example, rng):
        data = _utf8(example[key], key)
        return {**example, key: utf8_window(data, length, rng).decode("utf-8")}

    return op


# ---------------------------------------------------------------------------------------------
# Audio


def hz_to_mel(hz):
    """HTK mel scale: 2595 * log10(1 + hz / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_edges(num_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """num_mels + 2 frequencies (Hz), equally spaced on the HTK mel scale from fmin to fmax:
    filter m rises from edge m to its centre, edge m + 1, and falls to edge m + 2."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), num_mels + 2))


def mel_filterbank(sample_rate: float, n_fft: int, num_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
    """(n_fft // 2 + 1, num_mels) triangular filters over the rFFT bins' frequencies
    (k * sample_rate / n_fft), each peaking at 1 at its centre (HTK style: no area
    normalisation; torchaudio's melscale_fbanks with mel_scale='htk', norm=None)."""
    edges = mel_edges(num_mels, fmin, fmax)
    freqs = np.arange(n_fft // 2 + 1) * (sample_rate / n_fft)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (freqs[:, None] - left) / (centre - left)
    falling = (right - freqs[:, None]) / (right - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


@pp.register("log_mel_spectrogram", deterministic=True)
def log_mel_spectrogram(sample_rate: int = 16000, frame_length: int = 400,
                        hop_length: int = 160, num_mels: int = 64, fmin: float = 0.0,
                        fmax: float | None = None, key: str = "audio",
                        out: str = "spectrogram") -> pp.Op:
    """1-D float waveform in `key` -> float32 (frames, num_mels) log(mel power + 1e-6) in `out`.

    Frames of `frame_length` samples every `hop_length` samples, without padding: frames =
    1 + (len - frame_length) // hop_length (the defaults are 25 ms / 10 ms at 16 kHz). Each
    frame is multiplied by a periodic Hann window (0.5 - 0.5 cos(2 pi n / frame_length)),
    zero-padded to n_fft = the next power of two >= frame_length, and its power |rFFT|^2 is
    summed by `num_mels` triangular filters equally spaced on the HTK mel scale (2595 log10(1 +
    f / 700)) from fmin to fmax (default sample_rate / 2), each peaking at 1 (see
    `mel_filterbank`). The waveform stays in `key`. Integer PCM must be made float first, e.g.
    value_range(-1, 1, -32768, 32767, key='audio').
    """
    if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or \
            sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number, got {sample_rate!r}")
    frame_length = _positive_int(frame_length, "frame_length", 2)
    hop_length = _positive_int(hop_length, "hop_length")
    num_mels = _positive_int(num_mels, "num_mels")
    fmax = sample_rate / 2 if fmax is None else fmax
    if not (isinstance(fmin, (int, float)) and isinstance(fmax, (int, float))
            and 0 <= fmin < fmax <= sample_rate / 2):
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, got "
                         f"fmin={fmin!r}, fmax={fmax!r}")
    n_fft = 1 << (frame_length - 1).bit_length()
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(frame_length) / frame_length)
    filters = mel_filterbank(sample_rate, n_fft, num_mels, fmin, fmax)

    def op(example, rng):
        del rng
        wave = example[key]
        if (not isinstance(wave, np.ndarray) or wave.ndim != 1
                or not np.issubdtype(wave.dtype, np.floating)):
            got = (f"a {wave.dtype} array of shape {wave.shape}" if isinstance(wave, np.ndarray)
                   else type(wave).__name__)
            raise ValueError(f"{key!r} holds {got}; expected a 1-D float waveform")
        if len(wave) < frame_length:
            raise ValueError(f"{key!r} holds {len(wave)} samples, fewer than one frame of "
                             f"frame_length={frame_length}")
        frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64),
                                                          frame_length)[::hop_length]
        power = np.abs(np.fft.rfft(frames * window, n=n_fft)) ** 2
        return {**example, out: np.log(power @ filters + 1e-6).astype(np.float32)}

    return op
