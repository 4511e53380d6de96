"""Spoken clips from Debian's ``espeak-ng``: voices per split, synthesis and 16 kHz FLAC.

Each split draws from its own voices and ``+variants``: every valid and test clip uses
a variant that training never heard, and some also a voice training never heard.

Half the training clips also get an accent espeak-ng has no voice for: the words are
transcribed to phonemes by one training voice, a few accent features (th-stopping,
h-dropping, vowel shifts: :data:`ACCENT_FEATURES`) rewrite those phonemes, and another
training voice speaks them. A voice encoder that has heard many accents learns the
words rather than one accent's way of saying them.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
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
#: Accent features a training clip may apply to espeak-ng's phoneme mnemonics
#: (``espeak-ng -x``): a regular expression and its replacement, named after the change
#: in English accents they imitate (vowels by Wells' lexical sets).
ACCENT_FEATURES: dict[str, tuple[str, str]] = {
    "th-stopping": (r"D", "d"),
    "l-vocalised-e": (r"@L", "El"),
    "l-vocalised-u": (r"@L", "Ul"),
    "nurse-e": (r"3:", "Er"),
    "nurse-rhotic": (r"3:", "IR"),
    "no-linking-r": (r"r-", ""),
    "h-dropping": (r"(?<![a-zA-Z])h", ""),
    "lot-strut": (r"0", "V"),
    "strut-lot": (r"V", "0"),
    "face-monophthong": (r"eI", "e:"),
    "goat-monophthong": (r"oU", "o:"),
    "goat-fronted": (r"oU", "@U"),
    "price-monophthong": (r"aI", "a:"),
    "schwa-strut": (r"@", "V"),
    "fleece-kit": (r"i:", "I"),
    "kit-fleece": (r"I", "i:"),
    "dress-raised": (r"E", "e"),
    "trap-backed": (r"a", "A"),
}
#: Share of training clips spoken with an accent (valid and test clips never are).
ACCENT_SHARE = 0.5
SPEEDS = tuple(range(80, 321, 20))  # words per minute
#: Share of clips (in every split) with noise mixed in, at an SNR of 0 to 20 dB.
NOISE_SHARE = 0.5
SNRS = tuple(range(0, 21))  # dB
#: Kinds of background noise: white, pink (1/f), brown (1/f^2), and mains hum with
#: harmonics over pink noise.
NOISES = ("white", "pink", "brown", "hum")
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
    #: The voice whose phonemes ``name`` speaks when ``accent`` is set ("" for its own).
    phonemes_from: str = ""
    #: Names of the :data:`ACCENT_FEATURES` applied to those phonemes, in order.
    accent: tuple[str, ...] = ()
    #: Background noise (one of :data:`NOISES`, "" for none) and its signal-to-noise
    #: ratio in dB.
    noise: str = ""
    snr: int = 0

    @property
    def espeak_name(self) -> str:
        return f"{self.name}+{self.variant}" if self.variant else self.name

    @property
    def accented(self) -> bool:
        return bool(self.accent)

    def to_meta(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.accented:
            del out["phonemes_from"], out["accent"]
        else:
            out["accent"] = list(self.accent)
        if not self.noise:
            del out["noise"], out["snr"]
        return out


def greeting_reply(greeting: str) -> tuple[str, str]:
    """``(reply, answer)`` for a spoken greeting."""
    answer = GREETINGS[greeting]
    return f"{answer}! how can i help you?", answer


def sample_voice(rng: np.random.Generator, split: str) -> Voice:
    voice = Voice(name=str(rng.choice(VOICES[split])), variant=str(rng.choice(VARIANTS[split])),
                  speed=int(rng.choice(SPEEDS)), pitch=int(rng.choice(PITCHES)))
    if rng.random() < NOISE_SHARE:
        voice = replace(voice, noise=str(rng.choice(NOISES)), snr=int(rng.choice(SNRS)))
    if split != "train" or rng.random() >= ACCENT_SHARE:
        return voice
    features = rng.choice(list(ACCENT_FEATURES), size=int(rng.integers(1, 5)), replace=False)
    return replace(voice, phonemes_from=str(rng.choice(VOICES[split])),
                   accent=tuple(str(f) for f in features))


def clip_name(text: str, voice: Voice) -> str:
    """A file name that is the same for identical renders, so they are made once."""
    key = f"{text}|{voice.espeak_name}|{voice.speed}|{voice.pitch}"
    if voice.accented:
        key += f"|{voice.phonemes_from}|{','.join(voice.accent)}"
    if voice.noise:
        key += f"|{voice.noise}|{voice.snr}"
    return hashlib.sha1(key.encode()).hexdigest()[:16] + ".ogg"


def accent_phonemes(phonemes: str, accent: tuple[str, ...]) -> str:
    """Apply the named :data:`ACCENT_FEATURES` to espeak-ng phoneme mnemonics, in order."""
    for name in accent:
        pattern, replacement = ACCENT_FEATURES[name]
        phonemes = re.sub(pattern, replacement, phonemes)
    return phonemes


def require_espeak() -> str:
    """Path of the ``espeak-ng`` executable; :class:`SpeechUnavailable` says how to get it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechUnavailable(
            "the demo corpus speaks its voice turns with espeak-ng, which is not installed "
            "or not on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng)")
    return exe


def synthesize(text: str, voice: Voice) -> np.ndarray:
    """Speak ``text``; returns float32 mono samples at 16 kHz, silence trimmed.

    An accented voice speaks the phonemes of ``voice.phonemes_from``, rewritten by its
    accent features, instead of ``text`` as its own dictionary says it.
    """
    if voice.accented:
        said = phonemes(text, voice.phonemes_from or voice.name)
        text = f"[[{accent_phonemes(said, voice.accent)}]]"
    with tempfile.TemporaryDirectory(prefix="mmchat-espeak-") as tmp:
        wav = Path(tmp) / "clip.wav"
        _espeak(["-v", voice.espeak_name, "-s", str(voice.speed), "-p", str(voice.pitch),
                 "-w", str(wav), text], voice.espeak_name)
        if not wav.exists():
            raise SpeechUnavailable(f"espeak-ng wrote no audio for voice {voice.espeak_name!r}")
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    return _trim(_resample(samples.mean(axis=1), rate))


def phonemes(text: str, voice: str) -> str:
    """espeak-ng's phoneme mnemonics for ``text`` as ``voice`` says it, on one line."""
    return " ".join(_espeak(["-q", "-x", "-v", voice, text], voice).split())


def _espeak(args: list[str], voice: str) -> str:
    """Run espeak-ng with ``args``; its standard output, or :class:`SpeechUnavailable`."""
    try:
        done = subprocess.run([require_espeak(), *args], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpeechUnavailable(f"espeak-ng failed to run: {exc}") from exc
    if done.returncode != 0:
        raise SpeechUnavailable(f"espeak-ng failed for voice {voice!r}: "
                                f"{done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


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


def add_noise(samples: np.ndarray, kind: str, snr: float, seed: int) -> np.ndarray:
    """``samples`` with ``kind`` noise mixed in at ``snr`` dB (against the speech's
    power), scaled down if needed so that no sample clips."""
    rng = np.random.default_rng(seed)
    n = len(samples)
    white = rng.standard_normal(n)
    if kind == "white":
        noise = white
    else:
        spectrum = np.fft.rfft(white)
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        f[0] = f[1] if n > 1 else 1.0
        noise = np.fft.irfft(spectrum / (f ** (1.0 if kind == "brown" else 0.5)), n)
        if kind == "hum":
            t = np.arange(n) / SAMPLE_RATE
            base = float(rng.choice([50.0, 60.0]))
            hum = sum(np.sin(2 * np.pi * base * h * t + rng.uniform(0, 6.3)) / h
                      for h in (1, 2, 3, 5))
            noise = noise / (noise.std() + 1e-12) + 2.0 * hum
    speech_power = float(np.mean(samples.astype(np.float64) ** 2)) or 1e-12
    noise = noise * np.sqrt(speech_power / 10 ** (snr / 10) / (np.mean(noise ** 2) + 1e-20))
    mixed = samples + noise
    peak = float(np.abs(mixed).max())
    return (mixed / peak * 0.95 if peak > 0.95 else mixed).astype(np.float32)


def write_clip(path: Path, text: str, voice: Voice) -> None:
    """Speak ``text`` (with the voice's noise) into a 16 kHz Ogg Opus file at ``path``."""
    samples = synthesize(text, voice)
    if voice.noise:
        seed = int(hashlib.sha1(path.name.encode()).hexdigest()[:8], 16)
        samples = add_noise(samples, voice.noise, voice.snr, seed)
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="OGG", subtype="OPUS")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ogg_fixed_serial(buffer.getvalue()))


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return table


def ogg_fixed_serial(data: bytes, serial: int = 1) -> bytes:
    """The Ogg stream ``data`` with its random stream serial number set to ``serial``
    and every page's checksum recomputed, so the same audio gives the same bytes."""
    table = _crc_table()
    out = bytearray(data)
    pos = 0
    while pos + 27 <= len(out) and out[pos:pos + 4] == b"OggS":
        segments = out[pos + 26]
        size = 27 + segments + sum(out[pos + 27: pos + 27 + segments])
        out[pos + 14: pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22: pos + 26] = b"\0\0\0\0"
        crc = 0
        for byte in out[pos: pos + size]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) ^ byte) & 0xFF]
        out[pos + 22: pos + 26] = crc.to_bytes(4, "little")
        pos += size
    if pos != len(out):
        raise ValueError("not a complete Ogg stream")
    return bytes(out)
