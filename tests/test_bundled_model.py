"""The bundled model answers from what it sees and hears.

Scenes come from a second renderer (tests/alt_renderer.py) that draws differently from
the demo generator: another canvas size, line width and placement. Speech comes from
espeak-ng voices that training never heard.

The quality targets themselves are measured by `mmchat eval` on the held-out test split
and recorded in docs/model-card.md. These tests hold the bundled model to the level it
reaches on inputs it was never trained on, so a regression shows up here.
"""

import subprocess
from pathlib import Path

import pytest
from alt_renderer import draw_scene

from mmchat import Attachment, Engine
from mmchat.config import from_dict

ROOT = Path(__file__).parent.parent
BUNDLED = ROOT / "mmchat" / "bundled_model"
NUMBER = {1: "one", 2: "two", 3: "three"}

# (shapes on a 3x3 grid as (kind, colour, (col, row)), question, expected answer)
CASES = [
    ([("circle", "red", (0, 1))], "what colour is the circle?", "the circle is red"),
    ([("square", "blue", (2, 1))], "what colour is the square?", "the square is blue"),
    ([("triangle", "yellow", (1, 0))], "what colour is the triangle?",
     "the triangle is yellow"),
    ([("circle", "green", (1, 2)), ("square", "purple", (0, 0))],
     "what colour is the square?", "the square is purple"),
    ([("circle", "orange", (2, 2)), ("triangle", "blue", (0, 0))],
     "what colour is the circle?", "the circle is orange"),
    ([("square", "red", (0, 1)), ("circle", "yellow", (2, 1))],
     "what shape is the yellow one?", "the yellow one is a circle"),
    ([("triangle", "green", (2, 1)), ("square", "orange", (0, 1))],
     "what shape is the green one?", "the green one is a triangle"),
    ([("square", "blue", (1, 1))], "what shape is the blue one?", "the blue one is a square"),
    ([("circle", "purple", (0, 0)), ("triangle", "red", (2, 2)), ("square", "green", (2, 0))],
     "what shape is the purple one?", "the purple one is a circle"),
    ([("circle", "red", (1, 1))], "how many shapes are there?", "there is one shape"),
    ([("circle", "red", (0, 0)), ("square", "blue", (2, 2))], "how many shapes are there?",
     "there are two shapes"),
    ([("circle", "red", (0, 0)), ("square", "blue", (2, 2)), ("triangle", "green", (2, 0))],
     "how many shapes do you see?", "there are three shapes"),
    ([("circle", "blue", (0, 1))], "where is the circle?", "the circle is on the left"),
    ([("square", "yellow", (2, 1))], "where is the square?", "the square is on the right"),
    ([("triangle", "purple", (1, 0))], "where is the triangle?",
     "the triangle is at the top"),
    ([("circle", "orange", (1, 2))], "where is the circle?", "the circle is at the bottom"),
    ([("square", "green", (0, 1)), ("circle", "red", (2, 1))],
     "is the square on the left or on the right?", "the square is on the left"),
]

FOLLOW_UPS = [
    ([("circle", "red", (0, 1)), ("square", "blue", (2, 1))],
     [("what colour is the circle?", "the circle is red"),
      ("and what colour was the square?", "the square is blue"),
      ("and how many shapes were there?", "there are two shapes")]),
    ([("triangle", "yellow", (2, 1))],
     [("how many shapes are there?", "there is one shape"),
      ("and where was the triangle?", "the triangle is on the right")]),
]

#: espeak-ng voice and variant pairs that no training clip used (docs/data.md).
UNHEARD = ["en-029+m7", "en-gb-x-gbcwmd+f5", "en+m8"]


@pytest.fixture(scope="module")
def engine():
    if not (BUNDLED / "model.safetensors").is_file():
        pytest.fail(f"the bundled model is missing from {BUNDLED}")
    config = from_dict({"model": {"checkpoint": str(BUNDLED)}}, env={})
    engine = Engine(config)
    yield engine
    engine.close_sync()


def ask(engine, session, text, attachments=()):
    return engine.reply_sync(session, text, list(attachments)).text.strip()


def png(shapes):
    return Attachment(draw_scene(shapes), "image/png")


def test_answers_questions_about_differently_drawn_scenes(engine):
    wrong = []
    for i, (shapes, question, expected) in enumerate(CASES):
        got = ask(engine, f"scene-{i}", question, [png(shapes)])
        if got != expected:
            wrong.append((question, expected, got))
    assert len(wrong) <= 1, wrong  # 17 of 17 right when the model was bundled


def test_greets_back_when_greeted_in_text(engine):
    """The first thing most people type (docs/data.md, typed greetings)."""
    for i, (text, expected) in enumerate([("hello", "hello! how can i help you?"),
                                          ("Hi there!", "hello! how can i help you?"),
                                          ("Good evening", "good evening! how can i help you?")]):
        assert ask(engine, f"greeting-{i}", text) == expected


def test_follow_up_questions_about_an_earlier_picture(engine):
    right = []
    for i, (shapes, turns) in enumerate(FOLLOW_UPS):
        for j, (question, expected) in enumerate(turns):
            attachments = [png(shapes)] if j == 0 else []
            got = ask(engine, f"follow-{i}", question, attachments)
            if j > 0:
                right.append(got == expected)
    assert all(right), right  # follow-ups carry no picture: the answer is remembered


def test_answers_spoken_questions_in_unheard_voices(engine, tmp_path):
    """Every scene question, asked only in the audio, by three voices training never heard."""
    wrong = []
    for i, (shapes, question, expected) in enumerate(CASES):
        for j, voice in enumerate(UNHEARD):
            wav = tmp_path / f"q{i}-{j}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(wav),
                            question.rstrip("?")], check=True)
            reply = engine.reply_sync(f"spoken-{i}-{j}", "",
                                      [png(shapes), Attachment.from_path(wav)])
            # both reached the memory; the question's words reach the answer through
            # the turn query (what the voice's word head hears), so the decoder may
            # attend to the picture alone
            assert set(reply.attention) == {"image", "voice"}
            if reply.text.strip() != expected:
                wrong.append((voice, question, expected, reply.text.strip()))
    # 49 of the 51 right when the model was bundled (0.950 on the test split's spoken
    # questions); the margin allows for another espeak-ng build's rendering
    assert len(wrong) <= 7, wrong


def test_answers_come_from_the_picture(engine):
    """The same question about two different pictures gets two different answers."""
    a = ask(engine, "a", "what colour is the circle?", [png([("circle", "red", (1, 1))])])
    b = ask(engine, "b", "what colour is the circle?", [png([("circle", "blue", (1, 1))])])
    assert (a, b) == ("the circle is red", "the circle is blue")
