"""Helpers for the serving tests: a real uvicorn server on loopback in a thread, small engines, and raw
sockets for clients that misbehave (reset mid-request)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import torch
import uvicorn

from gptstack.config import ModelConfig
from gptstack.infer.engine import Engine, EngineConfig
from gptstack.model import build_model
from gptstack.tokenizer import get_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`with LiveServer(app) as url:` runs the ASGI app under uvicorn on 127.0.0.1 until the block ends."""

    def __init__(self, app):
        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=3)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def tiny_engine(
    seed: int = 0, n_layer: int = 2, n_embd: int = 64, context: int = 512, tokenizer="cl100k_base", **config
) -> Engine:
    """A random model over a real tokenizer (cl100k: 100k tokens, so a random model rarely ends a turn);
    `config`: EngineConfig fields."""
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    cfg = ModelConfig(vocab_size=tok.n_vocab, block_size=context, n_layer=n_layer, n_head=2, n_embd=n_embd)
    torch.manual_seed(seed)
    return Engine(build_model(cfg, seed=seed), EngineConfig(**config), tokenizer=tok)


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def raw_post(port: int, path: str, body: dict | bytes, headers: dict[str, str] | None = None) -> socket.socket:
    """Send one POST on a fresh loopback socket without reading the answer; the socket stays open."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **(headers or {}),
    }
    lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall("\r\n".join(lines).encode() + data)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a client that crashes or a proxy that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
