"""The demo corpus: a ``--small`` build through the CLI, checked against its ground truth."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mmchat_demo.build as build_module
import numpy as np
import pytest
import soundfile
from mmchat_demo import build_demo, chitchat, digits, scenes, speech
from PIL import Image

from mmchat.dataset import check_dataset, read_dataset

SPLITS = ("train", "valid", "test")
CATEGORIES = {"colour", "shape", "count", "position", "digit", "spoken", "followup",
              "chitchat", "greeting", "later_picture", "earlier_picture", "across_pictures",
              "pronoun", "yes_no", "caption", "not_there", "no_picture", "goodbye",
              "out_of_domain", "digit_font", "social"}
#: The attachments of each source's first user turn.
FIRST_ATTACHMENTS = {"shapes": ["image"], "digits": ["image"], "spoken": ["image", "voice"],
                     "greeting": ["voice"], "typed-greeting": [], "chatterbot": [],
                     "pronoun": ["image"], "yes-no": ["image"], "caption": ["image"],
                     "not-there": ["image"], "no-picture": [], "goodbye": [],
                     "out-of-domain": [], "font-digits": ["image"], "social": []}
DOCS = Path(__file__).resolve().parents[3] / "docs" / "data.md"


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(corpus, cli_build, tmp_path):
    cli_build(tmp_path / "b")
    assert all_files(tmp_path / "b") == all_files(corpus)
    build_demo(tmp_path / "c", seed=0, small=True, workers=2)
    assert all_files(tmp_path / "c") == all_files(corpus)


def test_another_seed_another_corpus(corpus, cli_build, tmp_path):
    cli_build(tmp_path / "d", "--seed", "1")
    assert (tmp_path / "d" / "train.jsonl").read_bytes() != (corpus / "train.jsonl").read_bytes()


def test_rebuilding_in_place_replaces_the_old_media(corpus, cli_build, tmp_path):
    out = tmp_path / "e"
    cli_build(out, "--seed", "3")
    cli_build(out, "--force")
    assert all_files(out) == all_files(corpus)


def test_every_split_passes_the_checker_and_reads(corpus, records):
    for split in SPLITS:
        path = corpus / f"{split}.jsonl"
        assert check_dataset(path, {"image", "voice"}) == []
        dialogues = list(read_dataset(path))
        assert len(dialogues) == len(records[split])
        for d in dialogues:
            for turn in d.turns:
                for ref in turn.attachments:
                    assert ref.read()


def test_every_category_in_every_split(records):
    for split in SPLITS:
        found = {t["category"] for r in records[split] for t in r["turns"]
                 if t["role"] == "assistant"}
        assert found == CATEGORIES, split
        assert {r["split"] for r in records[split]} == {split}


def test_turn_shapes(records):
    for r in (r for recs in records.values() for r in recs):
        turns = r["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        first = [a["modality"] for a in turns[0]["attachments"]]
        source = r["meta"]["source"]
        if source in ("multi-picture", "refer-back"):
            pictures = [t for t in turns[::2] if t["attachments"]]
            most = 4 if source == "multi-picture" else 3
            assert 2 <= len(pictures) == len(r["meta"]["pictures"]) <= most
            assert all(t["attachments"][0]["modality"] == "image" for t in pictures)
            assert all(t["text"] or len(t["attachments"]) in (1, 2) for t in pictures)
            continue
        if source in ("out-of-domain", "social") and "scene" in r["meta"]:  # after a picture
            assert first == ["image"] and len(turns) >= 4
        else:
            assert first == FIRST_ATTACHMENTS[source]
        if source in ("spoken", "greeting"):
            assert turns[0]["text"] == ""
        for user in turns[2::2]:
            assert user["attachments"] == [] and user["text"]
        for reply in turns[1::2]:
            assert reply["answer"] == reply["answer"].lower()
        if source in ("shapes", "spoken"):
            assert all(t["category"] == "followup" for t in turns[3::2])
            assert len(turns) <= 6


def _half(lo: float, hi: float, size: int) -> str | None:
    gap = scenes.EDGE_GAP * size
    if hi <= size / 2 - gap:
        return "low"
    if lo >= size / 2 + gap:
        return "high"
    return None


def _truth(scene: dict, q: dict) -> str:
    """Answer a question from the scene meta alone, asserting that it is unambiguous."""
    shapes = scene["shapes"]
    if q["type"] == "count":
        return scenes.NUMBERS[len(shapes)]
    key = "colour" if q["type"] == "shape" or q["by_colour"] else "kind"
    [target] = [s for s in shapes if s[key] == q["target"]]
    if q["type"] == "colour":
        return target["colour"]
    if q["type"] == "shape":
        return target["kind"]
    x0, y0, x1, y1 = target["bbox"]
    h = {"low": "left", "high": "right", None: None}[_half(x0, x1, scene["width"])]
    v = {"low": "top", "high": "bottom", None: None}[_half(y0, y1, scene["height"])]
    if q["axis"] == "x":
        assert h
        return h
    if q["axis"] == "y":
        assert v
        return v
    assert bool(h) != bool(v)
    # the shape's centre (of its circumcircle) is near the middle on the other axis
    centre, size = (target["cy"], scene["height"]) if h else (target["cx"], scene["width"])
    assert abs(centre - size / 2) <= scenes.MIDDLE_BAND * size + 0.01
    return h or v


def test_answers_follow_from_the_meta(records):
    checked = 0
    for r in (r for recs in records.values() for r in recs):
        meta = r["meta"]
        for q in meta.get("questions", ()):
            if q["type"] not in scenes.QUESTION_TYPES:
                continue
            scene = meta["pictures"][q["picture"]]["scene"] if "pictures" in meta \
                else meta["scene"]
            reply = r["turns"][q["turn"]]
            assert _truth(scene, q) == q["answer"] == reply["answer"]
            assert q["answer"] in reply["text"].split()
            checked += 1
        if "digit" in meta:
            word = digits.WORDS[meta["digit"]]
            assert r["turns"][1]["answer"] == word
            assert r["turns"][1]["text"] in (f"it is a {word}", f"it is an {word}")
        if meta["source"] == "greeting":
            assert r["turns"][1]["answer"] == speech.GREETINGS[meta["voice"]["text"]]
    assert checked > 100


def scenes_of(meta: dict) -> list[dict]:
    return [p["scene"] for p in meta.get("pictures", ())] + (
        [meta["scene"]] if "scene" in meta else [])


def test_scene_shapes_do_not_overlap_and_fit(records):
    for scene in (sc for recs in records.values() for r in recs for sc in scenes_of(r["meta"])):
        assert scenes.MIN_SIDE <= scene["width"] <= scenes.MAX_SIDE
        assert scenes.MIN_SIDE <= scene["height"] <= scenes.MAX_SIDE
        shapes = scene["shapes"]
        assert 1 <= len(shapes) <= 3
        for i, a in enumerate(shapes):
            assert a["kind"] in scenes.KINDS and a["colour"] in scenes.COLOURS
            x0, y0, x1, y1 = a["bbox"]
            assert x0 >= 0 and y0 >= 0 and x1 <= scene["width"] and y1 <= scene["height"]
            for b in shapes[i + 1:]:
                gap = np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"])
                assert gap >= a["radius"] + b["radius"] - 0.02  # touching at the closest


def _image(attachment: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(attachment["data"])))
    image.load()
    return image


def test_images_decode_and_match_their_scene(records):
    for r in (r for recs in records.values() for r in recs):
        meta = r["meta"]
        images = [a for a in r["turns"][0]["attachments"] if a["modality"] == "image"]
        if not images:
            continue
        image = _image(images[0])
        assert image.mode == "RGB"
        assert image.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[images[0]["mime_type"]]
        if "scene" in meta or "pictures" in meta:
            scene = meta["scene"] if "scene" in meta else meta["pictures"][0]["scene"]
            assert image.size == (scene["width"], scene["height"])
            assert (image.format == "JPEG") == bool(scene["jpeg"])
            if scene["jpeg"]:
                continue  # JPEG smears the colours of small shapes
            pixels = np.asarray(image, np.int16)
            noise = 3 * scene["noise"] if scene["texture"] == "noise" else 0
            for s in scene["shapes"]:
                if s["style"] == "hollow":
                    continue
                centre = pixels[round(s["cy"]), round(s["cx"])]
                assert np.abs(centre - np.asarray(s["rgb"])).max() <= 40 + noise, (r["id"], s)
        else:
            assert image.size == (meta["style"]["size"],) * 2


def test_audio_is_16_khz_mono_ogg_opus(corpus, records):
    clips = {a["path"] for recs in records.values() for r in recs for t in r["turns"]
             for a in t.get("attachments", ()) if a["modality"] == "voice"}
    assert clips
    for rel in clips:
        info = soundfile.info(str(corpus / rel))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (
            16_000, 1, "OGG", "OPUS")
        assert 0.2 < info.duration < 12  # the slowest voices speak 80 words a minute


def test_splits_are_disjoint_in_images_and_voices(records):
    def collect(split: str, key) -> set:
        return {key(r["meta"]) for r in records[split] if key(r["meta"]) is not None}

    seeds = {s: collect(s, lambda m: m.get("image_seed")) for s in SPLITS}
    digit_images = {s: collect(s, lambda m: m.get("style", {}).get("index")) for s in SPLITS}
    voices = {s: collect(s, lambda m: (m["voice"]["name"], m["voice"]["variant"])
                         if "voice" in m else None) for s in SPLITS}
    for held_out in ("valid", "test"):
        assert not seeds[held_out] & seeds["train"]
        assert not digit_images[held_out] & digit_images["train"]
        assert not voices[held_out] & voices["train"]
        train_variants = {v for _, v in voices["train"]}
        assert not {v for _, v in voices[held_out]} & train_variants
    assert not seeds["valid"] & seeds["test"]
    assert not set(speech.VARIANTS["test"]) & set(speech.VARIANTS["train"])
    assert not set(speech.VARIANTS["valid"]) & set(speech.VARIANTS["train"])


def test_held_out_voices_and_seeds_are_documented():
    text = DOCS.read_text(encoding="utf-8")
    for split in ("valid", "test"):
        for name in (*speech.VOICES[split], *speech.VARIANTS[split]):
            assert f"`{name}`" in text, name
    for base in build_module.IMAGE_SEED_BASE.values():
        assert f"{base:,}" in text


def test_default_train_split_has_every_chitchat_conversation():
    convs = chitchat.conversations()
    assert len(convs) > 2000
    assert build_module.DEFAULT_COUNTS["train"].chitchat is None
    planned = build_module._Planner("train", 0).chitchat(None)
    assert len(planned) == len(convs)
    assert {(r["meta"]["file"], r["meta"]["index"]) for r in planned} == {
        (c.file, c.index) for c in convs}


def test_render_draws_the_scene_it_is_given():
    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = scenes.sample_scene(rng)
        image = scenes.render(scene)
        assert image.size == (scene.width, scene.height)
        for q in scenes.askable(scene):
            assert q.answer in scenes.answer_sentence(q).split()


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(speech.SpeechUnavailable, match="apt-get install espeak-ng"):
        build_demo(tmp_path / "out", small=True)
    assert not (tmp_path / "out").exists()


def test_every_training_variant_is_a_voice_espeak_knows():
    """espeak-ng quietly falls back to the plain voice for an unknown ``+variant``, so
    a misspelt or missing variant would only repeat a speaker: each must sound its own."""
    variants = [v for v in speech.VARIANTS["train"] if v]
    renders = {v: speech.synthesize("hello", speech.Voice("en-us", v, 160, 50)).tobytes()
               for v in variants}
    plain = speech.synthesize("hello", speech.Voice("en-us", "", 160, 50)).tobytes()
    assert plain not in renders.values()
    assert len(set(renders.values())) == len(variants)
    held_out = {speech.synthesize("hello", speech.Voice("en-us", v, 160, 50)).tobytes()
                for split in ("valid", "test") for v in speech.VARIANTS[split]}
    assert not held_out & set(renders.values())


def test_accent_features_rewrite_phonemes_in_order():
    said = speech.phonemes("how many shapes are there", "en-us")
    assert said == "h,aU m'Eni S'eIps A@ D'e@"
    assert speech.accent_phonemes(said, ("h-dropping", "th-stopping")) == \
        ",aU m'Eni S'eIps A@ d'e@"
    assert speech.accent_phonemes(said, ("face-monophthong",)) == "h,aU m'Eni S'e:ps A@ D'e@"
    assert speech.accent_phonemes(said, ()) == said


def test_each_accent_feature_changes_how_some_question_sounds():
    """Every feature must match something our questions say, or it is dead weight."""
    texts = ["what colour is the purple circle", "how many shapes are there",
             "where is the yellow triangle", "what digit is this", "good morning",
             "which shape is the green one", "what number is written here"]
    said = [speech.phonemes(t, v) for t in texts for v in speech.VOICES["train"]]
    for name in speech.ACCENT_FEATURES:
        assert any(speech.accent_phonemes(p, (name,)) != p for p in said), name


def test_only_training_clips_are_accented_and_they_sound_different():
    rng = np.random.default_rng(0)
    train = [speech.sample_voice(rng, "train") for _ in range(400)]
    accented = [v for v in train if v.accented]
    assert 0.4 < len(accented) / len(train) < 0.6
    assert all(v.phonemes_from in speech.VOICES["train"] for v in accented)
    assert all(v.accent and set(v.accent) <= set(speech.ACCENT_FEATURES) for v in accented)
    for split in ("valid", "test"):
        assert not any(speech.sample_voice(rng, split).accented for _ in range(200))
    plain = speech.Voice("en-gb-scotland", "m3", 160, 50)
    accent = speech.Voice("en-gb-scotland", "m3", 160, 50, "en-us", ("th-stopping",))
    assert speech.clip_name("where is it", plain) != speech.clip_name("where is it", accent)
    assert accent.to_meta()["accent"] == ["th-stopping"] and "accent" not in plain.to_meta()
    text = "what is there"
    assert speech.synthesize(text, accent).tobytes() != speech.synthesize(text, plain).tobytes()
    assert speech.synthesize(text, accent).tobytes() == speech.synthesize(text, accent).tobytes()


def test_typed_greetings_get_the_spoken_greetings_reply(records):
    typed = [r for recs in records.values() for r in recs
             if r["meta"]["source"] == "typed-greeting"]
    assert {r["split"] for r in typed} == set(SPLITS)
    for r in typed:
        user, reply = r["turns"]
        assert user["attachments"] == [] and r["category"] == "greeting"
        words = build_module._words(user["text"])
        assert words in speech.GREETINGS
        assert (reply["text"], reply["answer"]) == speech.greeting_reply(words)


def test_chitchat_samples_skip_conversations_that_open_with_a_greeting():
    convs = chitchat.conversations()
    opening = [c for c in chitchat.unambiguous(convs)
               if build_module._words(convs[c].utterances[0]) in speech.GREETINGS]
    assert opening  # "Hi" -> "Hello" alone in chatterbot, but a typed greeting now too
    sampled = build_module._Planner("test", 0).chitchat(len(convs))
    assert sampled and all(build_module._words(r["turns"][0]["text"]) not in speech.GREETINGS
                           for r in sampled)
