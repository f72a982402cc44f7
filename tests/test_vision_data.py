"""`gptstack vision data`: deterministic, disjoint splits, and every answer re-derived from the rendered pixels
(colour by the pixels' colour, shape by its silhouette, count by connected components, chart values by bar
heights and line markers, reading by matching rendered text, digits against scikit-learn's own arrays)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import need

for _pkg in ("PIL", "sklearn", "skimage"):
    need(importlib.util.find_spec(_pkg) is not None, f"the {_pkg} package (the vision extra)")

from PIL import Image, ImageDraw  # noqa: E402
from skimage.measure import label  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from gptstack.cli import main  # noqa: E402
from gptstack.data import images as I  # noqa: E402

N, N_TEST = 40, 20


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vis") / "data"
    r = I.write_image_data(I.ImageDataConfig(out=str(out), n=N, n_test=N_TEST, progress=False))
    assert r["train"] == N * 6 and r["test"] == N_TEST * 6
    return out


def rows(data: Path, split: str, family: str | None = None) -> list[dict]:
    got = I.read_image_rows(data / f"{split}.jsonl")
    return [r for r in got if family is None or r["family"] == family]


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(row["images"][0]).convert("RGB"))


def ink(px: np.ndarray) -> np.ndarray:
    return (px != 255).any(-1)


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_format_and_determinism(data, tmp_path):
    row = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    assert row["images"] == ["images/train/colour/000000.png"]
    assert row["messages"][0] == {"role": "user", "content": "<image>\nWhat colour is the shape?"}
    assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"] in row["caption"]
    assert Image.open(data / row["images"][0]).size == (64, 64)
    again = tmp_path / "again"
    I.write_image_data(I.ImageDataConfig(out=str(again), n=N, n_test=N_TEST, progress=False))
    assert tree_digest(again) == tree_digest(data)  # the same config writes the same bytes
    other = tmp_path / "other"
    I.write_image_data(
        I.ImageDataConfig(out=str(other), families=("colour",), n=N, n_test=N_TEST, seed=1, progress=False)
    )
    assert (other / "train.jsonl").read_text() != "".join((data / "train.jsonl").read_text().splitlines(True)[:N])


def test_splits_disjoint(data):
    train = {I.digest(pixels(r)) for r in rows(data, "train")}
    test = [I.digest(pixels(r)) for r in rows(data, "test")]
    assert not train & set(test)
    idx = {s: {r["meta"]["index"] for r in rows(data, s, "digits")} for s in ("train", "test")}
    assert not idx["train"] & idx["test"]  # different real digits, not shifted copies
    # the dedup check itself: a test image equal to a training one is drawn again
    cfg = I.ImageDataConfig(out="unused", families=("colour",), n=1, n_test=1, progress=False)
    first = next(I.family_items("colour", "test", cfg, set()))
    redrawn = next(I.family_items("colour", "test", cfg, {I.digest(first.pixels)}))
    assert I.digest(redrawn.pixels) != I.digest(first.pixels)


def test_colour_from_pixels(data):
    palette = {v: k for k, v in I.COLOURS.items()}
    for r in rows(data, "test", "colour"):
        px = pixels(r)[ink(pixels(r))]
        values, counts = np.unique(px, axis=0, return_counts=True)
        assert palette[tuple(int(v) for v in values[counts.argmax()])] == I.answer_of(r)


def silhouette(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    extent = box.mean()
    if extent > 0.95:
        return "square"
    if extent > 0.7:
        return "circle"
    widest = np.argmax(box.sum(1)) / (len(box) - 1)  # triangle: widest at the base; diamond: in the middle
    return "triangle" if widest > 0.8 else "diamond"


def test_shape_from_silhouette(data):
    got = [(silhouette(ink(pixels(r))), I.answer_of(r)) for r in rows(data, "test", "shape")]
    assert all(a == b for a, b in got), got
    assert len({b for _, b in got}) == len(I.SHAPES)  # every shape occurs


def test_count_by_connected_components(data):
    for r in rows(data, "test", "count"):
        assert label(ink(pixels(r)), connectivity=2).max() == int(I.answer_of(r))


def chart_values(px: np.ndarray, meta: dict) -> list[int]:
    n = len(meta["labels"])
    base, _, unit, xs = I.chart_layout(px.shape[0], n)
    if meta["kind"] == "bar":
        blue = (px == I.COLOURS["blue"]).all(-1)
        return [round(blue[:, int(x)].sum() / unit) for x in xs]
    red = (px == I.COLOURS["red"]).all(-1)  # the marker's centre row at each label's x
    return [round((base - np.nonzero(red[:, int(x)])[0].mean()) / unit) for x in xs]


def test_chart_values_from_pixels(data):
    kinds = set()
    for r in rows(data, "test", "chart"):
        values, meta, question = chart_values(pixels(r), r["meta"]), r["meta"], r["messages"][0]["content"]
        kinds.add(meta["kind"])
        if "largest" in question:
            assert meta["labels"][int(np.argmax(values))] == I.answer_of(r)
        else:
            asked = meta["labels"].index(question.rstrip("?")[-1])
            assert values[asked] == int(I.answer_of(r)), (values, meta)
    assert kinds == {"bar", "line"}


def render_text(text: str, px: int) -> np.ndarray:
    img = Image.new("RGB", (4 * px * len(text), 3 * px), "white")
    ImageDraw.Draw(img).text((px, px), text, fill=(0, 0, 0), font=I.font(px))
    a = np.asarray(img)
    ys, xs = np.nonzero(ink(a))
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def test_reading_matches_only_the_answer(data):
    candidates = [*I.WORDS, *map(str, range(10, 100))]
    for r in rows(data, "test", "read")[:10]:
        a = pixels(r)
        ys, xs = np.nonzero(ink(a))
        crop = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        same = [
            c for c in candidates if (t := render_text(c, r["meta"]["px"])).shape == crop.shape and (t == crop).all()
        ]
        assert same == [I.answer_of(r)]


def test_digits_are_sklearns(data):
    d = load_digits()
    s = I.digit_scale(64)
    for split in ("train", "test"):
        for r in rows(data, split, "digits"):
            dx, dy = r["meta"]["offset"]
            cells = pixels(r)[dy + s // 2 : dy + 8 * s : s, dx + s // 2 : dx + 8 * s : s, 0]  # (8, 8) cell centres
            recovered = np.rint((255 - cells.astype(float)) * 16 / 255)
            assert (recovered == d.images[r["meta"]["index"]]).all()
            assert str(d.target[r["meta"]["index"]]) == I.answer_of(r)


def test_errors(data, tmp_path, capsys):
    with pytest.raises(I.ImageDataError, match="unknown image family 'cars'"):
        I.ImageDataConfig(out="x", families=("colour,cars",))
    with pytest.raises(I.ImageDataError, match="--n and --n-test must be ≥ 1"):
        I.ImageDataConfig(out="x", n=0)
    with pytest.raises(I.ImageDataError, match="exceeds the 359 held-out digits"):
        I.ImageDataConfig(out="x", n_test=400)
    with pytest.raises(I.ImageDataError, match="already exists"):
        I.write_image_data(I.ImageDataConfig(out=str(data), n=1, n_test=1, progress=False))
    good = (data / "test.jsonl").read_text().splitlines()[0]
    cases = {"2 <image> marker(s) in the messages but 1 image": good.replace("<image>", "<image><image>"),
             "does not exist": good.replace("000000.png", "999999.png"),
             "the last message must be the assistant's": good.replace('"assistant"', '"user"')}  # fmt: skip
    for message, line in cases.items():
        bad = data / "bad.jsonl"
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(I.ImageDataError, match=rf"bad.jsonl:2: .*{re.escape(message)}"):
            I.read_image_rows(bad)
    assert main(["vision", "data", "--out", str(tmp_path / "v"), "--families", "shape,nope"]) == 2
    assert "unknown image family 'nope'" in capsys.readouterr().err and not (tmp_path / "v").exists()


def test_cli_writes_a_set(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["vision", "data", "--out", str(out), "--families", "digits", "count", "--n", "3", "--n-test", "2",
                 "--no-progress"]) == 0  # fmt: skip
    assert "wrote 6 training and 4 held-out items" in capsys.readouterr().out
    assert [r["family"] for r in rows(out, "test")] == ["digits", "digits", "count", "count"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
