"""Request bodies of the OpenAI-compatible API (pydantic: they are also the OpenAPI schema).

Unknown fields are ignored, as OpenAI clients send fields a local server has no use for. Besides the
OpenAI fields, `top_k`, `min_p`, `repetition_penalty` and `ignore_eos` are accepted, as in vLLM.

A body is sized before it is parsed (`json_size`): parsing runs on the event loop and holds the GIL
(json and pydantic-core never release it), and its cost grows with the number of values, not bytes:
a 1 MB body of 250,000 one-token prompts took over a second to parse and validate.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Stop = str | Annotated[list[str], Field(max_length=4)] | None


def json_size(raw: bytes) -> tuple[int, int]:
    """(arrays and objects, values) in a JSON text, counted outside its strings without parsing it. The
    values are an upper bound: commas + containers + 1. Escaped backslashes and quotes go first, so each
    remaining quote opens or closes a string (its running count is odd inside one); in the valid prefix a
    parser would read, the counts are exact. numpy does the passes (a few ms per MB) without the GIL."""
    bare = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    a = np.frombuffer(bare, dtype=np.uint8)
    outside = (np.cumsum(a == ord('"'), dtype=np.int32) & 1) == 0
    containers = int(np.count_nonzero(((a == ord("[")) | (a == ord("{"))) & outside))
    return containers, int(np.count_nonzero((a == ord(",")) & outside)) + containers + 1


def json_size_bound(raw: bytes) -> tuple[int, int]:
    """json_size's counts with strings included: never below them, and ten times cheaper."""
    containers = raw.count(b"[") + raw.count(b"{")
    return containers, raw.count(b",") + containers + 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = Field(None, max_length=256)
    # vLLM-style extensions
    top_k: int | None = Field(None, ge=1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str  # a data: URL (data:image/png;base64,…); remote URLs are refused (serve/images.py)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image gets the tower's n_image_tokens


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The text parts joined (image parts leave nothing)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""


class Retrieval(BaseModel):
    """A chat request's `retrieval` field (gptstack's own): ground the answer in the server's --rag-index."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(4, ge=1, le=20)
    method: Literal["bm25", "dense", "hybrid"] = "hybrid"


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    retrieval: Retrieval | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    model: str | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    response_id: str = Field(min_length=1, max_length=256)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=4000)
