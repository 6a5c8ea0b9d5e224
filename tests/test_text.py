import pytest

from polyfast.data import (bucket_id, detect_language, length_bin, normalize_whitespace,
                           profile_prompt, token_count)


def test_token_count_current_regex():
    assert token_count("Don't panic, it's 42!") == 6  # Don't | panic | , | it's | 42 | !
    assert token_count("我爱北京。") == 5               # 4 Han characters + full-width stop
    assert token_count("GPU 3090 跑得快") == 5          # GPU | 3090 | 跑 | 得 | 快
    assert token_count("") == 0


def test_token_count_legacy_regex():
    # \w+ glues Han runs and splits apostrophes
    assert token_count("Don't panic, it's 42!", legacy=True) == 10
    assert token_count("我爱北京。", legacy=True) == 2


def test_normalize_whitespace():
    assert normalize_whitespace("  a \t b\r\n\r\n\r\n\r\nc  \rd ") == "a b\n\nc\nd"


@pytest.mark.parametrize("n,expected", [(0, "short"), (40, "short"), (41, "medium"), (120, "medium"),
                                        (121, "long"), (240, "long"), (241, "xlong")])
def test_length_bin_edges(n, expected):
    assert length_bin(n) == expected


def test_detect_language():
    assert detect_language("How do I brew tea?") == "en"
    assert detect_language("怎么泡茶？用 Python 写") == "zh"
    assert detect_language("Use the 茶 character") == "en"
    assert detect_language("12345") == "en"


def test_bucket_id_and_profile_prompt():
    assert bucket_id("zh", "multi", "qa", "long") == "zh|multi|qa|long"
    assert profile_prompt("qa", "multi", "qa_search", "short") == (
        "You are a helpful assistant. Follow the target response profile when answering. "
        "family=qa; track=multi; style=qa_search; length=short.")
    assert profile_prompt("qa", "", "", "long").endswith("family=qa; length=long.")
    assert profile_prompt() == "You are a helpful assistant."
