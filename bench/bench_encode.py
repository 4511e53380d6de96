"""Attachment latency: bytes to memory vectors, as the engine does it (decode, collate,
encode), for a 640x480 JPEG and for espeak-ng speech.

Baselines, timed in the same run: for images, Pillow decoding the full-size JPEG then
resizing (the plugin asks libjpeg for a reduced-size decode); for voice,
``librosa.load`` plus ``librosa.feature.melspectrogram`` (the plugin reads with
soundfile and computes log-mels with its own cached filters). Both go through the same
encoder, as the engine serves it (each plugin's ``inference_encoder``), so the ratios show
what the plugins' decoding saves; one more image row runs the encoder as trained, to show
what ``inference_encoder`` saves.

    python -m bench encode
"""

from __future__ import annotations

import copy
import io
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench import default_model, load_config, load_plugins, machine_notes, percentile, table

SPEECH = ("the red circle is on the left of the blue square, and there are three shapes "
          "in the picture")


def make_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG: a gradient, some shapes and noise, quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((60, 80, 260, 280), fill=(220, 30, 30))
    draw.rectangle((380, 150, 560, 330), fill=(30, 60, 220))
    draw.polygon([(300, 420), (380, 300), (460, 420)], fill=(30, 180, 60))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def make_speech() -> bytes:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench encode needs espeak-ng for speech (make system-deps installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), SPEECH], check=True)
        return path.read_bytes()


def naive_image(size: int) -> Callable[[bytes], torch.Tensor]:
    from mmchat_image.modality import MEAN, STD
    from PIL import Image

    def decode(data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size),
                                                                 Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
        return ((x / 255 - MEAN) / STD).contiguous()  # (3, S, S)

    return decode


def naive_voice(n_mels: int) -> Callable[[bytes], torch.Tensor]:
    import librosa

    def decode(data: bytes) -> torch.Tensor:
        samples, _ = librosa.load(io.BytesIO(data), sr=16_000, mono=True)
        mel = librosa.feature.melspectrogram(y=samples, sr=16_000, n_fft=400, hop_length=160,
                                             n_mels=n_mels)
        logmel = np.log(mel + 1e-6)
        logmel -= logmel.mean(axis=1, keepdims=True)
        return torch.from_numpy(logmel * 0.25).float()  # (n_mels, T)

    return decode


def timings(decode: Callable[[bytes], torch.Tensor], encode: Callable[[torch.Tensor], object],
            data: bytes) -> tuple[float, float]:
    t0 = time.perf_counter()
    features = decode(data)
    t1 = time.perf_counter()
    encode(features)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run(quick: bool = False, threads: int = 1) -> str:
    from mmchat.loading import for_inference

    torch.set_num_threads(threads)
    config = load_config()
    notes = machine_notes(threads)
    modalities = load_plugins(config).modalities
    trained, _, source = default_model(config, modalities)
    model = copy.deepcopy(trained)
    for_inference(model, modalities)
    iterations = 10 if quick else 60

    def encoder(name: str, model=model) -> Callable[[torch.Tensor], object]:
        modality = modalities[name]

        def encode(features: torch.Tensor):
            x, lengths = modality.collate([features])
            with torch.inference_mode():
                return model.encode(name, x, lengths)[0]  # (N, d), as Engine._encode

        return encode

    image, voice = modalities["image"], modalities["voice"]
    jpeg, wav = make_jpeg(), make_speech()
    seconds = len(voice.read_samples(wav, "audio/wav")) / 16_000
    cases = {
        "image, plugin (draft decode)": (lambda d: image.decode(d, "image/jpeg"),
                                         encoder("image"), jpeg, 1.0),
        "image, plugin, the encoder as trained": (lambda d: image.decode(d, "image/jpeg"),
                                                  encoder("image", trained), jpeg, 1.0),
        "image, naive Pillow (baseline)": (naive_image(image.size), encoder("image"), jpeg, 1.0),
        "voice, plugin": (lambda d: voice.decode(d, "audio/wav"), encoder("voice"), wav,
                          seconds),
        "voice, librosa (baseline)": (naive_voice(voice.n_mels), encoder("voice"), wav, seconds),
    }
    names = list(cases)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for name in names:  # warm-up: imports, filter banks, oneDNN kernels
        for _ in range(3):
            decode, encode, data, _ = cases[name]
            timings(decode, encode, data)
    for i in range(iterations):
        order = names[:]
        random.Random(i).shuffle(order)
        for name in order:
            decode, encode, data, _ = cases[name]
            results[name].append(timings(decode, encode, data))

    def p(name: str, q: float, part: int | None = None) -> float:
        per = cases[name][3]
        values = [(sum(r) if part is None else r[part]) / per * 1e3 for r in results[name]]
        return percentile(values, q)

    baseline = {"image": "image, naive Pillow (baseline)", "voice": "voice, librosa (baseline)"}
    rows = []
    for name in names:
        base = p(baseline[name.split(",")[0]], 50)
        unit = "ms" if name.startswith("image") else "ms per s of audio"
        rows.append([name, unit, f"{p(name, 50, 0):.2f}", f"{p(name, 50, 1):.2f}",
                     f"{p(name, 50):.2f}", f"{p(name, 90):.2f}", f"{base / p(name, 50):.2f}x"])
    c = model.config
    out = [
        "## Attachment encode latency",
        "",
        f"Command: `python -m bench {'--quick ' if quick else ''}encode`",
        "",
        f"Machine: {notes}.",
        "",
        f"Input: a 640x480 JPEG ({len(jpeg) // 1024} KiB, quality 90, made with Pillow) "
        f"resized to {image.size}x{image.size}; {seconds:.2f} s of espeak-ng speech "
        f"({len(wav) // 1024} KiB WAV, resampled to 16 kHz, {voice.n_mels} mels). Encoders "
        f"of {source if source.startswith('the ') else f'the {source} model'} "
        f"(d_model {c.d_model}), as served unless the row says otherwise. {iterations} runs "
        f"each after 3 warm-up runs, interleaved; decode = bytes to features, encode = "
        f"collate plus encoder.",
        "",
        table(["path", "unit", "decode p50", "encode p50", "total p50", "total p90",
               "vs baseline"], rows),
        "",
    ]
    return "\n".join(out)


def main(quick: bool = False) -> None:
    print(run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(run(args.quick, args.threads))
