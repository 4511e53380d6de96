"""The ``voice`` modality: audio bytes in, log-mel features ``(n_mels, T)`` out.

soundfile, librosa and torch are imported inside the methods that use them, so
importing this module (and loading the plugin) stays cheap.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mmchat import Modality
from mmchat.errors import CorruptMedia, MediaTooLarge
from mmchat.modality import read_settings

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

#: Features are computed at this rate: 25 ms windows every 10 ms, 100 frames a second.
SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
#: Added to mel power before the log, so silence is log(1e-6) rather than -inf.
LOG_FLOOR = 1e-6
#: Fixed scale applied after subtracting each mel bin's mean over the utterance,
#: bringing typical speech features to roughly unit spread.
FEATURE_SCALE = 0.25

# (default, type, minimum, maximum) for every setting in [plugins.voice].
SETTINGS: dict[str, tuple[Any, type, Any, Any]] = {
    "n_mels": (40, int, 8, 128),
    "max_seconds": (30.0, float, 0.1, 3600.0),
    "max_bytes": (10 * 1024 * 1024, int, 1, None),
}

#: Decoded audio is held as float32 before downmixing and resampling, so these cap
#: its size at max_seconds x 192 kHz x 8 channels (about 184 MB for 30 s).
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8

# A WAV 'data' chunk size at or above this, or zero, is a placeholder written by a
# streaming encoder (espeak-ng --stdout writes 0x7ffff000), not a real length.
_STREAMED_WAV_SIZE = 0x7FFF0000


class VoiceModality(Modality):
    """Speech clips: mono, resampled to 16 kHz, as per-utterance normalised log-mels.

    Settings (``[plugins.voice]``): ``n_mels`` (default 40), ``max_seconds`` (30,
    checked from the file header before decoding and again after) and
    ``max_bytes`` (10 MiB).
    """

    name = "voice"
    mime_types = (
        "audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave",
        "audio/flac", "audio/x-flac",
        "audio/ogg", "audio/opus",
        "audio/mpeg", "audio/mp3",
    )
    version = "1"
    limits = ("max_bytes", "max_seconds")

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        values = read_settings(self.name, self.settings, SETTINGS)
        self.settings = values  # every key, defaults filled in: checkpoints record it all
        self.n_mels: int = values["n_mels"]
        self.max_seconds: float = values["max_seconds"]
        self.max_bytes: int = values["max_bytes"]
        self._mel_basis: np.ndarray | None = None
        self._window: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_seconds": self.max_seconds}

    def example(self) -> tuple[bytes, str]:
        """A quarter second of a 440 Hz tone as a 22.05 kHz WAV, for the engine's warm-up
        at start: decoding it resamples, which compiles librosa's numba functions."""
        import numpy as np
        import soundfile

        rate = 22_050
        t = np.arange(rate // 4, dtype=np.float32) / rate
        out = io.BytesIO()
        soundfile.write(out, 0.1 * np.sin(2 * np.pi * 440 * t), rate, format="WAV")
        return out.getvalue(), "audio/wav"

    def decode(self, data: bytes, mime_type: str) -> torch.Tensor:
        """Decode ``data`` to float32 log-mel features ``(n_mels, T)``, T = 1 + samples // 160.

        Raises CorruptMedia for empty, truncated, damaged or unsupported data and
        MediaTooLarge when the payload or its duration is over the limit.
        """
        import torch

        samples = self.read_samples(data, mime_type)
        return torch.from_numpy(self.features(samples))  # (n_mels, T)

    def build_encoder(self, d_model: int) -> nn.Module:
        from .encoder import VoiceEncoder

        return VoiceEncoder(self.n_mels, d_model)

    def augment(self, features: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Perturb log-mels ``(n_mels, T)`` so the encoder learns words, not voices.

        A vocal-tract-length warp (mel axis stretched by 0.88-1.12), a tempo change
        (time axis by 0.85-1.15), then SpecAugment: one band of up to 4 mel bins and
        two spans of up to 8% of the frames set to the utterance mean (zero).
        """
        import torch
        import torch.nn.functional as F

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        def randint(hi: int) -> int:
            return int(torch.randint(0, max(1, hi), (), generator=generator))

        n_mels, T = features.shape
        warp, tempo = uniform(0.88, 1.12), uniform(0.85, 1.15)
        size = (max(2, round(n_mels * warp)), max(2, round(T * tempo)))
        x = F.interpolate(features[None, None], size=size, mode="bilinear",
                          align_corners=True)[0, 0]  # (n_mels * warp, T * tempo)
        if x.shape[0] >= n_mels:
            x = x[:n_mels]
        else:  # the top bins repeat the highest one
            x = torch.cat([x, x[-1:].expand(n_mels - x.shape[0], -1)])
        width = randint(5)
        start = randint(n_mels - width + 1)
        x[start:start + width] = 0.0
        for _ in range(2):
            span = randint(int(0.08 * x.shape[1]) + 1)
            start = randint(x.shape[1] - span + 1)
            x[:, start:start + span] = 0.0
        return x  # (n_mels, T')

    def read_samples(self, data: bytes, mime_type: str = "audio/wav") -> np.ndarray:
        """Mono float32 samples at 16 kHz, with every limit and integrity check applied."""
        import librosa
        import numpy as np
        import soundfile

        if not data:
            raise CorruptMedia("audio is empty (0 bytes)")
        if len(data) > self.max_bytes:
            raise MediaTooLarge(
                f"audio is {len(data):,} bytes; the limit is {self.max_bytes:,} "
                "(plugins.voice.max_bytes)")
        _check_wav_complete(data)
        try:
            with soundfile.SoundFile(io.BytesIO(data)) as f:
                # The header's frame count and rate: soundfile.info() without a re-parse.
                rate, frames, audio_format = f.samplerate, f.frames, f.format
                if rate <= 0 or f.channels <= 0:
                    raise CorruptMedia(
                        f"audio header gives {f.channels} channels at {rate} Hz")
                if rate > MAX_SAMPLE_RATE or f.channels > MAX_CHANNELS:
                    raise MediaTooLarge(
                        f"audio has {f.channels} channels at {rate:,} Hz; at most "
                        f"{MAX_CHANNELS} channels at {MAX_SAMPLE_RATE:,} Hz are accepted")
                self._check_duration(frames / rate)
                limit = math.floor(self.max_seconds * rate) + 1
                samples = f.read(frames=limit, dtype="float32", always_2d=True)  # (N, C)
        except RuntimeError as exc:  # soundfile.LibsndfileError and friends
            raise CorruptMedia(f"could not decode audio sent as {mime_type}: {exc}") from exc
        self._check_duration(len(samples) / rate)
        if len(samples) == 0:
            raise CorruptMedia("audio contains no samples")
        if audio_format != "MP3" and len(samples) < frames:
            # MP3 headers only estimate their length, so a shortfall proves nothing there.
            raise CorruptMedia(
                f"audio is truncated: the header promises {frames:,} frames but only "
                f"{len(samples):,} could be decoded")
        if not np.isfinite(samples).all():
            raise CorruptMedia("audio contains NaN or infinite samples")
        mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]  # (N,)
        if rate != SAMPLE_RATE:
            mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE)  # (N',)
        return np.ascontiguousarray(mono, dtype=np.float32)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel features ``(n_mels, T)`` of 16 kHz mono samples, T = 1 + len // 160.

        Frames are centred (zero padding of n_fft // 2 at each end), as librosa's
        ``melspectrogram`` does by default.
        """
        import numpy as np

        basis, window = self._filters()
        padded = np.pad(samples, N_FFT // 2)  # (N + n_fft,)
        frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]  # (T, n_fft)
        spectrum = np.fft.rfft(frames * window, axis=1)  # (T, n_fft // 2 + 1)
        power = spectrum.real ** 2 + spectrum.imag ** 2  # (T, n_fft // 2 + 1)
        logmel = np.log(power @ basis.T + LOG_FLOOR)  # (T, n_mels)
        logmel -= logmel.mean(axis=0, keepdims=True)  # per-utterance mean per mel bin
        return np.ascontiguousarray((logmel * FEATURE_SCALE).T, dtype=np.float32)  # (n_mels, T)

    def _filters(self) -> tuple[np.ndarray, np.ndarray]:
        if self._mel_basis is None or self._window is None:
            import librosa
            import numpy as np

            self._window = librosa.filters.get_window("hann", N_FFT, fftbins=True).astype(
                np.float32)
            self._mel_basis = librosa.filters.mel(
                sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=self.n_mels, dtype=np.float32)
        return self._mel_basis, self._window

    def _check_duration(self, seconds: float) -> None:
        if seconds > self.max_seconds:
            raise MediaTooLarge(
                f"audio is {seconds:.2f} s long; the limit is {self.max_seconds:g} s "
                "(plugins.voice.max_seconds)")


def _check_wav_complete(data: bytes) -> None:
    """Raise CorruptMedia when a RIFF/WAVE file holds fewer sample bytes than it declares.

    libsndfile quietly plays whatever is present, so a cut-off upload would otherwise
    pass as a shorter clip.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            present = len(data) - (pos + 8)
            if 0 < size < _STREAMED_WAV_SIZE and size > present:
                raise CorruptMedia(
                    f"WAV file is truncated: its header declares {size:,} bytes of samples "
                    f"but only {present:,} are present")
            return
        pos += 8 + size + (size & 1)
