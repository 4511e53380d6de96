"""Corpus v2: every new dialogue kind's answers follow from its ground truth, and the
pictures and voices vary as docs/data.md says."""

from __future__ import annotations

import io
import re

import mmchat_demo.build as build_module
import numpy as np
import pytest
import soundfile
from mmchat_demo import chitchat, digits, questions, scenes, sessions, smalltalk, speech, wording

from mmchat.evaluation import normalize

SPLITS = ("train", "valid", "test")


def every(records, source=None):
    return [r for recs in records.values() for r in recs
            if source is None or r["meta"]["source"] == source]


def test_every_answer_is_in_its_reply_for_exact_scoring(records):
    for r in every(records):
        for turn in r["turns"][1::2]:
            assert f" {normalize(turn['answer'])} " in f" {normalize(turn['text'])} ", r["id"]


def _scene(meta, k=None):
    return meta["pictures"][k]["scene"] if k is not None else meta["scene"]


def _place(scene, s):
    """A caption's place for a shape, from the scene meta alone."""
    def third(c, size, names):
        k = min(2, int(3 * c / size))
        return names[k]
    h = third(s["cx"], scene["width"], ("left", "centre", "right"))
    v = third(s["cy"], scene["height"], ("top", "middle", "bottom"))
    if h == "centre":
        return "in the middle" if v == "middle" else f"at the {v}"
    return f"on the {h}" if v == "middle" else f"at the {v} {h}"


def test_captions_name_every_shape_left_to_right_with_colour_and_place(records):
    found = 0
    for r in every(records):
        for q in r["meta"].get("questions", ()):
            if q["type"] != "caption":
                continue
            scene = _scene(r["meta"], q.get("picture"))
            shapes = sorted(scene["shapes"], key=lambda s: (s["cx"], s["cy"]))
            said = [f"{'an' if s['colour'] == 'orange' else 'a'} {s['colour']} {s['kind']} "
                    f"{_place(scene, s)}" for s in shapes]
            reply = r["turns"][q["turn"]]["text"]
            assert reply == (said[0] if len(said) == 1
                             else ", ".join(said[:-1]) + " and " + said[-1]), r["id"]
            found += 1
    assert found >= 10


def test_a_captioned_pictures_objects_are_its_captions_shapes_in_order(records):
    """The ``objects`` of a picture (the object slots' training target) name its shapes
    left to right as its caption does, without the article."""
    found = 0
    for r in every(records):
        for q in r["meta"].get("questions", ()):
            if q["type"] != "caption" or r["turns"][q["turn"] - 1]["text"]:
                continue  # a picture sent with no words: its caption is the reply
            [image] = r["turns"][q["turn"] - 1]["attachments"]
            reply = r["turns"][q["turn"]]["text"]
            said = [re.sub(r"^an? ", "", part) for part in re.split(r", | and ", reply)]
            assert image["objects"] == said, r["id"]
            found += 1
    assert found >= 10


def _check_yes_no(q, user, reply, shapes):
    """A yes/no question's answer follows from the picture's shapes."""
    if q["form"] == "attribute":
        asked = re.findall(r"\b(" + "|".join(scenes.COLOURS + scenes.KINDS
                                             + ("left", "right")) + r")\b", user)
        assert (asked[-1] == q["truth"]) == q["yes"], (user, q)
    else:
        words = q["target"].split()
        there = any(all(w in (s["colour"], s["kind"], "shape") for w in words)
                    for s in shapes)
        assert there == q["yes"], (q, shapes)
        assert q["target"] in user
    assert reply.startswith("yes, " if q["yes"] else "no, ")


def test_yes_no_answers_match_the_scene(records):
    found = 0
    for r in every(records, "yes-no"):
        for q in r["meta"]["questions"]:
            _check_yes_no(q, r["turns"][q["turn"] - 1]["text"], r["turns"][q["turn"]]["text"],
                          r["meta"]["scene"]["shapes"])
            found += 1
    assert found >= 10


def test_not_there_asks_about_a_kind_or_colour_the_picture_lacks(records):
    for r in every(records, "not-there"):
        shapes = r["meta"]["scene"]["shapes"]
        for q in r["meta"]["questions"]:
            assert q["target"] not in {s["kind"] for s in shapes} | {s["colour"] for s in shapes}
            assert q["target"] in r["turns"][q["turn"] - 1]["text"]
            assert r["turns"][q["turn"]]["text"].startswith(f"there is no {q['target']}")


def test_no_picture_sessions_have_no_picture_and_say_how_to_send_one(records):
    found = every(records, "no-picture")
    assert {r["split"] for r in found} == set(SPLITS)
    for r in found:
        assert all(not t.get("attachments") for t in r["turns"])
        assert r["turns"][-1]["text"] == questions.NO_PICTURE
        assert "attach a picture" in questions.NO_PICTURE


def test_pronoun_follow_ups_resolve_to_the_previous_turns_referent(records):
    found = 0
    for r in every(records, "pronoun"):
        asked = r["meta"]["questions"]
        for prev, q in zip(asked, asked[1:]):
            user = r["turns"][q["turn"] - 1]["text"]
            named = f"{q['target']} one" if q["by_colour"] or q["type"] == "shape" \
                else q["target"]
            if " it" in f" {user}" or user.startswith("and its"):  # a pronoun: same referent
                assert q["referent"] == named
                assert not any(w in user.split() for w in scenes.KINDS + scenes.COLOURS)
            else:  # an ellipsis: the previous question about the shape it names
                assert (q["type"], q["axis"]) == (prev["type"], prev["axis"])
                assert named.split()[0] in user
            assert q["answer"] in r["turns"][q["turn"]]["text"].split()
            found += 1
    assert found >= 5


def _count(scene, kind):
    return sum(s["kind"] == kind for s in scene["shapes"])


def test_multi_picture_sessions_answer_from_the_right_picture(records):
    kinds = {"earlier": 0, "later": 0, "across": 0}
    for r in every(records, "multi-picture"):
        pictures = [p["scene"] for p in r["meta"]["pictures"]]
        images = [t for t in r["turns"][::2] if t["attachments"]]
        shown = -1
        for k, turn in enumerate(r["turns"][::2]):
            if turn["attachments"]:
                shown += 1
            q = next((q for q in r["meta"]["questions"] if q["turn"] == 2 * k + 1), None)
            reply = r["turns"][2 * k + 1]
            if q is None:
                continue
            if reply["category"] == "earlier_picture":
                assert q["picture"] < shown and not turn["attachments"]
                kinds["earlier"] += 1
            elif reply["category"] == "later_picture":
                assert q["picture"] == shown > 0 and turn["attachments"]
                kinds["later"] += 1
            elif reply["category"] == "across_pictures":
                kinds["across"] += 1
                if q["type"] == "which":
                    having = [n for n, p in enumerate(pictures) if _count(p, q["target"])]
                    assert [sessions.ORDINALS[n] for n in having] == [q["answer"]]
                elif q["type"] == "count_all":
                    total = sum(len(p["shapes"]) if q["target"] == "shape"
                                else _count(p, q["target"]) for p in pictures)
                    assert total == q["answer"]
                else:
                    colours = [s["colour"] for p in pictures for s in p["shapes"]
                               if s["kind"] == q["target"]]
                    assert len(colours) == 2 and (colours[0] == colours[1]) == q["answer"]
        assert len(images) == len(pictures)
    assert all(kinds.values()), kinds


def test_picture_sessions_check_the_latest_picture_ask_about_it_and_end_with_goodbyes(
        records):
    found = {"yes_no": 0, "not_there": 0, "after_caption": 0, "goodbye": 0}
    for r in every(records, "multi-picture") + every(records, "pronoun"):
        turns = r["turns"]
        if turns[-1]["category"] == "goodbye":
            assert turns[-1]["text"] == smalltalk.GOODBYE_REPLY
            assert not turns[-2]["attachments"] and len(turns) > 2
            found["goodbye"] += 1
        if r["meta"]["source"] != "multi-picture":
            continue
        pictures = [p["scene"] for p in r["meta"]["pictures"]]
        shown = -1
        for k in range(0, len(turns), 2):
            user, reply = turns[k], turns[k + 1]
            shown += bool(user["attachments"])
            q = next((q for q in r["meta"]["questions"] if q["turn"] == k + 1), None)
            if q is None:
                continue
            shapes = pictures[shown]["shapes"]
            if q.get("form") == "after_caption":  # "what colour is it?" after a caption
                assert turns[k - 1]["category"] == "caption" and len(shapes) == 1
                assert reply["category"] == "pronoun" and q["picture"] == shown
                assert " it" in f" {user['text']}" or user["text"].startswith("and its")
                truth = {"colour": shapes[0]["colour"], "shape": shapes[0]["kind"]}
                assert q["answer"] == truth.get(q["type"], q["answer"])
                assert q["answer"] in reply["text"].split()
                found["after_caption"] += 1
            elif reply["category"] in ("yes_no", "not_there"):  # about the latest picture
                assert q["picture"] == shown and not user["attachments"]
                if reply["category"] == "yes_no":
                    _check_yes_no(q, user["text"], reply["text"], shapes)
                else:
                    assert q["target"] not in {s["kind"] for s in shapes} | {
                        s["colour"] for s in shapes}
                    assert reply["text"].startswith(f"there is no {q['target']}")
                found[reply["category"]] += 1
    assert all(found.values()), found


def test_goodbyes_and_out_of_domain_prompts(records):
    for r in every(records, "goodbye"):
        user, reply = r["turns"][-2:]
        assert build_module._words(user["text"]) == build_module._words(r["meta"]["text"])
        assert (reply["text"], reply["category"]) == (smalltalk.GOODBYE_REPLY, "goodbye")
    prompts = {s: {r["turns"][-2]["text"] for r in recs if r["category"] == "out_of_domain"}
               for s, recs in records.items()}
    assert all(prompts.values())
    assert not prompts["test"] & (prompts["train"] | prompts["valid"])
    said = {build_module._words(u) for c in chitchat.conversations() for u in c.utterances[::2]}
    assert not {build_module._words(p) for ps in prompts.values() for p in ps} & said


def test_out_of_domain_prompts_also_come_after_a_picture(records):
    """Half the out-of-domain prompts follow a question about a picture, answered from
    its scene; the prompt itself still gets the out-of-domain reply."""
    ood = every(records, "out-of-domain")
    after = [r for r in ood if "scene" in r["meta"]]
    assert 0 < len(after) < len(ood)
    for r in after:
        question, answer, prompt, reply = r["turns"]
        assert question["attachments"][0]["modality"] == "image" and not prompt["attachments"]
        assert answer["answer"] == r["meta"]["questions"][0]["answer"]
        assert (reply["text"], reply["category"]) == (smalltalk.OUT_OF_DOMAIN_REPLY,
                                                      "out_of_domain")


def test_thanks_ok_and_help_are_not_goodbyes_or_questions(records):
    """Social turns get their own reply at the start of a chat and after a picture, and a
    question about the picture after one is answered from the picture."""
    replies = {smalltalk.THANKS_REPLY: smalltalk.social_phrases("thanks"),
               smalltalk.HELP_REPLY: smalltalk.social_phrases("help"),
               smalltalk.ACKNOWLEDGEMENT_REPLY: smalltalk.social_phrases("ack")}
    seen = set()
    for r in every(records, "social"):
        turns = r["turns"]
        at = 2 if "scene" in r["meta"] else 0
        user, reply = turns[at: at + 2]
        said = build_module._words(user["text"])
        if reply["category"] == "greeting":
            assert reply["text"].endswith("! how can i help you?")
        else:
            assert reply["category"] == "social"
            assert said in {build_module._words(p) for p in replies[reply["text"]]}
            assert said not in {build_module._words(g) for g in smalltalk.GOODBYES}
        seen.add((reply["text"], at > 0))
        for q, turn in zip(r["meta"].get("questions", [])[1:], turns[at + 3::2]):
            assert turn["answer"] == q["answer"] and q["turn"] == at + 3
    assert {(t, after) for t in replies for after in (False, True)} <= seen


def test_the_test_split_has_a_hundred_out_of_domain_prompts():
    rng = np.random.default_rng(0)
    assert build_module.DEFAULT_COUNTS["test"].out_of_domain == 100
    assert len(smalltalk.out_of_domain("test", 100, rng)) == 100


def test_font_digits_are_typeset_in_the_splits_own_fonts(records):
    found = every(records, "font-digits")
    if not digits.fonts():
        assert not found  # a machine without fonts builds none
        return
    assert {r["split"] for r in found} == set(SPLITS)
    train = {f.rsplit("/", 1)[-1] for f in digits.split_fonts("train")}
    for r in found:
        assert r["turns"][1]["answer"] == digits.WORDS[r["meta"]["digit"]]
        if r["split"] == "test" and len(digits.fonts()) >= 5:
            assert r["meta"]["style"]["font"] not in train


def test_font_digit_renders_the_digit_in_both_polarities():
    rng = np.random.default_rng(3)
    styles = [digits.sample_font_style(rng, "train") for _ in range(40)]
    if styles[0] is None:
        pytest.skip("no TrueType fonts on this machine")
    dark = [s for s in styles if sum(s.ink) < sum(s.paper)]
    assert 0 < len(dark) < len(styles)
    for s in styles[:10]:
        pixels = np.asarray(digits.render_font(s), np.float32)
        ink = np.abs(pixels - np.asarray(s.paper)).max(axis=2) > 60
        assert 0.02 < ink.mean() < 0.6, s  # a glyph, neither empty nor a blot


def test_scenes_vary_as_people_take_pictures():
    rng = np.random.default_rng(7)
    sampled = [scenes.sample_scene(rng) for _ in range(600)]
    ratios = [max(s.width, s.height) / min(s.width, s.height) for s in sampled]
    assert max(ratios) > 2.6 and sum(r > 1.7 for r in ratios) > 60
    assert any(s.width > s.height * 1.7 for s in sampled)
    assert any(s.height > s.width * 1.7 for s in sampled)
    values = [max(s.background) for s in sampled]
    assert min(values) < 30 and sum(100 <= v <= 130 for v in values) > 5
    assert sum(s.jpeg > 0 for s in sampled) > 60
    assert sum(s.texture == "noise" and s.noise > 10 for s in sampled) > 20
    close = [s for s in sampled if s.layout == "close"]
    assert len(close) > 80
    gaps = [np.hypot(a.cx - b.cx, a.cy - b.cy) - a.radius - b.radius
            for s in close for a, b in zip(s.shapes, s.shapes[1:])]
    assert sum(g <= scenes.CLOSE_GAP * 160 for g in gaps) > len(gaps) / 3


def test_noise_is_mixed_at_the_asked_snr():
    clean = speech.synthesize("how many shapes are there", speech.Voice("en-us", "", 160, 50))
    for kind in speech.NOISES:
        for snr in (0, 10, 20):
            noisy = speech.add_noise(clean, kind, snr, seed=1)
            scale = np.dot(noisy, clean) / np.dot(clean, clean)  # undo the anti-clipping gain
            noise = noisy / scale - clean
            measured = 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))
            assert abs(measured - snr) < 0.5, (kind, snr, measured)
            assert np.abs(noisy).max() <= 0.95 + 1e-6


def test_voices_speak_from_80_to_320_words_a_minute_and_half_are_noisy():
    rng = np.random.default_rng(0)
    voices = [speech.sample_voice(rng, "test") for _ in range(400)]
    assert {v.speed for v in voices} >= {80, 320}
    noisy = [v for v in voices if v.noise]
    assert 0.4 < len(noisy) / len(voices) < 0.6
    assert {v.snr for v in noisy} >= {0, 5, 10, 20}


def test_ogg_clips_are_byte_identical_for_the_same_audio(tmp_path):
    voice = speech.Voice("en-us", "m3", 200, 50, noise="pink", snr=5)
    a, b = tmp_path / "a" / "x.ogg", tmp_path / "b" / "x.ogg"
    speech.write_clip(a, "is there a triangle", voice)
    speech.write_clip(b, "is there a triangle", voice)
    assert a.read_bytes() == b.read_bytes()
    samples, rate = soundfile.read(io.BytesIO(a.read_bytes()))
    assert rate == 16_000 and len(samples) > 0.3 * rate


def test_a_machine_without_fonts_builds_no_font_digits(monkeypatch):
    monkeypatch.setattr(digits, "fonts", lambda: ())
    planner = build_module._Planner("test", 0)
    assert sessions.font_digit(planner, 0) is None
    plan = planner.plan(build_module.SMALL_COUNTS["test"])
    assert plan and not [r for r in plan if r["category"] == "digit_font"]


def test_a_missing_or_broken_font_file_is_skipped(tmp_path):
    broken = tmp_path / "broken.ttf"
    broken.write_bytes(b"not a font")
    assert not digits._draws_digits(str(broken))
    assert not digits._draws_digits(str(tmp_path / "missing.ttf"))


def test_after_a_question_about_it_the_ellipsis_asks_an_earlier_one_shape_picture():
    """"what colour is it?" (the latest picture's one shape), then "and the first one?":
    the same question about the earlier picture's one shape, whatever its kind."""
    planner = build_module._Planner("train", 0)
    found = 0
    for i in range(600):
        r = sessions.multi_picture(planner, i)
        pictures = [p["scene"] for p in r["meta"]["pictures"]]
        qs = {q["turn"]: q for q in r["meta"]["questions"]}
        for turn, q in qs.items():
            prev = qs.get(turn - 2)
            if not (q.get("form") == "ellipsis" and prev and prev.get("form") == "after_caption"
                    and prev["target"] != q["target"]):
                continue
            [shape] = pictures[q["picture"]]["shapes"]
            assert q["target"] in (shape["kind"], shape["colour"])  # it names the shape
            assert (q["type"], q["axis"]) == (prev["type"], prev["axis"])
            truth = {"colour": shape["colour"], "shape": shape["kind"]}
            assert q["answer"] == truth.get(q["type"], q["answer"])
            assert q["answer"] in r["turns"][turn]["text"].split()
            found += 1
    assert found >= 3


def test_refer_back_asks_it_of_the_latest_then_the_same_of_an_earlier_picture(records):
    """"what colour is it?" about the latest one-shape picture, then "and the first
    one?": the same question about that earlier picture, answered with its own shape."""
    other_kind = 0
    found = every(records, "refer-back")
    assert found
    for r in found:
        assert r["category"] == "refer_back"
        pictures = [p["scene"] for p in r["meta"]["pictures"]]
        assert all(len(p["shapes"]) == 1 for p in pictures) and 2 <= len(pictures) <= 3
        qs = {q["turn"]: q for q in r["meta"]["questions"]}
        it = next(q for q in qs.values() if q.get("form") == "it")
        back = next(q for q in qs.values() if q.get("form") == "ellipsis")
        assert back["turn"] == it["turn"] + 2
        assert it["picture"] == len(pictures) - 1 and back["picture"] < it["picture"]
        assert (it["type"], it["axis"]) == (back["type"], back["axis"])
        latest, earlier = pictures[-1]["shapes"][0], pictures[back["picture"]]["shapes"][0]
        reply = normalize(r["turns"][back["turn"]]["text"])
        assert r["turns"][back["turn"]]["category"] == "earlier_picture"
        if back["type"] == "colour":
            assert reply == f"the {earlier['kind']} is {earlier['colour']}"
        other_kind += earlier["kind"] != latest["kind"]
    assert other_kind > len(found) / 3


def test_articles_agree_with_the_word_after_them(records):
    """"an orange shape", never "a orange shape", in questions and replies alike (and
    "an eight", "a one": the sound decides)."""
    wrong = re.compile(r"\b(a (orange|eight)|an (red|green|blue|yellow|purple|circle|"
                       r"square|triangle|shape|one|two|three|four|five|six|seven|nine|zero))\b")
    seen_an = 0
    for r in every(records):
        for turn in r["turns"]:
            assert not wrong.search(turn["text"]), (r["id"], turn["text"])
            seen_an += " an orange " in f" {turn['text']} "
    assert seen_an


def test_typed_questions_also_say_image_photo_or_pic(records):
    """A share of the picture dialogues' typed questions call a picture an image, a photo
    or a pic, or the previous one "the one before"; replies and chit-chat never change."""
    said = " ".join(t["text"] for r in every(records) for t in r["turns"]
                    if t["role"] == "user")
    for word in ("image", "photo", "pic"):
        assert re.search(rf"\b{word}\b", said), word
    for r in every(records):
        for t in r["turns"]:
            if t["role"] == "assistant" or r["meta"]["source"] in ("chitchat", "ood"):
                assert not re.search(r"\b(images?|photos?|pics?)\b", t["text"]), (r["id"], t)


def test_varied_words_keep_the_question():
    rng = np.random.default_rng(0)
    seen = {wording.vary("which picture has the circle? and the previous one?", rng)
            for _ in range(200)}
    assert "which picture has the circle? and the previous one?" in seen
    assert "which photo has the circle? and the one before?" in seen
    assert all(s.startswith("which ") and s.endswith("?") for s in seen)
    assert wording.vary("what colour is the circle?", rng) == "what colour is the circle?"


def test_typed_questions_are_also_asked_politely_or_indirectly(records):
    """A share of the picture dialogues' typed questions are asked another way ("could
    you tell me ...", "i'd like to know ..."); out-of-domain prompts ask politely too."""
    said = [t["text"] for r in every(records) for t in r["turns"]
            if t["role"] == "user" and r["meta"]["source"] not in ("chitchat", "out-of-domain")]
    reworded = [s for s in said if re.search(r"could you|i'd like to know|do you know", s)]
    assert reworded and len(reworded) < len(said) / 4
    ood = smalltalk.out_of_domain("train", 300, np.random.default_rng(0))
    assert any(s.startswith(("could you", "do you know", "i'd like")) for s in ood)


@pytest.mark.parametrize("question, fragment, lead", [
    ("what colour is the circle?", "the circle", ""),
    ("in the first picture, what colour is the circle?", "the circle", "in the first picture, "),
    ("what colour is the square in the previous picture?", "square in the previous picture",
     ""),
    ("what shape is the red one?", "red", ""),
    ("how many shapes are there?", "shapes", ""),
    ("how many shapes are in the first picture?", "the first picture", ""),
    ("is there an orange triangle?", "an orange triangle", ""),
    ("is the circle coloured red?", "red", ""),
    ("is the red one a circle?", "circle", ""),
    ("is the square on the left side?", "left", ""),
    ("where can you see the triangle?", "the triangle", ""),
    ("describe this image.", "", ""),
])
def test_a_reworded_question_asks_the_same_thing(question, fragment, lead):
    rng = np.random.default_rng(0)
    seen = {wording.rephrase(question, rng, share=1.0) for _ in range(100)}
    assert question not in seen and len(seen) >= 3
    for text in seen:
        assert text.startswith(lead) and fragment in text, text
        assert text.endswith(("?", ".")) and "{" not in text, text


def test_questions_it_does_not_know_are_left_as_they_are():
    rng = np.random.default_rng(0)
    for text in ("which picture has the circle?", "and what colour was the square?",
                 "tell me a joke.", "how are you?", "is the circle red or blue?"):
        assert wording.rephrase(text, rng, share=1.0) == text


def test_is_there_asked_again_of_an_earlier_picture(records):
    """"is there a triangle?" then "and the first one?": the reply is about that picture."""
    found = {"refer-back": 0, "multi-picture": 0}
    for r in every(records):
        if r["meta"]["source"] not in found:
            continue
        for q in r["meta"]["questions"]:
            if q.get("form") != "ellipsis" or q.get("type") != "yes_no":
                continue
            found[r["meta"]["source"]] += 1
            scene = r["meta"]["pictures"][q["picture"]]["scene"]
            shapes = {(s["colour"], s["kind"]) for s in scene["shapes"]}
            words = q["target"].split()
            if len(words) == 1:
                present = any(k == words[0] for _, k in shapes)
            elif words[1] == "shape":
                present = any(c == words[0] for c, _ in shapes)
            else:
                present = tuple(words) in shapes
            reply = r["turns"][q["turn"]]
            assert reply["category"] == "earlier_picture"
            assert reply["text"].startswith("yes" if present else "no"), (r["id"], q, scene)
            assert q["target"] in reply["text"]
    assert all(found.values()), found


def test_yes_no_about_an_attribute_asks_about_each_attribute_as_often():
    """The side is askable of fewer shapes than the colour or the kind, yet is asked
    about as often: the attribute is drawn first, then the shape."""
    rng = np.random.default_rng(3)
    for _ in range(1000):
        scene = scenes.sample_scene(rng)
        options = [q.type for q in scenes.askable(scene) if q.type in ("colour", "shape")
                   or (q.type == "position" and q.axis == "x" and not q.by_colour)]
        if options.count("position") == 1 and len(options) >= 5:
            break
    else:
        pytest.fail("no scene with one side question among five or more")
    asked = [questions.ask_yes_no(scene, rng).meta for _ in range(900)]
    about = [m["question"] for m in asked if m["form"] == "attribute"]
    assert 0.25 < about.count("position") / len(about) < 0.42, about.count("position")
