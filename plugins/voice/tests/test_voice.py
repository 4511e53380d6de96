"""Tests for the voice modality, with real speech spoken by espeak-ng."""

from __future__ import annotations

import io
import math
import shutil
import subprocess

import librosa
import mmchat_voice
import numpy as np
import pytest
import soundfile
import torch
from mmchat_voice import VoiceModality

from mmchat.errors import ConfigError, CorruptMedia, MediaTooLarge
from mmchat.plugins import PluginHost

ESPEAK = shutil.which("espeak-ng")


def speak(text: str, path) -> bytes:
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng, or "
                    "`make system-deps`)")
    subprocess.run([ESPEAK, "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


def convert(wav: bytes, fmt: str, subtype: str | None = None, *, rate: int | None = None,
            channels: int = 1) -> bytes:
    samples, sr = soundfile.read(io.BytesIO(wav), dtype="float32")
    if rate is not None and rate != sr:
        samples, sr = librosa.resample(samples, orig_sr=sr, target_sr=rate), rate
    if channels > 1:
        samples = np.stack([samples] * channels, axis=1)
    buf = io.BytesIO()
    soundfile.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hello(tmp_path_factory) -> bytes:
    """About one second of "hello there" as a 22,050 Hz mono 16-bit WAV."""
    return speak("hello there", tmp_path_factory.mktemp("voice") / "hello.wav")


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> bytes:
    return speak("what colour is the square on the left",
                 tmp_path_factory.mktemp("voice") / "question.wav")


@pytest.fixture(scope="module")
def voice() -> VoiceModality:
    return VoiceModality()


def frames_for(wav: bytes) -> int:
    """Feature frames expected for a clip: one per 10 ms, plus one (centred frames)."""
    info = soundfile.info(io.BytesIO(wav))
    return 1 + round(info.frames * 16_000 / info.samplerate) // 160


def test_espeak_output_is_what_the_tests_assume(hello):
    info = soundfile.info(io.BytesIO(hello))
    assert (info.samplerate, info.channels, info.format) == (22_050, 1, "WAV")
    assert 0.5 < info.duration < 2.0


def test_wav_becomes_log_mels_at_100_frames_a_second(voice, hello):
    x = voice.decode(hello, "audio/wav")
    info = soundfile.info(io.BytesIO(hello))
    assert x.dtype == torch.float32
    assert x.shape[0] == 40
    assert abs(x.shape[1] - frames_for(hello)) <= 1
    assert abs(x.shape[1] - 100 * info.duration) <= 2
    assert torch.isfinite(x).all()
    # Per-utterance mean normalisation: every mel bin averages to zero.
    assert torch.allclose(x.mean(dim=1), torch.zeros(40), atol=1e-4)
    assert 0.3 < float(x.std()) < 3.0


def test_features_match_librosa(voice, hello):
    samples, sr = soundfile.read(io.BytesIO(hello), dtype="float32")
    y = librosa.resample(samples, orig_sr=sr, target_sr=16_000)
    mel = librosa.feature.melspectrogram(y=y, sr=16_000, n_fft=400, hop_length=160, n_mels=40)
    expected = np.log(mel + 1e-6)
    expected = (expected - expected.mean(axis=1, keepdims=True)) * 0.25
    np.testing.assert_allclose(voice.decode(hello, "audio/wav").numpy(), expected, atol=1e-4)


def test_n_mels_setting(hello):
    assert VoiceModality({"n_mels": 64}).decode(hello, "audio/wav").shape[0] == 64


def test_flac_matches_wav(voice, hello):
    flac = convert(hello, "FLAC")
    torch.testing.assert_close(voice.decode(flac, "audio/flac"), voice.decode(hello, "audio/wav"),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("subtype, rate, mime", [("VORBIS", None, "audio/ogg"),
                                                 ("OPUS", 48_000, "audio/ogg"),
                                                 (None, None, "audio/mpeg")])
def test_lossy_formats_are_close_to_wav(voice, hello, subtype, rate, mime):
    fmt = "MP3" if mime == "audio/mpeg" else "OGG"
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile cannot read {fmt}")
    data = convert(hello, fmt, subtype, rate=rate)
    x, ref = voice.decode(data, mime), voice.decode(hello, "audio/wav")
    assert abs(x.shape[1] - ref.shape[1]) <= 6  # codec priming and padding
    assert best_correlation(x, ref, max_lag=6) > 0.8


def best_correlation(a: torch.Tensor, b: torch.Tensor, max_lag: int) -> float:
    """Highest correlation of two feature maps over time shifts up to ``max_lag`` frames."""
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        x, y = (a[:, lag:], b) if lag >= 0 else (a, b[:, -lag:])
        n = min(x.shape[1], y.shape[1])
        best = max(best, float(np.corrcoef(x[:, :n].flatten(), y[:, :n].flatten())[0, 1]))
    return best


@pytest.mark.parametrize("rate", [8_000, 16_000, 44_100, 48_000])
def test_any_rate_is_resampled_to_100_frames_a_second(voice, hello, rate):
    data = convert(hello, "WAV", rate=rate)
    assert abs(voice.decode(data, "audio/wav").shape[1] - frames_for(hello)) <= 1


def test_stereo_is_downmixed(voice, hello):
    stereo = convert(hello, "WAV", "FLOAT", channels=2)
    assert soundfile.info(io.BytesIO(stereo)).channels == 2
    torch.testing.assert_close(voice.decode(stereo, "audio/wav"),
                               voice.decode(hello, "audio/wav"), atol=1e-4, rtol=0)


def test_streamed_wav_with_placeholder_sizes_is_accepted(voice, hello):
    streamed = subprocess.run([ESPEAK, "--stdout", "hello there"], check=True,
                              capture_output=True).stdout
    assert int.from_bytes(streamed[40:44], "little") >= 0x7FFF0000  # no real length
    x = voice.decode(streamed, "audio/wav")
    assert abs(x.shape[1] - frames_for(hello)) <= 1


@pytest.mark.parametrize("cut", [1, 1000, 0.5])
def test_truncated_wav_is_corrupt(voice, hello, cut):
    keep = int(len(hello) * cut) if isinstance(cut, float) else len(hello) - cut
    with pytest.raises(CorruptMedia, match="WAV file is truncated"):
        voice.decode(hello[:keep], "audio/wav")


def test_truncated_flac_is_corrupt(voice, hello):
    flac = convert(hello, "FLAC")
    with pytest.raises(CorruptMedia):
        voice.decode(flac[: len(flac) // 2], "audio/flac")


@pytest.mark.parametrize("data", [b"", b"RIFF", bytes(range(256)) * 8, b"fLaC" + bytes(100)])
def test_garbage_is_corrupt(voice, data):
    with pytest.raises(CorruptMedia):
        voice.decode(data, "audio/wav")


def test_header_only_wav_is_corrupt(voice, hello):
    header = convert(hello, "WAV")[:44]
    header = header[:40] + (0).to_bytes(4, "little")  # a complete, empty 'data' chunk
    with pytest.raises(CorruptMedia, match="no samples"):
        voice.decode(header, "audio/wav")


def test_nan_samples_are_corrupt(voice):
    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = np.nan
    buf = io.BytesIO()
    soundfile.write(buf, samples, 16_000, format="WAV", subtype="FLOAT")
    with pytest.raises(CorruptMedia, match="NaN"):
        voice.decode(buf.getvalue(), "audio/wav")


def test_too_long_is_rejected(hello):
    with pytest.raises(MediaTooLarge, match=r"audio is 0\.9\d s long; the limit is 0\.5 s"):
        VoiceModality({"max_seconds": 0.5}).decode(hello, "audio/wav")


def test_too_long_in_every_format(hello):
    voice = VoiceModality({"max_seconds": 0.5})
    for fmt, mime in [("FLAC", "audio/flac"), ("OGG", "audio/ogg")]:
        with pytest.raises(MediaTooLarge):
            voice.decode(convert(hello, fmt), mime)


@pytest.mark.parametrize("rate, channels", [(384_000, 1), (16_000, 12)])
def test_extreme_rates_and_channel_counts_are_rejected(voice, rate, channels):
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros((rate // 100, channels), dtype=np.float32), rate,
                    format="WAV", subtype="PCM_16")
    with pytest.raises(MediaTooLarge, match=f"{channels} channels at {rate:,} Hz"):
        voice.decode(buf.getvalue(), "audio/wav")


def test_payload_over_max_bytes(hello):
    with pytest.raises(MediaTooLarge, match="the limit is 1,000 "):
        VoiceModality({"max_bytes": 1000}).decode(hello, "audio/wav")


@pytest.mark.parametrize("settings, message", [
    ({"rate": 16000}, "unknown setting plugins.voice.rate; allowed: n_mels, max_seconds"),
    ({"n_mels": 40.0}, "plugins.voice.n_mels = 40.0 is not allowed: expected an integer"),
    ({"n_mels": 4}, "plugins.voice.n_mels = 4 is not allowed: minimum is 8"),
    ({"max_seconds": "30"}, "plugins.voice.max_seconds = '30' is not allowed: expected a number"),
    ({"max_seconds": 0}, "plugins.voice.max_seconds = 0 is not allowed: minimum is 0.1"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        VoiceModality(settings)


def test_integer_max_seconds_is_allowed():
    assert VoiceModality({"max_seconds": 5}).describe()["max_seconds"] == 5.0


def test_encoder_shapes_mask_and_summary(voice, hello, question):
    encoder = voice.build_encoder(32).eval()
    features = [voice.decode(hello, "audio/wav"), voice.decode(question, "audio/wav")]
    batch, lengths = voice.collate(features)
    assert batch.shape == (2, 40, int(lengths.max()))
    with torch.no_grad():
        vectors, mask = encoder(batch, lengths)
    reduced = [math.ceil(math.ceil(int(n) / 2) / 2) for n in lengths]
    assert vectors.shape == (2, 1 + max(reduced), 32)
    assert mask.dtype == torch.bool and mask.shape == (2, 1 + max(reduced))
    assert mask[:, 0].all()  # the summary vector
    assert mask.sum(dim=1).tolist() == [1 + r for r in reduced]
    assert torch.count_nonzero(vectors[0, 1 + reduced[0]:]) == 0  # padding is zeroed
    assert torch.count_nonzero(vectors[:, 0]) > 0


def test_padded_batch_matches_single_items(voice, hello, question):
    torch.manual_seed(0)
    encoder = voice.build_encoder(24).eval()
    features = [voice.decode(hello, "audio/wav"), voice.decode(question, "audio/wav")]
    batch, lengths = voice.collate(features)
    with torch.no_grad():
        vectors, mask = encoder(batch, lengths)
        for i, x in enumerate(features):
            alone, alone_mask = encoder(x.unsqueeze(0), torch.tensor([x.shape[-1]]))
            n = alone.shape[1]
            assert alone_mask.all()
            torch.testing.assert_close(vectors[i, :n], alone[0], atol=1e-5, rtol=1e-4)
            assert mask[i, :n].all() and not mask[i, n:].any()


def test_encoder_without_lengths_uses_full_length(voice):
    encoder = voice.build_encoder(16).eval()
    with torch.no_grad():
        vectors, mask = encoder(torch.randn(3, 40, 9))
    assert vectors.shape == (3, 4, 16) and mask.all()


def test_encoder_trains(voice, hello):
    encoder = voice.build_encoder(16)
    batch, lengths = voice.collate([voice.decode(hello, "audio/wav")] * 2)
    vectors, mask = encoder(batch, lengths)
    (vectors * mask.unsqueeze(-1)).sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_registered_through_entry_point(hello):
    host = PluginHost(builtins=(), allow=["voice"], settings={"voice": {"n_mels": 64}})
    modality = host.modalities["voice"]
    assert isinstance(modality, VoiceModality)
    assert host.plugin_version("voice") == mmchat_voice.__version__
    assert modality.accepts("audio/x-wav") and modality.accepts("AUDIO/FLAC")
    assert modality.decode(hello, "audio/wav").shape[0] == 64


def test_augment_keeps_mel_bins_and_is_seeded(voice, hello):
    features = voice.decode(hello, "audio/wav")  # (n_mels, T)
    a = voice.augment(features, torch.Generator().manual_seed(7))
    b = voice.augment(features, torch.Generator().manual_seed(7))
    c = voice.augment(features, torch.Generator().manual_seed(8))
    assert a.shape[0] == features.shape[0] == voice.n_mels
    assert 0.8 * features.shape[1] <= a.shape[1] <= 1.2 * features.shape[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.isfinite(a).all()
    # the words survive: the perturbed clip still lines up with the original
    x = torch.nn.functional.interpolate(a[None, None], size=features.shape)[0, 0]
    assert torch.corrcoef(torch.stack([x.flatten(), features.flatten()]))[0, 1] > 0.5
    # the clip the test decoded is not modified in place
    assert torch.equal(features, voice.decode(hello, "audio/wav"))


def test_augmented_clip_still_encodes(voice, hello):
    features = voice.augment(voice.decode(hello, "audio/wav"), torch.Generator().manual_seed(0))
    x, lengths = voice.collate([features])
    vectors, mask = voice.build_encoder(16)(x, lengths)
    assert vectors.shape[0] == 1 and mask.all()
