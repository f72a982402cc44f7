"""/v1/chat/completions with retrieval, over a real loopback server and the real `openai` client.

The model is a real GPT whose weights are set to a bigram chain (attention and MLP outputs zero, so each
token's logits depend on that token alone): after the assistant turn opens it always writes
`Fact[7] and [1]. Also ([2,9])`, citing a source 7 and a source 9 that do not exist. So the test knows
what the model emits and can check what the server lets through: without retrieval the text comes back
as written; with two sources, `[7]` and the 9 are gone from the JSON answer and from every streamed prefix.
"""

from __future__ import annotations

import itertools
import json
import os

import openai
import pytest
import torch
from serve_util import LiveServer

from gptstack.config import ModelConfig
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import build_model
from gptstack.rag.cite import marker_ids
from gptstack.rag.evaluate import stdlib_docstrings
from gptstack.rag.retrieve import RagIndexConfig, build_index
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig
from gptstack.tokenizer import get_tokenizer

if not os.environ.get("CI"):
    pytest.importorskip("bm25s", reason="the rag extra (bm25s)")

CHAIN = ["Fact", "[", "7", "]", " and", " [", "1", "].", " Also", " ([", "2", ",", "9", "])"]
RAW = "".join(CHAIN)
SHOWN = "Fact and [1]. Also ([2])"  # with 2 sources: 7 and 9 name none
ASK = [{"role": "user", "content": "What is the heap queue algorithm?"}]


@torch.no_grad()
def bigram_engine() -> Engine:
    """An engine whose model writes CHAIN after the generation prompt, whatever came before."""
    tok = get_tokenizer("cl100k_base")
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=1024, n_layer=1, n_head=2, n_embd=64, pos="rope",
                      bias=False, tie_embeddings=False)  # fmt: skip
    model = build_model(cfg, seed=0)
    for block in model.transformer.h:  # the residual stream is the token's embedding alone
        block.attn.c_proj.weight.zero_()
        block.mlp.c_proj.weight.zero_()
    ids = [tok.encode_chat(ASK, add_generation_prompt=True)[0][-1]] + [tok.encode(p)[0] for p in CHAIN]
    assert [tok.decode([i]) for i in ids[1:]] == CHAIN
    emb, head = model.transformer.wte.weight, model.lm_head.weight
    emb[ids] = torch.randn(len(ids), cfg.n_embd, generator=torch.Generator().manual_seed(0))
    head.zero_()
    hidden = model.transformer.ln_f(emb[ids])  # (len(ids), n_embd): what the head reads after each token
    for a, b in itertools.pairwise(ids):
        head[b] += 20 * hidden[ids.index(a)] / hidden[ids.index(a)].norm() ** 2
    return Engine(model, EngineConfig(), tokenizer=tok)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-serve")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": m, "text": t}) + "\n" for m, t in stdlib_docstrings(min_chars=400)[:30]))
    build_index(RagIndexConfig(str(docs), str(root / "index"), dense=False, progress=False))  # BM25: no MiniLM
    return root / "index", {m: t for m, t in stdlib_docstrings(min_chars=400)[:30]}


@pytest.fixture(scope="module")
def client(index):
    app = create_app({"tiny": bigram_engine()}, ServeConfig(rag_index=str(index[0])))
    with LiveServer(app) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def ask(client, **extra):
    return client.chat.completions.create(model="tiny", messages=ASK, max_tokens=len(CHAIN), temperature=0, **extra)


def test_without_retrieval_the_model_text_comes_back_as_written(client):
    r = ask(client)
    assert r.choices[0].message.content == RAW
    assert "citations" not in r.to_dict()


def test_retrieval_returns_numbered_citations_and_drops_ids_that_name_no_source(client, index):
    r = ask(client, extra_body={"retrieval": {"k": 2, "method": "bm25"}}).to_dict()
    assert r["choices"][0]["message"]["content"] == SHOWN
    cites = r["citations"]
    assert [c["id"] for c in cites] == [1, 2] and cites[0]["document"] == "heapq", cites
    texts = index[1]
    for c in cites:  # each citation is an exact span of its document
        assert texts[c["document"]][c["start"] : c["end"]] == c["text"] and ".jsonl:" in c["source"]
    assert r["usage"]["prompt_tokens"] > 2 * 50  # the sources went into the prompt
    one = ask(client, extra_body={"retrieval": {"k": 1, "method": "bm25"}}).to_dict()
    assert one["choices"][0]["message"]["content"] == "Fact and [1]. Also ()" and len(one["citations"]) == 1


def test_a_stream_keeps_the_ids_stable_and_never_shows_a_missing_one(client):
    final = ask(client, extra_body={"retrieval": {"k": 2, "method": "bm25"}}).to_dict()
    shown, cited = "", []
    for chunk in ask(client, stream=True, extra_body={"retrieval": {"k": 2, "method": "bm25"}}):
        d = chunk.to_dict()
        if d.get("citations") is not None:
            cited.append(d["citations"])
        if d["choices"] and d["choices"][0]["delta"].get("content"):
            shown += d["choices"][0]["delta"]["content"]
            assert set(marker_ids(shown)) <= {1, 2}, shown
    assert shown == SHOWN
    assert len(cited) == 2 and cited[0] == cited[1] == final["citations"]  # the opening and the last chunk


def test_retrieval_errors_are_openai_400s(client, index):
    with pytest.raises(openai.BadRequestError, match="retrieval"):
        ask(client, extra_body={"retrieval": {"k": 0}})
    with pytest.raises(openai.BadRequestError, match="retrieval"):
        ask(client, extra_body={"retrieval": {"k": 2, "method": "tfidf"}})
    with pytest.raises(openai.BadRequestError, match="no embeddings"):
        ask(client, extra_body={"retrieval": {"k": 2, "method": "hybrid"}})
    app = create_app({"tiny": bigram_engine()}, ServeConfig())
    with LiveServer(app) as server:
        plain = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="no retrieval index"):
            ask(plain, extra_body={"retrieval": {"k": 2}})
