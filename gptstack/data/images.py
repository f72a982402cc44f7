"""Image–text data with ground truth by construction: `gptstack vision data`, and the reader of the format.

    write_image_data(ImageDataConfig(out="runs/vis/data", n=2000))   # train.jsonl, test.jsonl, images/

Six families, each drawn from a seeded generator (or, for digits, scikit-learn's bundled 1,797 real
8×8 handwritten digits), rendered with Pillow so that the answer is known because the generator drew it:

| family | image | question | answer |
|---|---|---|---|
| colour | one shape | What colour is the shape? | red, green, blue, yellow, orange, purple, pink, black |
| shape  | one shape | What shape is this? | circle, square, triangle, diamond |
| count  | 1–5 separate shapes | How many shapes are there? | 1 … 5 |
| chart  | bar or line chart, 3–4 values | What is the value of B? / Which label has the largest value? | 1–9 / A–D |
| read   | a rendered word or number | What does the text say? | the word |
| digits | a real handwritten digit (sklearn) | What digit is this? | 0 … 9 |

One JSONL row per item (the format users bring their own data in; docs/vision.md):

    {"images": ["images/train/colour/000000.png"],
     "messages": [{"role": "user", "content": "<image>\\nWhat colour is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "family": "colour", "caption": "a red square", "meta": {...}}

Image paths are relative to the JSONL file's folder; each `<image>` marker in the messages stands for the
next image of `images`, so the marker count equals len(images); the answer is the last assistant message;
`caption` serves stage-1 (projector) training; `meta` (optional) holds the generator's parameters.

The train and test splits are disjoint by construction: their generators have different seeds (digits:
disjoint index pools of the real set), and a test item whose rendered pixels equal a training image's is
drawn again, so no held-out image was seen in training. The same config writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gptstack.files import iter_jsonl

IMAGE_MARKER = "<image>"  # the placeholder of one image in a message (vision.VisionConfig.image_token's default)
FAMILIES = ("colour", "shape", "count", "chart", "read", "digits")
COLOURS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (40, 70, 220), "yellow": (235, 200, 20),
           "orange": (245, 130, 20), "purple": (130, 50, 170), "pink": (245, 120, 190), "black": (0, 0, 0)}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = ("cat", "dog", "sun", "red", "map", "cup", "box", "hat", "pen", "key", "bird", "fish", "tree", "book",
         "door", "moon", "star", "ship", "lamp", "rain", "snow", "wind", "milk", "bread", "apple", "house",
         "river", "stone", "cloud", "green", "light", "water")  # fmt: skip
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
             "count": "How many shapes are there?", "read": "What does the text say?",
             "digits": "What digit is this?"}  # fmt: skip
WHITE = (255, 255, 255)
MIN_SIZE = 32
DIGIT_TEST_FRACTION = 5  # one in five of sklearn's digits is held out


class ImageDataError(ValueError):
    """Image data that cannot be written or read; the message names the file (and line) or the option."""


@dataclass
class ImageDataConfig:
    out: str  # folder to write train.jsonl, test.jsonl and images/ into (must not exist or be empty)
    families: tuple[str, ...] = FAMILIES  # question families (comma lists too): colour shape count chart read digits
    n: int = 1000  # training items per family
    n_test: int = 200  # held-out items per family (digits: at most a fifth of sklearn's 1,797)
    seed: int = 0  # generator seed (the test split uses a different one derived from it)
    size: int = 64  # side of the square images in pixels
    progress: bool = True  # progress bar on stderr

    def __post_init__(self):
        self.families = tuple(f for spec in self.families for f in spec.split(",") if f)
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ImageDataError(f"unknown image family {unknown[0]!r}; the families are {', '.join(FAMILIES)}")
        if not self.families:
            raise ImageDataError("--families is empty")
        if len(set(self.families)) < len(self.families):
            raise ImageDataError("a family is named twice in --families")
        if self.n < 1 or self.n_test < 1:
            raise ImageDataError(f"--n and --n-test must be ≥ 1, got {self.n} and {self.n_test}")
        if self.size < MIN_SIZE:
            raise ImageDataError(f"--size must be ≥ {MIN_SIZE} pixels, got {self.size}")
        if "digits" in self.families and self.n_test > len(digits_pools(self.seed)[1]):
            raise ImageDataError(
                f"--n-test {self.n_test} exceeds the {len(digits_pools(self.seed)[1])} held-out digits"
            )


@dataclass
class Item:
    """One rendered example before it is written: the image (H, W, 3) uint8 and its text."""

    pixels: np.ndarray
    question: str
    answer: str
    caption: str
    meta: dict


# ---- drawing ---------------------------------------------------------------------------------------------


def _canvas(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), WHITE)


def draw_shape(draw, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """A filled `shape` of bounding radius r centred at (cx, cy); no antialiasing, so one exact colour."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        s = r * 0.8  # a square of the same area as the others' scale
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
    elif shape == "triangle":  # apex up, base at the bottom
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    else:  # diamond: a square on its corner
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _one_shape(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str, dict]:
    """A single shape of a random colour, size and position: (pixels, colour, shape, meta)."""
    from PIL import ImageDraw

    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    r = float(rng.uniform(0.14, 0.3) * size)
    cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
    img = _canvas(size)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, COLOURS[colour])
    return np.asarray(img), colour, shape, {"colour": colour, "shape": shape, "centre": [cx, cy], "radius": r}


def gen_colour(rng: np.random.Generator, size: int) -> Item:
    pixels, colour, shape, meta = _one_shape(rng, size)
    return Item(pixels, QUESTIONS["colour"], colour, f"{article(colour)} {colour} {shape}", meta)


def gen_shape(rng: np.random.Generator, size: int) -> Item:
    pixels, colour, shape, meta = _one_shape(rng, size)
    return Item(pixels, QUESTIONS["shape"], shape, f"{article(colour)} {colour} {shape}", meta)


def gen_count(rng: np.random.Generator, size: int) -> Item:
    """1–5 shapes whose bounding circles keep ≥ 3 px apart, so each is its own connected component."""
    from PIL import ImageDraw

    n, placed = int(rng.integers(1, 6)), []
    r = size * 0.09
    while len(placed) < n:  # rejection sampling; five circles of r = 0.09·size always fit
        c = rng.uniform(r + 1, size - r - 1, 2)
        if all(np.hypot(*(c - p)) > 2 * r + 3 for p in placed):
            placed.append(c)
    img, shapes = _canvas(size), []
    draw = ImageDraw.Draw(img)
    for cx, cy in placed:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        draw_shape(draw, shape, float(cx), float(cy), r, COLOURS[colour])
        shapes.append({"colour": colour, "shape": shape, "centre": [float(cx), float(cy)]})
    caption = f"{n} shape{'s' if n > 1 else ''}: " + ", ".join(
        f"{article(s['colour'])} {s['colour']} {s['shape']}" for s in shapes
    )
    return Item(np.asarray(img), QUESTIONS["count"], str(n), caption, {"shapes": shapes, "radius": r})


@cache
def font(px: int):
    """Pillow's bundled TrueType font at `px` pixels: the same glyphs on every machine, no file lookup."""
    from PIL import ImageFont

    return ImageFont.load_default(size=px)


def chart_layout(size: int, n_bars: int) -> tuple[int, int, float, list[float]]:
    """(baseline y, top y, pixels per unit, bar centre xs) of a chart: values 0–10 span the plot height."""
    base, top = size - int(size * 0.2), int(size * 0.06)
    xs = [size * 0.12 + (i + 0.5) * (size * 0.84 / n_bars) for i in range(n_bars)]
    return base, top, (base - top) / 10, xs


def gen_chart(rng: np.random.Generator, size: int) -> Item:
    """A bar or line chart of 3–4 values 1–9 labelled A, B, …; asks one value or which label is largest."""
    from PIL import ImageDraw

    kind, n = str(rng.choice(["bar", "line"])), int(rng.integers(3, 5))
    values = [int(v) for v in rng.choice(np.arange(1, 10), n, replace=False)]  # distinct: one largest
    labels = "ABCD"[:n]
    base, _, unit, xs = chart_layout(size, n)
    img = _canvas(size)
    draw = ImageDraw.Draw(img)
    for v in range(0, 11, 5):  # light grid at 0, 5, 10
        draw.line([(size * 0.1, base - v * unit), (size * 0.97, base - v * unit)], fill=(200, 200, 200))
    half = size * 0.84 / n * 0.3
    points = [(x, base - v * unit) for x, v in zip(xs, values, strict=True)]
    for (x, y), label in zip(points, labels, strict=True):
        if kind == "bar":
            draw.rectangle([x - half, y, x + half, base], fill=COLOURS["blue"])
        draw.text((x, base + 2), label, fill=(0, 0, 0), font=font(max(8, size // 7)), anchor="mt")
    if kind == "line":
        draw.line(points, fill=COLOURS["red"], width=max(1, size // 48))
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS["red"])
    table = ", ".join(f"{lab}={v}" for lab, v in zip(labels, values, strict=True))
    meta = {"kind": kind, "labels": list(labels), "values": values}
    if rng.random() < 0.5:
        asked = int(rng.integers(n))
        question, answer = f"What is the value of {labels[asked]}?", str(values[asked])
    else:
        question, answer = "Which label has the largest value?", labels[int(np.argmax(values))]
    return Item(np.asarray(img), question, answer, f"a {kind} chart of {table}", meta)


def gen_read(rng: np.random.Generator, size: int) -> Item:
    """A short word or a two-digit number in dark text at a random size and position."""
    from PIL import ImageDraw

    text = str(rng.choice(WORDS)) if rng.random() < 0.6 else str(int(rng.integers(10, 100)))
    px = int(rng.integers(size // 5, size // 3 + 1))
    left, top_, right, bottom = font(px).getbbox(text)
    w, h = right - left, bottom - top_
    if w >= size - 2:  # a long word at a large size: the largest size that fits
        px = max(8, px * (size - 4) // w)
        left, top_, right, bottom = font(px).getbbox(text)
        w, h = right - left, bottom - top_
    x = int(rng.integers(1, size - w)) - left
    y = int(rng.integers(1, size - h)) - top_
    img = _canvas(size)
    ImageDraw.Draw(img).text((x, y), text, fill=(0, 0, 0), font=font(px))
    return Item(np.asarray(img), QUESTIONS["read"], text, f'the text "{text}"', {"px": px, "xy": [x, y]})


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) values 0–16 and (1797,) labels; read from the wheel."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.int64), d.target.astype(np.int64)


@cache
def digits_pools(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) into the digits: a seeded permutation, a fifth held out."""
    order = np.random.default_rng([seed, 8]).permutation(len(_digits()[1]))
    k = len(order) // DIGIT_TEST_FRACTION
    return order[k:], order[:k]


def digit_scale(size: int) -> int:
    """Pixels per digit cell: the 8×8 digit fills most of the image, with room to shift."""
    return max(1, (size * 7 // 8) // 8)


def render_digit(index: int, size: int, dx: int, dy: int) -> np.ndarray:
    """sklearn digit `index` as dark ink on white (value v → 255 − round(255·v/16)), each cell a square of
    digit_scale(size) pixels, its top-left corner at (dx, dy)."""
    images, _ = _digits()
    s = digit_scale(size)
    cells = (255 - np.rint(images[index] * 255 / 16)).astype(np.uint8)  # (8, 8)
    out = np.full((size, size, 3), 255, np.uint8)
    out[dy : dy + 8 * s, dx : dx + 8 * s] = np.kron(cells, np.ones((s, s), np.uint8))[..., None]
    return out


def digit_item(index: int, rng: np.random.Generator, size: int) -> Item:
    room = size - 8 * digit_scale(size)
    dx, dy = (int(v) for v in rng.integers(0, room + 1, 2))
    label = str(int(_digits()[1][index]))
    meta = {"index": int(index), "offset": [dx, dy]}
    return Item(render_digit(index, size, dx, dy), QUESTIONS["digits"], label, f"a handwritten {label}", meta)


GENERATORS: dict[str, Callable[[np.random.Generator, int], Item]] = {
    "colour": gen_colour, "shape": gen_shape, "count": gen_count, "chart": gen_chart, "read": gen_read,
}  # fmt: skip


# ---- the splits --------------------------------------------------------------------------------------------


def digest(pixels: np.ndarray) -> bytes:
    """The key of the dedup check: BLAKE2b of the rendered pixels and their shape."""
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=16).digest()


def family_items(family: str, split: str, cfg: ImageDataConfig, seen: set[bytes]):
    """Yield the split's items of `family` in order. A test item whose pixels are in `seen` (the training
    images' digests) is drawn again; training items add theirs to `seen`."""
    rng = np.random.default_rng([cfg.seed, FAMILIES.index(family), 0 if split == "train" else 1])
    count = cfg.n if split == "train" else cfg.n_test
    if family == "digits":
        pool = digits_pools(cfg.seed)[0 if split == "train" else 1]
        # train cycles its pool (shifted copies when n > pool); test takes each held-out digit once at most
        draws = (digit_item(int(pool[i % len(pool)]), rng, cfg.size) for i in range(10**9))
    else:
        draws = (GENERATORS[family](rng, cfg.size) for _ in range(10**9))
    made, tries = 0, 0
    for item in draws:
        if made == count:
            return
        tries += 1
        key = digest(item.pixels)
        if split == "train":
            seen.add(key)
        elif key in seen:
            if tries > 20 * count + 100:
                raise ImageDataError(f"{family}: could not draw {count} test images unlike the training ones")
            continue
        made += 1
        yield item


def write_image_data(cfg: ImageDataConfig) -> dict:
    """`gptstack vision data`: write `cfg.out`/train.jsonl, test.jsonl and images/ (PNG), atomically (a
    temp folder renamed into place). Returns {"train": n rows, "test": n rows, "out": folder}."""
    from PIL import Image

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImageDataError(f"{out} already exists and is not an empty folder; give a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    total = (cfg.n + cfg.n_test) * len(cfg.families)
    counts, seen = {}, {f: set() for f in cfg.families}  # the training digests per family, for the test split
    try:
        with tqdm(total=total, unit="img", desc="vision data", disable=not cfg.progress) as bar:
            for split in ("train", "test"):
                counts[split] = 0
                with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    for family in cfg.families:
                        (tmp / "images" / split / family).mkdir(parents=True)
                        for i, item in enumerate(family_items(family, split, cfg, seen[family])):
                            rel = f"images/{split}/{family}/{i:06d}.png"
                            Image.fromarray(item.pixels).save(tmp / rel)
                            f.write(json.dumps(row_of(item, family, [rel])) + "\n")
                            counts[split] += 1
                            bar.update()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**counts, "out": str(out)}


def row_of(item: Item, family: str, images: list[str]) -> dict:
    """The JSONL row of one item (the documented format)."""
    messages = [{"role": "user", "content": f"{IMAGE_MARKER}\n{item.question}"},
                {"role": "assistant", "content": item.answer}]  # fmt: skip
    return {"images": images, "messages": messages, "family": family, "caption": item.caption, "meta": item.meta}


# ---- reading the format ------------------------------------------------------------------------------------


def read_image_rows(path: str | Path, marker: str = IMAGE_MARKER) -> list[dict]:
    """The rows of an image JSONL file, checked: `images` a list of paths (relative ones resolved against
    the file's folder) that exist, `messages` a list of {role, content} whose `marker` count equals
    len(images), the last one the assistant's answer. Each row comes back with `images` as absolute paths;
    a bad row raises ImageDataError naming `file:line`."""
    path = Path(path)
    rows = []
    for where, row in iter_jsonl(path, ImageDataError):
        rows.append(check_row(row, where, path.parent, marker))
    if not rows:
        raise ImageDataError(f"{path}: no rows")
    return rows


def check_row(row: dict, where: str, root: Path, marker: str = IMAGE_MARKER) -> dict:
    images, messages = row.get("images", []), row.get("messages")
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ImageDataError(f"{where}: 'images' must be a list of image paths")
    if not isinstance(messages, list) or not messages:
        raise ImageDataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ImageDataError(f"{where}: each message must be {{'role': str, 'content': str}}")
    if messages[-1]["role"] != "assistant":
        raise ImageDataError(f"{where}: the last message must be the assistant's answer")
    markers = sum(m["content"].count(marker) for m in messages)
    if markers != len(images):
        raise ImageDataError(f"{where}: {markers} {marker} marker(s) in the messages but {len(images)} image(s)")
    resolved = [str((root / p).resolve()) for p in images]
    missing = next((p for p in resolved if not Path(p).is_file()), None)
    if missing:
        raise ImageDataError(f"{where}: image {missing} does not exist")
    return {**row, "images": resolved, "family": str(row.get("family", "all"))}


def answer_of(row: dict) -> str:
    """The reference answer: the last assistant message."""
    return row["messages"][-1]["content"]


def load_images(row: dict) -> list[Any]:
    """The row's images as RGB PIL images (paths as read_image_rows resolved them)."""
    from PIL import Image

    out = []
    for p in row["images"]:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ImageDataError(f"{p}: not a readable image ({e})") from None
    return out
