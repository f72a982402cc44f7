"""Images in a chat request (issue 21): OpenAI `image_url` content parts → the prompt's ids and the
engine's ImageInputs.

    prompt, images = image_prompt(body, runner, server.config)   # APIError 400 / 413, nothing queued

Only `data:` URLs are taken (`data:image/png;base64,…`): the server has no network, so an http(s) URL
is a 400 naming the data-URL form instead. Each image is checked in the order that costs least: the
count (`max_images`), the URL's scheme and mime type, its size in bytes from the base64 length before
decoding (413 over `max_image_bytes`), strict base64, then `vision.decode_image` (not an image, corrupt,
more than `max_image_pixels` pixels, read from the header before the pixels are decoded: 400 or 413).
The conversation is rendered by the model's chat template with the image marker in place of each image
part (`vision.render_image_chat`; with retrieval, the sources go in front of the last user message as
on the text path), whose placeholder runs become ImageInputs with the preprocessed pixels; a marker
count in the text that does not match the images is a 400. This runs in a worker
thread (chat_completion runs off the event loop), so decoding a large PNG never holds the loop.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence

from gptstack.infer.engine import ImageInput, place_images
from gptstack.rag.cite import grounded_messages
from gptstack.rag.retrieve import Hit
from gptstack.serve.config import ServeConfig
from gptstack.serve.protocol import ChatRequest, ImagePart
from gptstack.serve.runner import EngineRunner
from gptstack.serve.server import APIError
from gptstack.vision import ImageError, decode_image, image_digest, preprocess, render_image_chat

MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp")
DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)  # data:MIME[;param…][;base64],


def image_parts(body: ChatRequest) -> list[ImagePart]:
    """The request's image parts, in the order the conversation shows them."""
    return [p for m in body.messages if isinstance(m.content, list) for p in m.content if isinstance(p, ImagePart)]


def url_bytes(url: str, k: int, config: ServeConfig) -> bytes:
    """The bytes of image k's data: URL; APIError for a remote or malformed URL, a non-image mime type,
    base64 that does not decode, or more than max_image_bytes (413, counted before decoding)."""
    param = f"messages.image_url[{k}]"
    if re.match(r"https?://", url, re.IGNORECASE):
        message = f"image {k}: remote image URLs are not fetched (this server has no network access); send the image as a data: URL (data:image/png;base64,...)"  # noqa: E501
        raise APIError(400, message, param=param, code="invalid_image_url", reason="invalid")
    head = DATA_URL.match(url)
    if head is None or ";base64" not in head.group(2).lower():
        raise APIError(400, f"image {k}: expected a data URL, data:image/png;base64,...", param=param,
                       code="invalid_image_url", reason="invalid")  # fmt: skip
    mime = head.group(1).lower()
    if mime not in MIME_TYPES:
        message = f"image {k}: the data URL's type is {mime or 'missing'!r}; send one of {', '.join(MIME_TYPES)}"
        raise APIError(400, message, param=param, code="invalid_image_format", reason="invalid")
    data = url[head.end() :]
    if len(data) // 4 * 3 > config.max_image_bytes + 2:  # base64's size before decoding it
        message = f"image {k}: about {len(data) // 4 * 3} bytes; this server takes images of at most {config.max_image_bytes} bytes"  # noqa: E501
        raise APIError(413, message, param=param, code="image_too_large", reason="too_large")
    try:
        return binascii.a2b_base64(data.strip(), strict_mode=True)
    except binascii.Error as e:
        raise APIError(400, f"image {k}: the data URL is not valid base64 ({e})", param=param,
                       code="invalid_image", reason="invalid") from None  # fmt: skip


def image_prompt(
    body: ChatRequest, runner: EngineRunner, config: ServeConfig, hits: Sequence[Hit] = ()
) -> tuple[list[int], list[ImageInput]]:
    """The templated prompt ids (each image a run of placeholder ids) and its ImageInputs; APIError
    (nothing queued) for a model without a vision tower or any bad image. `hits`: retrieval's sources."""
    parts = image_parts(body)
    if runner.vision_config is None:
        message = f"the model '{runner.name}' has no vision tower: it takes no images (send text only)"
        raise APIError(400, message, param="messages", code="model_not_multimodal", reason="invalid")
    if len(parts) > config.max_images:
        message = f"{len(parts)} images; one request may send at most {config.max_images}"
        raise APIError(400, message, param="messages", code="too_many_images", reason="too_large")
    cfg, pictures, digests = runner.vision_config, [], []
    for k, part in enumerate(parts):
        data = url_bytes(part.image_url.url, k, config)
        try:
            pictures.append(decode_image(data, config.max_image_bytes, config.max_image_pixels))
        except ImageError as e:
            code = "image_too_large" if e.status == 413 else "invalid_image"
            raise APIError(e.status, f"image {k}: {e}", param=f"messages.image_url[{k}]", code=code,
                           reason="too_large" if e.status == 413 else "invalid") from None  # fmt: skip
        digests.append(image_digest(data))
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": marked(m.content, cfg.image_token)}
                for m in body.messages]  # fmt: skip
    if hits:  # retrieval: the sources go in front of the last user message, as on the text path
        messages = grounded_messages(messages, list(hits))
    ids, n = render_image_chat(runner.tokenizer, messages, cfg)
    if n != len(parts):
        message = f"the conversation renders {n} images and sends {len(parts)}"
        raise APIError(400, message, param="messages", code="image_count_mismatch", reason="invalid")
    return ids, place_images(ids, list(zip(digests, preprocess(pictures, cfg), strict=True)), cfg)


def marked(content, marker: str) -> str:
    """A message's content as text with `marker` in place of each image part."""
    if not isinstance(content, list):
        return content or ""
    return "".join(marker if isinstance(p, ImagePart) else p.text for p in content)
