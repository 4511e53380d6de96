"""The bundled model v2 (issue 12): several pictures, follow-ups, yes/no, captions,
refusals, goodbyes and the fallback, and pictures and speech as people make them.

Pictures come from the second renderer (tests/alt_renderer.py), speech from espeak-ng
voices training never heard. Each test is one dialogue kind of corpus v2 (docs/data.md)
and holds the model a few points under the issue's target for it; the replies are
scored as `mmchat eval` scores exact answers: the key words must appear in the reply.

The kinds the bundled model does not yet reach are not tested here; docs/model-card.md
lists them with their rates (questions across pictures, captions, three shapes 2% apart,
the shape named in the scripted conversation's replies).
"""

import itertools
import subprocess
from pathlib import Path

import pytest
import test_bundled_model
from alt_renderer import font_digit, noisy_speech, picture

from mmchat import Attachment
from mmchat.evaluation import normalize

engine = test_bundled_model.engine  # the same Engine fixture over models/bundled

KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
#: A shape's place on the default 120 px canvas, as (x, y) fractions: left, middle, right.
LEFT, MIDDLE, RIGHT = (0.2, 0.5), (0.5, 0.5), (0.8, 0.5)
FONTS = [p for p in ("/usr/share/fonts/truetype/freefont/FreeSans.ttf",
                     "/usr/share/fonts/truetype/liberation/LiberationSerif-Italic.ttf",
                     "/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf",
                     "/usr/share/fonts/truetype/liberation/LiberationSansNarrow-Regular.ttf")
         if Path(p).is_file()]


def say(engine, session, text, attachments=()):
    return engine.reply_sync(session, text, list(attachments))


def ask(engine, session, text, attachments=()):
    return say(engine, session, text, attachments).text.strip()


def has(reply: str, key: str) -> bool:
    return f" {normalize(key)} " in f" {normalize(reply)} "


def scene(*shapes, **style):
    """Attachment of shapes given as (kind, colour, (x, y)), half-width 0.12."""
    data, mime = picture([(k, c, x, y, 0.12) for k, c, (x, y) in shapes], **style)
    return Attachment(data, mime)


def rate(results) -> float:
    results = list(results)
    return sum(results) / len(results)


# pairs of one-shape pictures with different kinds and colours
PAIRS = [((k1, c1), (k2, c2)) for (k1, k2), (c1, c2) in zip(
    itertools.permutations(KINDS, 2), itertools.combinations(COLOURS, 2))]


def test_questions_about_the_second_picture_are_answered_from_it(engine):
    """Both pictures could answer the question; the latest one must."""
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"later-{i}"
        if i % 2:
            ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, MIDDLE))])
            got = ask(engine, s, f"what colour is the {k1}?", [scene((k1, c2, MIDDLE))])
            right.append(has(got, c2))
        else:
            ask(engine, s, "how many shapes are there?",
                [scene((k2, c2, LEFT), (k1, c1, RIGHT))])
            got = ask(engine, s, f"what shape is the {c1} one?", [scene((k2, c1, MIDDLE))])
            right.append(has(got, k2))
    assert rate(right) >= 0.9, right  # issue target: 95%


def test_earlier_pictures_by_reference(engine):
    right = []
    refs = ["in the first picture, what colour is the {k}?", "and the first one?",
            "what colour is the {k} in the previous picture?",
            "what about the other picture? what colour is the {k}?"]
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"earlier-{i}"
        ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, MIDDLE))])
        ask(engine, s, f"what colour is the {k2}?", [scene((k2, c2, MIDDLE))])
        question = refs[i % len(refs)]
        if question == "and the first one?":  # the last question again, about picture 1
            ask(engine, s, "what colour is it?")
        right.append(has(ask(engine, s, question.format(k=k1)), c1))
    assert rate(right) >= 0.85, right  # issue target: 95% for a later picture


def test_other_words_for_a_picture(engine):
    """Questions that call a picture an image, a photo or a pic, and "the one before"."""
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 4):
        word = ("image", "photo", "pic")[i % 3]
        s = f"words-{i}"
        ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, MIDDLE))])
        ask(engine, s, f"what colour is the {k2}?", [scene((k2, c2, MIDDLE))])
        question, key = [(f"in the first {word}, what colour is the {k1}?", c1),
                         ("what about the one before?", c1),
                         (f"which {word} has the {k1}?", "first")][i % 3]
        right.append(has(ask(engine, s, question), key))
        missing = next(k for k in KINDS if k not in (k1, k2))
        question, key = [(f"is there a {missing} in the {word}?", "no"),
                         (f"does the {word} have a {c1} {k1}?", "yes"),
                         (f"how many shapes are in the {word}?", "two")][i % 3]
        got = ask(engine, f"{s}-one", question, [scene((k1, c1, LEFT), (k2, c2, RIGHT))])
        right.append(normalize(got).startswith(key) if key in ("yes", "no") else has(got, key))
    assert rate(right) >= 0.85, right


def test_questions_asked_politely_or_indirectly(engine):
    """"could you tell me ...", "i'd like to know ...", and wordings training never had
    ("any idea ...", "would you mind ..."): the same answers as the plain question."""
    right = []
    for i, (((k1, c1), (k2, c2)), form) in enumerate(itertools.product(PAIRS, range(6))):
        missing = next(k for k in KINDS if k not in (k1, k2))
        question, key = [
            (f"could you tell me what colour the {k2} is?", c2),
            (f"any idea what shape the {c1} one is?", k1),
            ("could you count the shapes for me?", "two"),
            (f"would you mind telling me where the {k1} is?", "left"),
            (f"i'd like to know if there is a {missing}.", "no"),
            (f"do you know if there is a {k2}?", "yes"),
        ][form]
        got = ask(engine, f"polite-{i}", question, [scene((k1, c1, LEFT), (k2, c2, RIGHT))])
        right.append(normalize(got).startswith(key) if key in ("yes", "no") else has(got, key))
    assert rate(right) >= 0.85, right


def test_pronoun_and_ellipsis_follow_ups(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"pronoun-{i}"
        pic = scene((k1, c1, LEFT), (k2, c2, RIGHT))
        if i % 3 == 0:
            ask(engine, s, f"what shape is the {c1} one?", [pic])
            right.append(has(ask(engine, s, "where is it?"), "left"))
            right.append(has(ask(engine, s, f"what about the {c2} one?"), "right"))
        elif i % 3 == 1:
            ask(engine, s, f"where is the {k2}?", [pic])
            right.append(has(ask(engine, s, "and its colour?"), c2))
        else:
            ask(engine, s, f"what colour is the {k1}?", [pic])
            right.append(has(ask(engine, s, f"and the {k2}?"), c2))
    assert rate(right) >= 0.9, right  # issue target: 95%


def test_yes_no_and_existence(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"yesno-{i}"
        pic = [scene((k1, c1, LEFT), (k2, c2, RIGHT))]
        missing = next(k for k in KINDS if k not in (k1, k2))
        cases = [(f"is there a {k1}?", "yes"), (f"is there a {missing}?", "no"),
                 (f"is the {k1} {c1}?", "yes"), (f"is the {k2} {c1}?", "no")]
        question, expected = cases[i % 4]
        got = ask(engine, s, question, pic)
        right.append(normalize(got).startswith(expected))
    assert rate(right) >= 0.9, right  # issue target: 95%


def test_typing_habits_do_not_change_the_answer(engine):
    """A space before the question mark, doubled marks, capitals and American spelling
    get the answers the tidy question gets."""
    one = [scene(("circle", "purple", LEFT))]
    two = [scene(("circle", "red", LEFT), ("square", "blue", RIGHT))]
    cases = [(two, "What colour is the circle ?", "red"),
             (two, "what color is the square??", "blue"),
             (two, "IS THE CIRCLE RED ?", "yes"), (two, "is there a triangle ??", "no"),
             (one, "is there a square ??", "no"), (two, "how many shapes are there ?", "two"),
             (two, "where is the square ?", "right")]
    for i, (pic, question, key) in enumerate(cases):
        got = ask(engine, f"typing-{i}", question, pic)
        assert has(got, key), (question, got)


def test_is_there_an_orange_shape(engine):
    """The article a user writes before "orange" ("is there an orange shape?") asks the
    same as any other colour: yes when one of the two shapes is orange, else no."""
    right = []
    others = [c for c in COLOURS if c != "orange"]
    for i, (kind, colour) in enumerate(itertools.product(KINDS, others)):
        s = f"orange-{i}"
        other = next(k for k in KINDS if k != kind)
        yes = i % 2 == 0
        pic = [scene((kind, "orange" if yes else colour, LEFT), (other, colour, RIGHT))]
        question = ("is there an orange shape?", f"is there an orange {kind}?")[i % 3 == 0]
        got = ask(engine, s, question, pic)
        right.append(normalize(got).startswith("yes" if yes else "no"))
    assert rate(right) >= 0.9, right  # issue target for yes/no: 95%


def test_says_when_there_is_no_picture(engine):
    for i, question in enumerate(["what colour is the circle?", "how many shapes are there?",
                                  "describe the picture.", "is there a triangle?",
                                  "what digit is this?"]):
        got = ask(engine, f"nopic-{i}", question)
        assert has(got, "no picture"), (question, got)  # issue target: 100%


def test_says_when_a_shape_is_not_there(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        missing = next(k for k in KINDS if k not in (k1, k2))
        got = ask(engine, f"absent-{i}", f"what colour is the {missing}?",
                  [scene((k1, c1, LEFT), (k2, c2, RIGHT))])
        right.append(has(got, f"no {missing}"))
    assert rate(right) >= 0.9, right  # issue target: 95%


BACKGROUNDS = [dict(background=(115, 115, 115)), dict(background=(10, 10, 10)),
               dict(background=(255, 255, 255)), dict(background=(60, 70, 90)),
               dict(background=(250, 235, 215), fade_to=(90, 90, 90)),
               dict(background=(200, 200, 200), noise=30, seed=3),
               dict(background=(140, 150, 140), jpeg=40)]


def test_any_background_tint_or_noise(engine):
    right = []
    for i, (style, ((k1, c1), (k2, c2))) in enumerate(itertools.product(BACKGROUNDS, PAIRS)):
        pic = [scene((k1, c1, LEFT), (k2, c2, RIGHT), **style)]
        if i % 2:
            right.append(has(ask(engine, f"bg-{i}", f"what colour is the {k1}?", pic), c1))
        else:
            right.append(has(ask(engine, f"bg-{i}", "how many shapes are there?", pic), "two"))
    assert rate(right) >= 0.9, right  # issue target: 95%


def test_wide_and_tall_pictures(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        size = (192, 108) if i % 2 else (108, 192)
        x1, y1, x2, y2 = (0.25, 0.5, 0.75, 0.5) if i % 2 else (0.5, 0.25, 0.5, 0.75)
        data, mime = picture([(k1, c1, x1, y1, 0.09), (k2, c2, x2, y2, 0.09)], size=size)
        got = ask(engine, f"aspect-{i}", f"what colour is the {k2}?", [Attachment(data, mime)])
        right.append(has(got, c2))
    assert rate(right) >= 0.9, right  # issue target: 95%


@pytest.mark.skipif(not FONTS, reason="none of the test fonts is installed")
def test_font_digits(engine):
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    right = []
    for i, (font, digit) in enumerate(itertools.product(FONTS, range(10))):
        data = font_digit(digit, font, side=(56, 72, 90)[i % 3], light_on_dark=i % 4 == 0)
        got = ask(engine, f"font-{i}", "what digit is this?", [Attachment(data, "image/png")])
        right.append(has(got, words[digit]))
    assert rate(right) >= 0.85, right  # issue target: 90%


@pytest.mark.parametrize("snr, target", [(10, 0.9), (5, 0.8)])
def test_spoken_questions_in_noise(engine, tmp_path, snr, target):
    """Issue targets: 95% at 10 dB SNR, 85% at 5 dB."""
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        voice = ("en-029+m7", "en-gb-x-gbcwmd+f5", "en+m8")[i % 3]
        question = f"what colour is the {k1}" if i % 2 else f"what shape is the {c2} one"
        clean, noisy = tmp_path / f"{i}.wav", tmp_path / f"{i}-noisy.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(120 + 20 * (i % 6)),
                        "-w", str(clean), question], check=True)
        noisy_speech(clean, noisy, snr, seed=i)
        got = say(engine, f"noisy-{snr}-{i}", "", [scene((k1, c1, LEFT), (k2, c2, RIGHT)),
                                                   Attachment.from_path(noisy)]).text
        right.append(has(got, c1 if i % 2 else k2))
    assert rate(right) >= target, right


def test_goodbye_gets_a_short_goodbye(engine):
    for i, text in enumerate(["bye", "Goodbye!", "see you later", "ok bye"]):
        got = say(engine, f"bye-{i}", text)
        assert has(got.text, "goodbye") and got.finish_reason == "stop", got.text
        assert len(got.text.split()) <= 8


OUT_OF_DOMAIN = ["tell me a joke", "what's the weather in rome tomorrow?",
                 "can you book me a train to leeds?", "write a limerick about cheese",
                 "what is 17 times 23?", "who will win the next election?",
                 "how do i unclog a sink?", "translate 'good luck' into dutch",
                 "recommend me a podcast", "what is the capital of peru?"]


def sees_the_fallback(got) -> bool:
    """The engine's fallback, or the model's own "can't help"."""
    return bool(getattr(got, "fallback", False)) or has(got.text, "can't help")


def test_out_of_domain_prompts_get_the_fallback_and_nothing_loops(engine):
    fell_back = []
    for i, text in enumerate(OUT_OF_DOMAIN):
        got = say(engine, f"ood-{i}", text)
        assert got.finish_reason == "stop", (text, got.text)  # no reply runs to the limit
        fell_back.append(sees_the_fallback(got))
    assert rate(fell_back) >= 0.8, fell_back  # issue target: 90%


#: Out-of-domain prompts asked after a question about a picture (none is a corpus template).
AFTER_A_PICTURE = ["what's the capital of chile?", "can you order me a pizza?",
                   "how many moons does mars have?", "what colour is a polar bear?",
                   "where is the louvre?", "write a song about the rain",
                   "do you like jazz?", "how do i change a tyre?",
                   "is there a bus to the airport?", "why is the sky blue?",
                   "what's 12 times 12?", "who painted the sistine chapel?"]


def test_out_of_domain_prompts_after_a_picture_get_the_fallback(engine):
    """A picture in the chat does not make every later prompt a question about it."""
    fell_back = []
    for i, text in enumerate(AFTER_A_PICTURE):
        (k1, c1), (k2, c2) = PAIRS[i % len(PAIRS)]
        s = f"ood-after-{i}"
        ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, LEFT), (k2, c2, RIGHT))])
        got = say(engine, s, text)
        assert got.finish_reason == "stop", (text, got.text)
        fell_back.append(sees_the_fallback(got))
    assert rate(fell_back) >= 0.8, fell_back  # issue target: 90%


def test_a_question_after_thanks_or_ok_is_answered_from_the_picture(engine):
    """"thanks", "ok" or "what can you do?" between two questions about a picture do not
    end the conversation about it: the next question is answered from the picture. The
    phrases are not the corpus's. (The replies to the phrases themselves are right about
    one time in three; docs/model-card.md gives the rates.)"""
    said = ["thank you, that helps", "thank you very much", "superb, thank you",
            "right, cool", "i see now", "what are you able to do?",
            "what kind of questions can i ask?", "hello again"]
    after = []
    for i, text in enumerate(said * 2):
        (k1, c1), (k2, c2) = PAIRS[i % len(PAIRS)]
        s = f"social-after-{i}"
        ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, LEFT), (k2, c2, RIGHT))])
        ask(engine, s, text)
        after.append(has(ask(engine, s, f"and what colour is the {k2}?"), c2))
    assert rate(after) >= 0.9, after


def test_a_goodbye_after_pictures_is_still_a_goodbye(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"bye-after-{i}"
        ask(engine, s, f"what colour is the {k1}?", [scene((k1, c1, MIDDLE))])
        if i % 2:
            ask(engine, s, "", [scene((k2, c2, LEFT))])
        got = say(engine, s, ["bye", "thanks, goodbye", "ok bye!", "see you later"][i % 4])
        right.append(has(got.text, "goodbye") and len(got.text.split()) <= 8)
    assert rate(right) >= 0.9, right


def test_the_scripted_conversation_of_issue_12(engine):
    """A red circle, then a blue square, each sent without words; then "what colour is
    it?", "and the first one?", "is there a triangle?" and "bye" (issue 12, "Done
    means"): the square is blue, the circle (not the square) is red, no triangle, a
    goodbye."""
    for n, where in enumerate((MIDDLE, LEFT, (0.7, 0.3))):
        s = f"scripted-{n}"
        assert has(ask(engine, s, "", [scene(("circle", "red", where))]), "red")
        assert has(ask(engine, s, "", [scene(("square", "blue", where))]), "blue")
        colour = ask(engine, s, "what colour is it?")
        assert has(colour, "blue") and not has(colour, "red"), colour
        first = ask(engine, s, "and the first one?")
        assert has(first, "the circle is red"), first
        assert normalize(ask(engine, s, "is there a triangle?")).startswith("no")
        assert has(ask(engine, s, "bye"), "goodbye")


def test_and_the_first_one_names_the_earlier_pictures_own_shape(engine):
    """After two one-shape pictures sent without words and "what colour is it?", "and
    the first one?" answers about the first picture: its colour and its own kind, not
    the latest picture's."""
    right = []
    pairs = [((k1, c1), (k2, c2)) for k1, k2 in itertools.permutations(KINDS, 2)
             for c1, c2 in itertools.permutations(COLOURS, 2)][::5]  # 36 of the 180
    for i, ((k1, c1), (k2, c2)) in enumerate(pairs):
        s = f"first-one-{i}"
        where = (MIDDLE, LEFT, RIGHT)[i % 3]
        ask(engine, s, "", [scene((k1, c1, where))])
        ask(engine, s, "", [scene((k2, c2, where))])
        ask(engine, s, "what colour is it?")
        reply = ask(engine, s, "and the first one?")
        right.append(has(reply, f"the {k1} is {c1}"))
    assert rate(right) >= 0.9, right  # issue target: 95% (v2f: 10 of 36)


def test_is_there_a_shape_after_two_pictures_asks_the_latest(engine):
    right = []
    for i, ((k1, c1), (k2, c2)) in enumerate(PAIRS * 2):
        s = f"latest-yesno-{i}"
        ask(engine, s, "", [scene((k1, c1, MIDDLE))])
        ask(engine, s, f"what colour is the {k2}?", [scene((k2, c2, MIDDLE))])
        missing = next(k for k in KINDS if k not in (k1, k2))
        question, expected = ((f"is there a {k2}?", "yes") if i % 2
                              else (f"is there a {missing}?", "no"))
        right.append(normalize(ask(engine, s, question)).startswith(expected))
    assert rate(right) >= 0.9, right  # issue target for yes/no: 95%
