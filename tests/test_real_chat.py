"""The real SmolLM2-135M-Instruct GGUF end to end: `gptstack chat model.gguf` and the OpenAI client against
`gptstack serve model.gguf` give exactly what transformers gives for the same conversation, rendered
by the file's own ChatML template (`apply_chat_template`) and decoded greedily (`generate`), stopping
at `<|im_end|>`. Both gptstack sides run as real processes on the file; the oracle is transformers'
own GGUF loader (dequantized to fp32)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from cli_util import gptstack
from conftest import smollm2_file

pytestmark = pytest.mark.slow  # three loads of a 135M model (~10 s each on two cores)

SYSTEM = "You are a concise assistant."
QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 40
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def reference(smollm2_hf, smollm2_hf_tokenizer) -> tuple[str, bool]:
    """transformers' reply to the conversation, and whether it ended at <|im_end|> (not max_tokens)."""
    hf, tok = smollm2_hf, smollm2_hf_tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = hf.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=end, pad_token_id=end)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    stopped = new[-1] == end
    return tok.decode(new[:-1] if stopped else new), stopped


def test_chat_on_the_gguf_file_replies_as_transformers_does(reference):
    text, stopped = reference
    assert stopped, "the reference reply should end at <|im_end|> within the token budget"
    run = gptstack("chat", smollm2_file(), "--system", SYSTEM, "--temperature", "0", "--max-tokens", MAX_TOKENS,
                   stdin=QUESTION + "\n")  # fmt: skip
    assert run.stdout == f"assistant> {text}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_client_against_serve_on_the_gguf_file(reference):
    openai = pytest.importorskip("openai")
    text, _ = reference
    port = free_port()
    cmd = [sys.executable, "-m", "gptstack.cli", "serve", str(smollm2_file()), "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not become healthy"
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, temperature=0, max_tokens=MAX_TOKENS,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        )  # fmt: skip
        assert reply.choices[0].message.content == text
        assert reply.choices[0].finish_reason == "stop"
    finally:
        server.terminate()
        server.wait(timeout=30)
