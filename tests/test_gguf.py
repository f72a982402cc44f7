"""GGUF files (interop/gguf.py) against the llama.cpp project's own `gguf` package and transformers' GGUF
loader, on the two real files that install offline (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) and
on small files written here with gguf.GGUFWriter.

- every supported block format dequantizes bit for bit as gguf.quants does, and the codes kept by
  --keep-quantized stand for exactly the same fp32 weights;
- the real models' fp32 logits equal transformers' GGUF-loaded models (1e-4), greedy decoding agrees;
- export → import gives the same weights (f32 exactly, f16/q8_0/q4_0 exactly as their rounding), and
  transformers reads our exports;
- our reader (interop/gguf_file.py) gives GGUFReader's metadata values and tensor views on both real files;
- truncated, corrupt, foreign and unsupported files are refused with one line naming the file, and
  leave no output behind; crafted headers (a 2^60 count, a string past the end, unknown types, tensor
  data past the end) are refused at once, before anything is allocated.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gemma3_file, scramble, shared_file, smollm2_file
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

import gptstack.model
from gptstack.checkpoint import load_model, save_checkpoint
from gptstack.cli import main
from gptstack.config import get_preset
from gptstack.infer.generate import generate
from gptstack.infer.kvcache import KVCache
from gptstack.infer.sampling import SamplingParams
from gptstack.interop import gguf
from gptstack.interop.gguf import GGUFError
from gptstack.model import build_model
from gptstack.tokenizer import get_tokenizer, tokenizer_from_gguf, train_bpe
from gptstack.transforms.quantize import QuantizedEmbedding, QuantizedLinear, TiedHead

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads only the local files
Q = GGMLQuantizationType
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis converts light energy into",
]


@pytest.fixture(scope="module")
def smol_file() -> Path:
    return smollm2_file()


@pytest.fixture(scope="module")
def smol(smollm2_gguf, smollm2):
    """(metadata, tensors, fp32 model, keep-quantized model), the file parsed once per session."""
    meta, tensors = smollm2_gguf
    return meta, tensors, smollm2, gguf.gguf_model(meta, tensors, keep_quantized=True)


@pytest.fixture(scope="module")
def hf_smol(smollm2_hf):
    """transformers' own GGUF loader (it undoes llama.cpp's q/k interleaving itself), in fp32."""
    return smollm2_hf


# --- small files written here ----------------------------------------------------------------------------


def write_file(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], meta: dict | None = None) -> Path:
    """A GGUF file holding `tensors` (name → (fp32 array, block type), quantized with gguf.quants)."""
    w = GGUFWriter(path, arch)
    for key, value in (meta or {}).items():
        w.add_uint32(key, value)
    for name, (a, qtype) in tensors.items():
        w.add_tensor(name, quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf.quants writes these


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_every_block_format_dequantizes_bit_for_bit(tmp_path, qtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((12, 96)) * rng.uniform(0.01, 3, (12, 1))).astype(np.float32)
    _, tensors = gguf.open_gguf(write_file(tmp_path / "x.gguf", "qwen2", {"blk.0.attn_v.weight": (a, qtype)}))
    t = tensors["blk.0.attn_v.weight"]
    got = gguf.dequantize(t, gguf.ARCHS["qwen2"], get_preset("tiny-llama"))
    ref = quants.dequantize(np.asarray(t.data), qtype).copy()
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(ref)), qtype.name
    assert (got.numpy() != 0).any() and np.abs(got.numpy() - a).max() < 0.6 * np.abs(a).max()  # data, not zeros


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_kept_codes_stand_for_exactly_the_dequantized_weights(tmp_path, qtype):
    """Two tensors concatenated along the rows (as q/k/v into c_attn) and the llama q-row order undone:
    our int4/int8g layouts dequantize to gguf.quants' fp32 values bit for bit, and so does a lookup."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((128, 128)).astype(np.float32), rng.standard_normal((64, 128)).astype(np.float32)
    file = {"blk.0.attn_q.weight": (q, qtype), "blk.0.attn_k.weight": (k, qtype)}
    _, tensors = gguf.open_gguf(write_file(tmp_path / "x.gguf", "llama", file))
    cfg = get_preset("tiny-llama", n_embd=128, n_head=2, n_kv_head=1)  # 2 query heads and 1 key head of 64 rows
    arch, sources = gguf.ARCHS["llama"], [tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_k.weight"]]
    ref = torch.cat([gguf.dequantize(t, arch, cfg) for t in sources])  # (192, 128), rows in our order
    method = gguf.KEPT[qtype]
    layer = QuantizedLinear(128, 192, False, method, 32)
    layer.load_state_dict({k.split(".", 1)[1]: v for k, v in gguf.kept_tensors("m", sources, arch, cfg).items()})
    assert torch.equal(layer.dequantize(), ref)
    raw = torch.from_numpy(quants.dequantize(np.asarray(sources[0].data), qtype))  # llama.cpp's row order
    assert not torch.equal(ref[:128], raw) and torch.equal(ref[:128], raw[gguf.qk_order(128, cfg.n_head)])
    if method == "int8g":
        table = QuantizedEmbedding(192, 128, 32)
        table.load_state_dict(layer.state_dict())
        idx = torch.tensor([[0, 191, 7], [3, 3, 64]])
        assert torch.equal(table(idx), ref[idx])


def test_unknown_block_type_architecture_and_bad_files_are_one_line_errors(tmp_path):
    good = write_file(tmp_path / "good.gguf", "llama", {"token_embd.weight": (np.ones((8, 32), np.float32), Q.F32)})
    cases = {
        "not a GGUF file (wrong magic": tmp_path / "notes.gguf",
        "truncated or corrupt": tmp_path / "cut.gguf",
        "architecture 'mamba' is not supported": write_file(
            tmp_path / "mamba.gguf", "mamba", {"token_embd.weight": (np.ones((8, 32), np.float32), Q.F32)}
        ),
        "no such file": tmp_path / "missing.gguf",
    }
    cases["not a GGUF file (wrong magic"].write_text("hello, not a model\n" * 10)
    cases["truncated or corrupt"].write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    for expected, path in cases.items():
        with pytest.raises(GGUFError) as e:
            gguf.load_gguf(path)
        assert expected in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a block type we do not read: Q2_K written as raw blocks of the right size
    raw = np.random.default_rng(0).integers(0, 255, (8, 84), dtype=np.uint8)  # 256 weights per 84-byte block
    w = GGUFWriter(tmp_path / "q2k.gguf", "llama")
    for key, value in {"llama.block_count": 1, "llama.embedding_length": 256, "llama.attention.head_count": 4,
                       "llama.feed_forward_length": 64, "llama.context_length": 32}.items():  # fmt: skip
        w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", raw, raw_dtype=Q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"q2k\.gguf: tensor token_embd\.weight has block type Q2_K"):
        gguf.gguf_model(*gguf.open_gguf(tmp_path / "q2k.gguf"), where=str(tmp_path / "q2k.gguf"))


def test_cli_refuses_a_bad_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)  # right magic, garbage counts
    out = tmp_path / "ckpt"
    assert main(["convert", "gguf-import", str(bad), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptstack convert: error: ") and str(bad) in err and "\n" not in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


# --- the reader: GGUFReader's results, and crafted headers refused -------------------------------------------


def test_our_reader_gives_ggufreaders_values_and_tensors():
    """GGUFReader as the oracle on SmolLM2's file: the same keys in order, each value of the same Python type
    and equal (the 49k-string vocabulary and merges, int token types), the same tensors with the same type,
    ggml shape, and a read-only view of the same bytes in the same dtype and shape. Gemma 3's file (262k
    strings, float scores, Q4_K/Q5_0/Q6_K blocks) is checked through what is built from it: every tensor bit
    for bit and the logits against transformers' loader (which reads with GGUFReader), and the tokenizer's
    ids against transformers' (test_real_tokenizers); GGUFReader alone takes 12-20 s to parse it."""
    path = smollm2_file()
    meta, tensors = gguf.open_gguf(path)
    reader = GGUFReader(path)
    ref = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(meta) == list(ref) and len(meta["tokenizer.ggml.tokens"]) > 40_000
    for k, v in ref.items():
        assert type(meta[k]) is type(v) and meta[k] == v, k
        if isinstance(v, list):
            assert [type(x) for x in meta[k]] == [type(x) for x in v], k
    assert list(tensors) == [t.name for t in reader.tensors]
    for r in reader.tensors:
        t = tensors[r.name]
        assert t.tensor_type is r.tensor_type and t.shape.dtype == r.shape.dtype and (t.shape == r.shape).all()
        assert (t.data.dtype, t.data.shape, t.data.flags.writeable) == (r.data.dtype, r.data.shape, False), r.name
        assert np.asarray(t.data).tobytes() == np.asarray(r.data).tobytes(), r.name


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _str(key.encode()) + struct.pack("<I", vtype) + payload


def crafted(kvs: list[bytes], infos: list[bytes], data: bytes, version: int = 3, counts=None) -> bytes:
    """A GGUF file by hand: header, KV entries, tensor infos, padding to 32, data."""
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % 32) + data


def test_crafted_corrupt_headers_are_refused_at_once(tmp_path):
    """Each corruption of a valid hand-written file is a one-line GGUFError naming the file, well under a
    second: counts and lengths are checked against the bytes left before anything is allocated."""
    name = _kv("general.name", 8, _str(b"tiny"))
    vocab = _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _str(b"a") + _str(b"bc"))
    scores = _kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2) + struct.pack("<2f", 0.5, -1.0))
    info = _str(b"w") + struct.pack("<I2QIQ", 2, 3, 2, int(Q.F32), 0)  # ggml [3, 2]: (2, 3) fp32 at 0
    bad_type = _str(b"w") + struct.pack("<I2QIQ", 2, 3, 2, 99, 0)
    weights = np.arange(6, dtype=np.float32).tobytes()
    good = tmp_path / "good.gguf"
    good.write_bytes(crafted([name, vocab, scores], [info], weights))
    meta, tensors = gguf.open_gguf(good)
    assert meta == {"general.name": "tiny", "tokenizer.ggml.tokens": ["a", "bc"], "tokenizer.ggml.scores": [0.5, -1.0]}
    assert tensors["w"].data.tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["w"].shape.tolist() == [3, 2]
    huge = 2**60
    cases = {
        "huge-kv-count": (crafted([name], [info], weights, counts=(1, huge)), "truncated or corrupt"),
        "huge-array": (crafted([_kv("a", 9, struct.pack("<IQ", 4, huge))], [info], weights), "truncated or corrupt"),
        "huge-strings": (crafted([_kv("a", 9, struct.pack("<IQ", 8, huge))], [info], weights), "truncated or corrupt"),
        "string-past-end": (crafted([_kv("a", 8, struct.pack("<Q", huge) + b"x")], [], b""), "truncated or corrupt"),
        "bad-value-type": (crafted([_kv("a", 13, b"\0" * 8)], [info], weights), "a has unknown value type 13"),
        "nested-array": (crafted([_kv("a", 9, struct.pack("<IQ", 9, 1))], [], b""), "nested arrays"),
        "bad-tensor-type": (crafted([name], [bad_type], weights), "tensor w has unknown ggml type 99"),
        "data-past-end": (crafted([name], [info], weights[:-4]), "truncated or corrupt (tensor w's 24 bytes"),
        "not-utf8": (crafted([_kv("general.name", 8, _str(b"\xff\xfe"))], [], b""), "field general.name is unreadable"),
        "duplicate-key": (crafted([name, name], [info], weights), "general.name appears twice"),
        "duplicate-tensor": (crafted([name], [info, info], weights), "tensor w appears twice"),
        "version-9": (crafted([name], [info], weights, version=9), "GGUF version 9 is not supported"),
        "empty": (b"", "truncated or corrupt"),
    }
    for case, (raw, expected) in cases.items():
        path = tmp_path / f"{case}.gguf"
        path.write_bytes(raw)
        start = time.perf_counter()
        with pytest.raises(GGUFError) as e:
            gguf.open_gguf(path)
        took = time.perf_counter() - start
        message = str(e.value)
        assert expected in message and str(path) in message and "\n" not in message, (case, message)
        assert took < 0.5, (case, took)


# --- export: a model trained here, written for llama.cpp and read back ----------------------------------------


def exported(model, tmp_path: Path, qtype: str):
    """(metadata, model read back) of `model` written as a GGUF file of `qtype`."""
    path = gguf.write_gguf(model, model.tokenizer, tmp_path / f"m-{qtype}.gguf", qtype)
    meta, tensors = gguf.open_gguf(path)
    return meta, gguf.gguf_model(meta, tensors, where=str(path))


@functools.cache
def bpe():
    """A byte-level BPE with merges (llama.cpp's gpt2 vocabularies need them), trained on gptstack's model file."""
    return train_bpe([Path(gptstack.model.__file__).read_text()], 320, pattern="gpt2")


def small(preset: str, **overrides):
    tok = bpe()
    model = scramble(build_model(get_preset(preset, vocab_size=tok.n_vocab, **overrides), seed=0)).eval()
    model.tokenizer = tok
    return model


@pytest.mark.parametrize(
    "preset,overrides",
    [("tiny-llama", {}), ("tiny-llama", dict(tie_embeddings=True, n_kv_head=1)), ("tiny", {})],
    ids=["llama-gqa", "llama-mqa-tied", "gpt2"],
)
def test_export_then_import_gives_the_same_weights(tmp_path, preset, overrides):
    model = small(preset, **overrides)
    ours = model.state_dict()
    for qtype in ("f32", "f16", "q8_0", "q4_0"):
        meta, back = exported(model, tmp_path, qtype)
        assert back.config == model.config, qtype
        assert meta["general.architecture"] == ("gpt2" if preset == "tiny" else "llama")
        for name, theirs in back.state_dict().items():
            w = ours[name]
            if w.dim() == 1 or qtype == "f32":
                expected = w  # norms and biases stay f32
            elif qtype == "f16" or w.shape[1] % 32:  # rows of no whole number of blocks: f16, as llama.cpp does
                expected = w.half().float()
            else:  # what gguf.quants' own quantize → dequantize gives (the q/k row order is a permutation)
                g = gguf.EXPORT_TYPES[qtype]
                expected = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), g), g))
            assert torch.equal(theirs, expected), (qtype, name)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
def test_transformers_reads_our_export(tmp_path, preset):
    """An independent GGUF reader (transformers', which undoes llama.cpp's q/k interleaving itself)
    computes our logits from our f32 file. GPT-2: transformers takes n_positions from its own default
    (1024), not from the file, so the model here has 1024 positions too."""
    transformers = pytest.importorskip("transformers")
    model = small(preset, **({"block_size": 1024} if preset == "tiny" else {}))
    path = gguf.write_gguf(model, model.tokenizer, tmp_path / "m.gguf", "f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 7, 100, 3, 64, 200]])
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_qwen2_files_import_as_transformers_reads_them(tmp_path):
    """The qwen2 table (q/k/v biases, no q/k interleaving) on a file written here: it reads back as the
    same model, and transformers' qwen2 GGUF loader computes its logits."""
    transformers = pytest.importorskip("transformers")
    model = small("tiny-llama", qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
    path = gguf.write_gguf(model, model.tokenizer, tmp_path / "q.gguf", "f32")  # q/k/v biases alone: qwen2
    back = gguf.load_gguf(path)
    assert back.config == model.config and gguf.read_gguf_metadata(path)["general.architecture"] == "qwen2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[1, 5, 7, 100, 3, 64, 200]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_export_refuses_what_the_format_cannot_say(tmp_path):
    for overrides, field in [(dict(attn_pattern="dense,local"), "attn_pattern"), (dict(qk_norm=True), "qk_norm")]:
        with pytest.raises(GGUFError, match=field):
            gguf.write_gguf(small("tiny-llama", **overrides), bpe(), tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="biases"):
        gguf.write_gguf(small("tiny-llama", bias=True), bpe(), tmp_path / "x.gguf")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(GGUFError, match="not a GGUF file; refusing"):
        gguf.write_gguf(small("tiny"), bpe(), notes)
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.merges would be an empty list"):
        gguf.write_gguf(small("tiny"), get_tokenizer("bytes"), tmp_path / "bytes.gguf")
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_export_and_import_round_trip(tmp_path, capsys):
    model = small("tiny-llama")
    save_checkpoint(model, tmp_path / "ckpt", tokenizer=model.tokenizer)
    assert main(["convert", "gguf-export", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert main(["convert", "gguf-import", str(tmp_path / "m.gguf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # q8_0 rounding only: the logits stay close, the config and tokenizer are the same
        assert (back(ids) - model(ids)).abs().max() < 0.05 * model(ids).abs().max()
    assert back.config == model.config and back.tokenizer.encode("hi there") == model.tokenizer.encode("hi there")
    assert gguf.read_gguf_metadata(tmp_path / "m.gguf")["general.file_type"] == 7  # MOSTLY_Q8_0


# --- the real files -----------------------------------------------------------------------------------------


def nbytes(model) -> int:
    """Bytes of a model's weights, a tied table counted once."""
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loader(smol, hf_smol):
    meta, _, ours, _ = smol
    tok = tokenizer_from_gguf(meta)  # the file's own tokenizer (tests/test_real_tokenizers.py holds it to HF's)
    assert meta["general.architecture"] == "llama" and ours.config.n_kv_head == 3 and ours.config.tie_embeddings
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf_smol(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_equal_transformers(smol, hf_smol):
    meta, _, ours, _ = smol
    hf, tok = hf_smol, tokenizer_from_gguf(meta)
    prompt = tok.encode(PROMPTS[2])  # a prompt whose greedy continuation runs 64 tokens without <|im_end|>
    mine = list(generate(ours, prompt, SamplingParams(temperature=0.0, max_tokens=64), stop_tokens=frozenset({2})))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    assert len(mine) == 64 and mine == out[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_smollm2_keep_quantized_is_the_same_model_in_a_fifth_of_the_memory(smol):
    """Every kept module (Q4_1 → int4 g32, the Q8_0 table → int8g, the tied head reading it) dequantizes
    to exactly the fp32 model's weight, so prefill, which dequantizes and runs F.linear, is bitwise equal.
    Decoding runs the C kernels, which sum the same products in another order: fp32 reassociation over
    rows of 576-1536 terms moves logits of magnitude ~20 by ~6e-5 here; 1e-3 leaves a margin of ~16."""
    _, _, fp32, kept = smol
    modules = kept.quantization["modules"]
    assert modules["transformer.wte"] == {"method": "int8g", "group_size": 32}
    assert {v["method"] for k, v in modules.items() if k != "transformer.wte"} == {"int4"} and len(modules) == 121
    assert isinstance(kept.lm_head, TiedHead) and kept.lm_head.table is kept.transformer.wte
    weights = fp32.state_dict()
    for name in modules:
        assert torch.equal(kept.get_submodule(name).dequantize(), weights[f"{name}.weight"]), name
    assert nbytes(kept) < 120 * 2**20 < 500 * 2**20 < nbytes(fp32)  # 106 MiB vs 513 MiB
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 6632, 314]])
    with torch.no_grad():
        a, b = kept(ids), fp32(ids)  # the kept head runs the tiled int8g kernel: another summation order than BLAS
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        caches = [KVCache(m.config, 1, 32, "cpu", torch.float32) for m in (fp32, kept)]
        for t in ids[0]:
            a, b = (m(t.view(1, 1), kv_cache=c) for m, c in zip((fp32, kept), caches, strict=True))
            assert (a - b).abs().max() < 1e-3
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert list(generate(kept, ids[0].tolist(), params)) == list(generate(fp32, ids[0].tolist(), params))


@pytest.mark.slow
def test_smollm2_keep_quantized_checkpoint_round_trip_through_the_cli(smol, smol_file, tmp_path, capsys):
    _, _, _, kept = smol
    assert main(["convert", "gguf-import", str(smol_file), str(tmp_path / "ckpt"), "--keep-quantized"]) == 0
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    back = load_model(tmp_path / "ckpt")
    assert size < 120 * 2**20 and back.quantization == kept.quantization
    ids = torch.tensor([[1, 504, 3575, 282, 4649]])
    with torch.no_grad():
        assert torch.equal(back(ids), kept(ids))
    assert back.tokenizer.encode("The capital of France") == [504, 3575, 282, 4649]


@pytest.mark.slow
def test_a_truncated_real_file_is_refused(smol_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smol_file, "rb") as f:
        cut.write_bytes(f.read(20_000_000))  # the metadata and half the tensors
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated or corrupt"):
        gguf.read_gguf_metadata(cut)


@pytest.mark.slow
def test_gemma3_tensors_logits_and_kept_table_equal_the_references(gemma3_gguf, gemma3, gemma3_hf):
    """Every tensor of every block format in the file (Q8_0, Q5_0, Q4_K, Q6_K, F32) lands bit for bit where
    the table says, minus the 1 that llama.cpp's converter added to the norms; the logits equal
    transformers' GGUF-loaded model (1e-4) on a short prompt and on 700 tokens of Shakespeare, which
    crosses the 512-token sliding window of the local layers; keeping the Q8_0 token table as codes
    changes no prefill logit."""
    path = gemma3_file()
    (meta, tensors), ours, hf = gemma3_gguf, gemma3, gemma3_hf
    cfg, state, seen = ours.config, ours.state_dict(), set()
    assert (cfg.qk_norm, cfg.sandwich_norm, cfg.norm_offset, cfg.mlp) == (True, True, 1.0, "geglu")
    assert cfg.attn_window == 512 and cfg.attn_kinds[:6] == ["local"] * 5 + ["dense"]
    for r in gguf.expand(cfg, gguf.ARCHS["gemma3"]):
        parts = [quants.dequantize(np.asarray(tensors[n].data), tensors[n].tensor_type) for n in r.theirs]
        ref = np.concatenate(parts) - np.float32(r.ours.split(".")[-2].startswith(("ln_", "q_norm", "k_norm")))
        assert torch.equal(state[r.ours], torch.from_numpy(ref.reshape(state[r.ours].shape))), r.ours
        seen.update(tensors[n].tensor_type for n in r.theirs)
    assert seen == {Q.F32, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K}
    tok = tokenizer_from_gguf(meta)
    text = shared_file("text/tinyshakespeare.txt").read_text()[:6000]
    short, long = (torch.tensor([tok.bos_prefix + ids]) for ids in (tok.encode(PROMPTS[0]), tok.encode(text)[:700]))
    assert long.size(1) > cfg.attn_window
    with torch.no_grad():
        for ids in (short, long):
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        kept = gguf.gguf_model(meta, tensors, keep_quantized=True, where=str(path))
        assert kept.quantization == {"modules": {"transformer.wte": {"method": "int8g", "group_size": 32}}}
        a, b = kept(short), ours(short)  # mixed q/k/v types (Q5_0, Q8_0) stay fp32; the kept head: tiled kernel
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
