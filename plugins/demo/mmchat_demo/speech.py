"""Spoken clips from Debian's ``espeak-ng``: voices per split, synthesis and 16 kHz FLAC.

Each split draws from its own voices and ``+variants``: every valid and test clip uses
a variant that training never heard, and some also a voice training never heard.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from mmchat.errors import MMChatError

SAMPLE_RATE = 16_000
#: espeak-ng voices (``espeak-ng --voices=en``) each split may use.
VOICES = {
    "train": ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan"),
    "valid": ("en-us-nyc", "en-us", "en-gb-x-rp"),
    "test": ("en-029", "en-gb-x-gbcwmd", "en", "en-gb-scotland"),
}
#: espeak-ng's named voice variants (``espeak-ng --voices=variant``) that training also
#: speaks with: many speakers teach the voice encoder words rather than voices. Left out:
#: the held-out ``m6``-``m8``, ``f4``, ``f5``, the whispering and robotic ones, and
#: duplicates (``Mr`` and ``fast`` render as the plain voice, ``klatt`` as ``caleb``).
NAMED_VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda",
    "benjamin", "boris", "caleb", "david", "Denis", "Diogo", "ed", "edward", "edward2",
    "Gene", "Gene2", "gustave", "announcer", "Henrique", "Hugo", "iven", "iven2", "iven3",
    "iven4", "Jacky", "john", "kaukovalta", "Lee", "linda", "marcelo", "Marco", "Mario",
    "max", "Michael", "michel", "miguel", "Mike", "Nguyen", "pablo", "paul", "pedro",
    "quincy", "rob", "robert", "steph", "steph2", "steph3", "zac", "anika", "AnxiousAndy",
    "grandpa", "klatt2", "klatt3", "klatt4",
)
#: ``+variant`` suffixes each split may use ("" is the voice's own).
VARIANTS = {
    "train": ("", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "croak", *NAMED_VARIANTS),
    "valid": ("m6", "f4"),
    "test": ("m7", "m8", "f5"),
}
SPEEDS = tuple(range(130, 191, 10))  # words per minute
PITCHES = tuple(range(30, 71, 10))  # 0-99, espeak-ng's default is 50
GREETINGS = {
    "hello": "hello", "hi": "hello", "hi there": "hello", "hey": "hello",
    "hello there": "hello", "good morning": "good morning",
    "good afternoon": "good afternoon", "good evening": "good evening",
}
_SILENCE = 0.01  # amplitude below which leading and trailing samples are trimmed
_PAD = SAMPLE_RATE // 20  # keep 50 ms around the speech


class SpeechUnavailable(MMChatError):
    """espeak-ng is missing or failed."""

    code = "speech_unavailable"


@dataclass(frozen=True)
class Voice:
    name: str
    variant: str
    speed: int
    pitch: int

    @property
    def espeak_name(self) -> str:
        return f"{self.name}+{self.variant}" if self.variant else self.name

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)


def greeting_reply(greeting: str) -> tuple[str, str]:
    """``(reply, answer)`` for a spoken greeting."""
    answer = GREETINGS[greeting]
    return f"{answer}! how can i help you?", answer


def sample_voice(rng: np.random.Generator, split: str) -> Voice:
    return Voice(name=str(rng.choice(VOICES[split])), variant=str(rng.choice(VARIANTS[split])),
                 speed=int(rng.choice(SPEEDS)), pitch=int(rng.choice(PITCHES)))


def clip_name(text: str, voice: Voice) -> str:
    """A file name that is the same for identical renders, so they are made once."""
    key = f"{text}|{voice.espeak_name}|{voice.speed}|{voice.pitch}"
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".flac"


def require_espeak() -> str:
    """Path of the ``espeak-ng`` executable; :class:`SpeechUnavailable` says how to get it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable(
            "the demo corpus speaks its voice turns with espeak-ng, which is not installed "
            "or not on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)")
    return exe


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak ``text``; returns float32 mono samples at 16 kHz, silence trimmed."""
    exe = require_espeak()
    with tempfile.TemporaryDirectory(prefix="mmchat-espeak-") as tmp:
        wav = Path(tmp) / "clip.wav"
        cmd = [exe, "-v", voice.espeak_name, "-s", str(voice.speed), "-p", str(voice.pitch),
               "-w", str(wav), text]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SpeechUnavailable(f"espeak-ng failed to run: {exc}") from exc
        if done.returncode != 0 or not wav.exists():
            raise SpeechUnavailable(f"espeak-ng failed for voice {voice.espeak_name!r}: "
                                    f"{done.stderr.strip() or f'exit {done.returncode}'}")
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    return _trim(_resample(samples.mean(axis=1), rate))


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples
    from scipy.signal import resample_poly

    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(samples, SAMPLE_RATE // g, rate // g).astype(np.float32)


def _trim(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > _SILENCE)
    if loud.size == 0:
        return samples
    return samples[max(0, loud[0] - _PAD): loud[-1] + _PAD]


def write_clip(path: Path, text: str, voice: Voice) -> None:
    """Speak ``text`` into a 16-bit, 16 kHz FLAC file at ``path``."""
    samples = np.clip(synthesize(text, voice), -1.0, 1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
