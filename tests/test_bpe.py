"""BPE training: rustbpe and HF tokenizers trainers export tiktoken ranks that encode like the trainers
themselves; round trips on arbitrary Unicode; chat template; bytes per token."""

import pytest
from conftest import shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from gptstack.data.sources import corpus_texts
from gptstack.tokenizer import (
    CHAT_TOKENS,
    CL100K_PATTERN,
    EOT,
    Tokenizer,
    byte_tokenizer,
    bytes_per_token,
    get_tokenizer,
    train_bpe,
    train_chars,
)

VOCAB = 1024


@pytest.fixture(scope="module")
def corpus():
    return corpus_texts(None, "train", 0.1, 1_500_000), corpus_texts(None, "heldout", 0.1, 200_000)


@pytest.fixture(scope="module")
def trained(corpus):
    return train_bpe(corpus[0], VOCAB, "cl100k")


def test_rustbpe_ranks_encode_exactly_as_rustbpe(corpus, trained):
    import rustbpe

    train, heldout = corpus
    reference = rustbpe.Tokenizer()
    reference.train_from_iterator(iter(train), VOCAB - 1 - len(CHAT_TOKENS), pattern=CL100K_PATTERN)
    assert trained.n_vocab == VOCAB
    assert trained.special_tokens[EOT] == VOCAB - 1 - len(CHAT_TOKENS)
    for text in heldout:
        assert trained.encode(text) == reference.encode(text)


def test_hf_trainer_exports_ranks_that_compress_like_hf(corpus):
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HF

    train, heldout = corpus
    ours = train_bpe(train, VOCAB, "gpt2", trainer="hf")
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(ours.pattern), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
    )
    n_ranks = VOCAB - 1 - len(CHAT_TOKENS)
    hf.train_from_iterator(
        train, trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    assert len(ours.ranks) == hf.get_vocab_size() == n_ranks
    # tiktoken applies merges by rank of the merged token, HF by pair priority: the same vocabulary,
    # token counts equal to within 1% (not always the same split).
    ours_n = sum(len(ours.encode(t)) for t in heldout)
    hf_n = sum(len(hf.encode(t).ids) for t in heldout)
    assert abs(ours_n - hf_n) / hf_n < 0.01
    assert all(ours.decode(ours.encode(t)) == t for t in heldout)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=300))
def test_trained_tokenizer_round_trips_any_unicode(trained, text):
    assert trained.decode(trained.encode(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "👩‍👩‍👧‍👦 🏳️‍🌈 🙂‍↔️",
        "日本語のテキスト，中文文本，한국어 텍스트",
        "\x00\x01\x1b[31mred\x1b[0m\x7f\u200b\u200d\ufeff\r\n\t\x0b\x0c",
        "a" * 100_000,
        " " * 50_000 + "x",
        "🙂" * 10_000,
        "\n" * 10_000,
        "1234567890" * 5_000,
    ],
)
def test_hard_strings_round_trip(trained, text):
    assert trained.decode(trained.encode(text)) == text
    assert trained.decode_bytes(trained.encode(text)) == text.encode()


def test_lone_surrogates_become_the_replacement_character(trained):
    # A lone surrogate has no UTF-8 form; the policy (tiktoken's) is to encode U+FFFD in its place.
    assert trained.decode(trained.encode("a\ud800b\udfffc")) == "a\ufffdb\ufffdc"


def test_trained_tokenizer_saves_and_loads_with_its_chat_template(tmp_path, trained):
    folder = trained.save(tmp_path / "tok")
    again = get_tokenizer(folder)
    assert again.ranks == trained.ranks and again.special_tokens == trained.special_tokens
    assert (folder / "ranks.tiktoken").read_text().split("\n")[0].endswith(" 0")


def test_chat_template_marks_assistant_tokens(trained):
    ids, mask = trained.encode_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        add_generation_prompt=False,
    )
    sp = trained.special_tokens
    assert ids[0] == sp["<|system|>"] and ids.count(sp["<|end|>"]) == 3
    assistant = [t for t, m in zip(ids, mask, strict=True) if m]
    assert assistant == [*trained.encode("4"), sp["<|end|>"]]
    prompt, _ = trained.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt[-1] == sp["<|assistant|>"]
    with pytest.raises(ValueError, match="role"):
        trained.encode_chat([{"role": "wizard", "content": "x"}])


def test_bad_training_arguments_fail_clearly(corpus):
    with pytest.raises(ValueError, match="below 256 bytes"):
        train_bpe(corpus[0][:2], 200)
    with pytest.raises(ValueError, match="unknown trainer"):
        train_bpe(corpus[0][:2], 1000, trainer="sentencepiece")


def test_bytes_per_token(corpus, trained):
    heldout = corpus[1]
    rows = {
        r["tokenizer"]: r for r in bytes_per_token([byte_tokenizer(), trained, get_tokenizer("cl100k_base")], heldout)
    }
    assert rows["bytes"]["bytes_per_token"] == 1.0
    assert 1.0 < rows["bpe"]["bytes_per_token"] < rows["cl100k_base"]["bytes_per_token"]
    assert rows["bpe"]["tokens"] == sum(len(trained.encode(t)) for t in heldout)
    assert isinstance(trained, Tokenizer)


def test_chars_tokenizer_is_character_level_and_refuses_unseen_characters(tmp_path):
    text = shared_file("text/tinyshakespeare.txt").read_text()
    tok = train_chars([text], name="chars")
    assert len(tok.ranks) == 65  # nanoGPT's shakespeare_char vocabulary
    assert tok.n_vocab == 65 + 5 and tok.eot_id == 65  # + <|endoftext|> and the 4 chat tokens
    sample = text[:2000]
    ids = tok.encode(sample)
    assert len(ids) == len(sample) and tok.decode(ids) == sample
    assert tok.encode_batch([sample, "ROMEO:"]) == [ids, tok.encode("ROMEO:")]
    with pytest.raises(ValueError, match=r"no token for the character '\{'"):
        tok.encode("ROMEO: {exit}")
    again = Tokenizer.from_dir(tok.save(tmp_path / "chars"))
    assert again.encode(sample) == ids and again.n_vocab == tok.n_vocab
