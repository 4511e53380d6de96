"""The tokenizer reads what a user means, whatever their typing habits."""

import pytest

from mmchat.tokenizer import Tokenizer, normalize


@pytest.mark.parametrize("typed, read", [
    ("What colour is the circle ?", "what colour is the circle?"),
    ("is it red??", "is it red?"),
    ("is it red ?!", "is it red?"),
    ("wow !!!", "wow!"),
    ("the circle , please", "the circle, please"),
    ("hi ! how are you ?", "hi! how are you?"),
    ("wait ...", "wait ..."),  # an ellipsis is not one mark
    ("3.5 kg", "3.5 kg"),
    ("x :)", "x :)"),  # a smiley is not a mark ending a word
    ("", ""),
])
def test_typing_habits_are_normalised(typed, read):
    assert normalize(typed) == read


def test_encoding_ignores_a_space_before_the_question_mark():
    tok = Tokenizer.train(["what colour is the circle?", "is it red? yes it is."] * 20,
                          vocab_size=40)
    assert tok.encode("What colour is the circle ?") == tok.encode("what colour is the circle?")
    assert tok.encode("is it red ??") == tok.encode("is it red?")
    assert tok.encode("is it red") != tok.encode("is it red?")


def test_a_tokenizer_learns_its_pieces_from_text_read_the_same_way():
    """Trained on questions typed with a space before "?", the vocabulary has no piece
    for a "?" of its own, which encoding could never produce."""
    tok = Tokenizer.train(["is it red ?", "what is it ?", "where is the blue one ?"] * 20,
                          vocab_size=40)
    pieces = {tok.piece(i) for i in range(tok.vocab_size)}
    assert "▁?" not in pieces and "?" in pieces
