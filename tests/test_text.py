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


# ---------------------------------------------------------------- text.normaliser: whisper_english | seed

from mmasr.config import validate  # noqa: E402
from mmasr.data.text import (SEED_000_TEXT, caption_list, clip_text, clip_texts, normaliser,  # noqa: E402
                             other_normaliser)

TEXT = validate({})["text"]
TRICKY = ["I like red pears", "well it is a well", "so the boy is falling", "twenty-one birds", "21 birds",
          "1,000 cats", "3.5", "[laughter] the <unk> bear", "colour", "the the the the bear", "uh the boy um falls",
          "you know, i mean okay", "Don't stop", "Oh, OK, like, the bear", "it's Mr. Smith's 305 hats",
          "  two   red\tpears  ", "Um...", "a red bear...", ""]  # Whisper's normaliser keeps a lone "." there

# Seed 000's normaliser (main at 1a90f6d, `normaliser(params.text)` with the then-default text section:
# collapse_repeats on, seed 000's fillers), computed by that code before text.normaliser existed and
# copied here: the seed mode must give exactly these.
SEED_000_OUTPUTS = [
    ('I like red pears', 'i red pears'),
    ('well it is a well', 'it is a'),
    ('so the boy is falling', 'the boy is falling'),
    ('twenty-one birds', 'twenty-one birds'),
    ('21 birds', 'twenty one birds'),
    ('1,000 cats', 'one zero cats'),
    ('3.5', 'three five'),
    ('[laughter] the <unk> bear', 'laughter the unk bear'),
    ('colour', 'colour'),
    ('the the the the bear', 'the bear'),
    ('uh the boy um falls', 'the boy falls'),
    ('Um, a RED red bear... you know', 'a red bear'),
    ('you know, i mean okay', ''),
    ("Don't stop", "don't stop"),
    ('don\u2019t stop', "don't stop"),
    ('Cafe\u0301 CAFÉ crème', 'café crème'),
    ('uh-huh, a bear', 'a bear'),
    ("rock-'n'-roll", 'rock n roll'),
    ('नमस्ते, नमस्ते दुनिया!', 'नमस्ते दुनिया'),
    ('你好，世界。', '你好 世界'),
    ('2 red pears.', 'two red pears'),
    ('3, 3, 3...', 'three'),
    ('2-0 in 2024, the 1st', '2-0 in 2024 the 1st'),
    ('Oh, OK, like, the bear', 'the bear'),
    ("it's Mr. Smith's 305 hats", "it's mr smith's three hundred five hats"),
    ('?! ... --', ''),
    ('', ''),
]


def test_the_default_is_whisper_english_without_collapsing():
    assert TEXT["normaliser"] == "whisper_english" and TEXT["collapse_repeats"] is False


@pytest.mark.parametrize("raw", TRICKY)
def test_whisper_english_is_the_pinned_package_itself(raw):
    """Expected output from the pinned whisper-normalizer at test time, not from this project."""
    from whisper_normalizer.english import EnglishTextNormalizer

    expected = " ".join(EnglishTextNormalizer()(raw).split())
    assert normaliser(TEXT)(raw) == expected


def test_whisper_english_keeps_content_words_and_drops_only_hesitations():
    norm = normaliser(TEXT)
    assert norm("I like red pears") == "i like red pears"
    assert norm("well it is a well") == "well it is a well"
    assert norm("So, you know, I mean, okay") == "so you know i mean okay"
    assert norm("uh the boy um falls hmm") == "the boy falls"
    assert norm("the the the the bear") == "the the the the bear"  # repeats kept by default
    assert normaliser({**TEXT, "collapse_repeats": True})("the the the the bear") == "the bear"
    # numbers one way, whatever the spelling; markers dropped; American spelling
    assert norm("twenty-one birds") == norm("21 birds") == "21 birds"
    assert norm("1,000 cats") == "1000 cats" and norm("3.5") == "3.5"
    assert norm("[laughter] the <unk> bear") == "the bear" and norm("colour") == "color"
    # the seed's filler list does not apply under whisper_english
    assert normaliser({**TEXT, "fillers": ["bear"]})("a bear") == "a bear"


@pytest.mark.parametrize("raw, expected", SEED_000_OUTPUTS)
def test_seed_mode_is_seed_000s_normaliser(raw, expected):
    assert normaliser({**TEXT, **SEED_000_TEXT})(raw) == expected
    assert normalise(raw) == expected  # the function itself, at its defaults


def test_seed_mode_reads_the_text_keys_and_rejects_unknown_normalisers():
    seed = {**TEXT, "normaliser": "seed"}
    assert normaliser(seed)("the the bear") == "the the bear"  # collapse_repeats off by default
    assert normaliser({**seed, "fillers": ["um"]})("um well like so") == "well like so"
    assert normaliser({**seed, "numbers_as_words": False})("2 pears") == "2 pears"
    with pytest.raises(ValueError, match="text.normaliser"):
        normaliser({**TEXT, "normaliser": "basic"})


def test_other_normaliser_is_seed_000s_or_whispers():
    suffix, cfg = other_normaliser(TEXT)
    assert suffix == "seed_norm" and normaliser(cfg)("I like the the bear") == "i the bear"
    suffix, cfg = other_normaliser({**TEXT, **SEED_000_TEXT})
    assert suffix == "whisper_norm" and normaliser(cfg)("I like the the bear") == "i like the the bear"


# ---------------------------------------------------------------- one caption format per n-best list

def test_one_caption_format_per_list_around_the_threshold():
    cfg = {**TEXT, "caption_max_words": 2}
    # "red pear" alone would be a caption, "a red pear" would not: in one list both are read the same way
    assert clip_texts(["red pear", "a red pear"], cfg) == ["red pear", "a red pear"]
    assert clip_texts(["red pear", "pear"], cfg) == ["an image showing red pear", "an image showing pear"]
    assert clip_texts(["Red pear!", "", "pear"], cfg) == ["an image showing red pear", "", "an image showing pear"]
    assert caption_list(["red pear", "a red pear"], {**cfg, "caption_max_words": 3})
    assert clip_texts(["red pear", "a red pear"], {**cfg, "caption_max_words": 3}) == [
        "an image showing red pear", "an image showing a red pear"]
    assert clip_texts(["red pear"], {**cfg, "caption_style": False}) == ["red pear"]
    # a transcript on its own (a reference) is a list of one
    assert clip_text("red pear", cfg) == "an image showing red pear" and clip_text("a red pear", cfg) == "a red pear"


def test_the_rules_pass_every_key_the_normaliser_reads():
    """workflow/rules/common.smk's TEXT_NORM_KEYS (the rules that normalise re-run when one changes) are
    mmasr.data.text.NORMALISER_KEYS, and normaliser() reads nothing else."""
    import ast
    import re
    from pathlib import Path

    from mmasr.data.text import NORMALISER_KEYS

    smk = (Path(__file__).resolve().parents[1] / "workflow/rules/common.smk").read_text()
    keys = ast.literal_eval(re.search(r"TEXT_NORM_KEYS = (\[.*?\])", smk, re.S).group(1))
    assert keys == [f"text.{k}" for k in NORMALISER_KEYS]
    only = {k: TEXT[k] for k in NORMALISER_KEYS}
    for mode in ("whisper_english", "seed"):
        assert normaliser({**only, "normaliser": mode})("Well, the the bear") == normaliser({**TEXT, "normaliser": mode})(
            "Well, the the bear")
