"""pp ops `text_window` and `log_mel_spectrogram`."""
from __future__ import annotations

import numpy as np
import pytest

from vistax.data import preprocess, text_audio

# 400 characters of 1, 2, 3 and 4 UTF-8 bytes in random order.
MIXED = "".join(np.random.default_rng(0).choice(list("aé€😀"), 400))


def _run(spec: str, example: dict, seed: int = 0) -> dict:
    return preprocess.parse(spec)(example, np.random.default_rng(seed))


def test_ops_are_registered():
    assert {"text_window", "log_mel_spectrogram"} <= set(preprocess.known_ops())
    assert text_audio in preprocess.OP_MODULES


@pytest.mark.parametrize("length", [4, 5, 7, 32, 129])
def test_text_window_is_a_short_whole_character_substring(length):
    data = MIXED.encode("utf-8")
    windows = set()
    for seed in range(200):
        window = _run(f"text_window({length})", {"text": MIXED}, seed)["text"]
        assert isinstance(window, str)
        encoded = window.encode("utf-8")
        assert length - 3 <= len(encoded) <= length  # as many whole characters as fit
        assert window in MIXED and encoded in data
        windows.add(window)
    assert len(windows) > (5 if length < 8 else 100)  # different generators, different windows


def test_text_window_accepts_bytes_and_numpy_scalars():
    data = MIXED.encode("utf-8")
    for value in (data, np.array(data, dtype=object), np.bytes_(data), np.array(MIXED)):
        window = _run("text_window(10, key='t')", {"t": value, "other": 1}, seed=3)
        assert window == {"t": _run("text_window(10)", {"text": MIXED}, seed=3)["text"],
                          "other": 1}
    # A window is fixed by the generator; the example itself is not modified.
    example = {"text": MIXED}
    assert _run("text_window(16)", example, 5) == _run("text_window(16)", example, 5)
    assert example == {"text": MIXED}


def test_text_window_draws_starts_over_the_whole_text():
    letters = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, 1000)
    text = "".join(map(chr, letters))  # its 30-letter substrings occur once
    starts = [text.index(_run("text_window(100)", {"text": text}, seed)["text"][:30])
              for seed in range(300)]
    assert min(starts) < 50 and max(starts) > 850


def test_text_window_keeps_short_text_whole():
    for text in ("", "héllo 😀", "x" * 64):
        assert _run("text_window(64)", {"text": text})["text"] == text
        assert _run("text_window(64)", {"text": text.encode("utf-8")})["text"] == text


def test_text_window_rejects_bad_arguments_and_values():
    with pytest.raises(ValueError, match="length must be an int >= 4"):
        preprocess.parse("text_window(3)")
    with pytest.raises(ValueError, match="'text' holds bytes that are not UTF-8"):
        _run("text_window(8)", {"text": b"\xff" * 20})
    with pytest.raises(ValueError, match=r"'text' holds a <U1 array of shape \(2,\)"):
        _run("text_window(8)", {"text": np.array(["a", "b"])})


# ---------------------------------------------------------------------------------------------
# Spectrograms

SR = 16000


def _sine(freq: float, seconds: float = 0.5, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("samples, frame, hop", [(400, 400, 160), (401, 400, 160),
                                                 (8000, 400, 160), (1000, 256, 100)])
def test_spectrogram_shape_and_dtype(samples, frame, hop):
    wave = np.random.default_rng(0).standard_normal(samples).astype(np.float32)
    spec = f"log_mel_spectrogram(frame_length={frame}, hop_length={hop}, num_mels=40)"
    out = _run(spec, {"audio": wave})
    assert out["spectrogram"].shape == (1 + (samples - frame) // hop, 40)
    assert out["spectrogram"].dtype == np.float32 and out["audio"] is wave


def test_filters_are_htk_triangles():
    n_fft, num_mels = 512, 64
    filters = text_audio.mel_filterbank(SR, n_fft, num_mels, 0.0, SR / 2)
    assert filters.shape == (n_fft // 2 + 1, num_mels)
    np.testing.assert_allclose(text_audio.hz_to_mel([0, 700, 1000]),
                               [0, 2595 * np.log10(2), 2595 * np.log10(1 + 1000 / 700)])
    np.testing.assert_allclose(text_audio.mel_to_hz(text_audio.hz_to_mel([50.0, 4321.0])),
                               [50.0, 4321.0])
    edges = text_audio.mel_edges(num_mels, 0.0, SR / 2)
    np.testing.assert_allclose(np.diff(text_audio.hz_to_mel(edges)),
                               text_audio.hz_to_mel(SR / 2) / (num_mels + 1))
    # Each filter rises from the previous centre to its own and falls to the next, so between
    # the first and last centres the filters sum to 1.
    freqs = np.arange(n_fft // 2 + 1) * SR / n_fft
    inside = (freqs >= edges[1]) & (freqs <= edges[-2])
    np.testing.assert_allclose(filters[inside].sum(1), 1.0, atol=1e-9)
    assert np.all(filters >= 0) and filters.max() <= 1


@pytest.mark.parametrize("freq", [300.0, 440.0, 1000.0, 2345.0, 5000.0, 7100.0])
def test_sine_peaks_in_the_mel_bin_with_the_nearest_centre(freq):
    spectrogram = _run("log_mel_spectrogram", {"audio": _sine(freq)})["spectrogram"]
    centres = text_audio.mel_edges(64, 0.0, SR / 2)[1:-1]
    nearest = int(np.argmin(np.abs(centres - freq)))
    assert np.all(np.argmax(spectrogram, axis=1) == nearest)
    assert spectrogram[:, nearest].min() > np.log(1e-6) + 10  # far above the floor


def test_doubling_the_amplitude_adds_log_4_to_loud_bins():
    quiet = _run("log_mel_spectrogram", {"audio": _sine(1000.0, amplitude=0.25)})["spectrogram"]
    loud = _run("log_mel_spectrogram", {"audio": _sine(1000.0, amplitude=0.5)})["spectrogram"]
    bins = quiet > np.log(1e-2)
    assert bins.sum() >= quiet.shape[0]  # at least the peak bin of every frame
    np.testing.assert_allclose(loud[bins] - quiet[bins], np.log(4.0), atol=1e-3)


def test_silence_gives_the_floor():
    out = _run("log_mel_spectrogram(key='wave', out='mel')", {"wave": np.zeros(800)})["mel"]
    np.testing.assert_allclose(out, np.log(1e-6), rtol=1e-6)


def test_spectrogram_rejects_short_and_non_float_input_and_bad_arguments():
    with pytest.raises(ValueError, match="'audio' holds 399 samples, fewer than one frame"):
        _run("log_mel_spectrogram", {"audio": np.zeros(399, np.float32)})
    with pytest.raises(ValueError, match="'audio' holds a int16 array"):
        _run("log_mel_spectrogram", {"audio": np.zeros(1000, np.int16)})
    with pytest.raises(ValueError, match="'audio' holds a float32 array of shape"):
        _run("log_mel_spectrogram", {"audio": np.zeros((2, 1000), np.float32)})
    with pytest.raises(ValueError, match="fmax"):
        preprocess.parse("log_mel_spectrogram(fmax=9000)")
    with pytest.raises(ValueError, match="num_mels must be an int >= 1"):
        preprocess.parse("log_mel_spectrogram(num_mels=0)")
