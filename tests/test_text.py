import pytest

from mmasr.data.ingest import clean_text, has_words
from mmasr.data.text import normalise, strip_punctuation


@pytest.mark.parametrize("raw, norm", [
    ("Um, a RED red bear... you know", "a red bear"),
    ("Cafe\u0301 CAFÉ crème", "café crème"),            # combining accent = precomposed; repeat collapsed
    ("don\u2019t stop", "don't stop"),                  # typographic apostrophe
    ("uh-huh, a bear", "a bear"),                       # hyphenated filler
    ("rock-'n'-roll", "rock n roll"),                  # ' and - only between word characters
    ("नमस्ते, नमस्ते दुनिया!", "नमस्ते दुनिया"),              # Devanagari: vowel signs and virama stay in the word
    ("你好，世界。", "你好 世界"),                         # CJK punctuation
    ("Ça va?  Très bien!", "ça va très bien"),
    ("the-bear bear", "the-bear bear"),                 # different words, not a repeat
    ("?! ... --", ""),
])
def test_normalise_any_script(raw, norm):
    assert normalise(raw) == norm


def test_strip_punctuation_keeps_word_characters_of_any_script():
    assert strip_punctuation("x_y $5 'q' a-b") == "x_y  5  q  a-b"
    assert strip_punctuation("مَرْحَبًا!") == "مَرْحَبًا "  # Arabic harakat are combining marks


def test_clean_text_and_has_words():
    assert clean_text(" a\u00a0red\n\tbe\u0301ar  ") == "a red béar"
    assert [has_words(t) for t in ("", "  ", "?!", "\U0001F642", "你好", "a", "7")] == [
        False, False, False, False, True, True, True]


def test_numerals_are_spelled_out_as_references_spell_them():
    from mmasr.data.text import normalise, number_words

    assert [number_words(n) for n in (0, 2, 13, 20, 21, 99, 100, 305, 999)] == [
        "zero", "two", "thirteen", "twenty", "twenty one", "ninety nine", "one hundred", "three hundred five",
        "nine hundred ninety nine"]
    assert normalise("2 red pears.") == normalise("Two red pears") == "two red pears"
    assert normalise("3, 3, 3...") == "three"  # spelled, then repeats collapsed
    assert normalise("2-0 in 2024, the 1st") == "2-0 in 2024 the 1st"  # not whole numerals 0-999: kept
    assert normalise("2 red pears", numbers_as_words=False) == "2 red pears"
    with pytest.raises(ValueError):
        number_words(1000)
