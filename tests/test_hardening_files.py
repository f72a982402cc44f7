"""The file-handling attacks of issue 24, each reproduced: writing over a folder a command did not write
(init, quantize, hf-import, data prepare), a config.json whose model would not fit in memory, a gzip
bomb, JSONL lines that used to abort a whole run, and symbolic links out of an input folder."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
import zstandard
from conftest import PREPARE, VARIANTS, scramble

from gptstack.checkpoint import (
    CheckpointError,
    InitConfig,
    QuantizeConfig,
    _tensor_bytes,
    check_config_memory,
    estimate_memory,
    init_checkpoint,
    load_model,
    quantize_checkpoint,
    save_checkpoint,
)
from gptstack.config import ModelConfig, get_preset
from gptstack.data.audit import PrepareError
from gptstack.data.pipeline import LEDGER, LocalExecutor, PrepareConfig, prepare
from gptstack.data.shards import read_manifest
from gptstack.data.sources import Document, Skip, iter_documents
from gptstack.model import GPT, build_model
from gptstack.tokenizer import EOT, GPT2_PATTERN, Tokenizer

TINY = ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16)
TINY_INIT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}  # `gptstack init tiny --set …`


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def a_users_folder(path: Path) -> dict[str, bytes]:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return tree(path)


# --- 3. writing over a folder deletes it --------------------------------------------------------------------
def test_init_refuses_a_folder_that_is_not_a_checkpoint_and_deletes_nothing(tmp_path):
    before = a_users_folder(tmp_path / "mine")  # `gptstack init tiny mine` deleted all of it
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'mine'} is a non-empty folder that is not a gptstack"):
        init_checkpoint(InitConfig("tiny", str(tmp_path / "mine"), tokenizer="bytes", overrides=TINY_INIT))
    assert tree(tmp_path / "mine") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        init_checkpoint(InitConfig("tiny", str(tmp_path / "file"), tokenizer="bytes", overrides=TINY_INIT))
    path, _ = init_checkpoint(InitConfig("tiny", str(tmp_path / "empty"), tokenizer="bytes", overrides=TINY_INIT))
    assert load_model(path).config.n_layer == 1


def test_replacing_our_checkpoint_is_atomic_and_never_deletes_a_file_we_did_not_write(tmp_path):
    tok = Tokenizer("mine", {bytes([i]): i for i in range(256)}, GPT2_PATTERN, {EOT: 256})
    a, b = (scramble(build_model(TINY, seed=0), seed=s).eval() for s in (1, 2))
    ck = save_checkpoint(a, tmp_path / "ck", tokenizer=tok)
    meta = json.loads((ck / "config.json").read_text())
    assert "tokenizer/ranks.tiktoken" in meta["files"]  # the tokenizer folder is checksummed too
    (ck / "tokenizer" / "notes.txt").write_text("mine")
    kept = tree(ck)
    with pytest.raises(CheckpointError, match=r"tokenizer/notes\.txt, which it did not write"):
        save_checkpoint(b, ck, tokenizer=tok)
    assert tree(ck) == kept and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    (ck / "tokenizer" / "notes.txt").unlink()
    save_checkpoint(b, ck, tokenizer=tok)  # only our own files: replaced
    idx = torch.randint(0, 256, (1, 8))
    assert torch.equal(load_model(ck)(idx), b(idx))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the old folder is gone, nothing else is
    ranks = ck / "tokenizer" / "ranks.tiktoken"
    ranks.write_text("".join(ranks.read_text().splitlines(keepends=True)[:-1]))  # one rank fewer: still parses
    with pytest.raises(CheckpointError, match=r"tokenizer/ranks\.tiktoken: truncated or altered"):
        load_model(ck)


def test_a_checkpoint_from_before_tokenizer_files_were_listed_is_still_replaced(tmp_path):
    tok = Tokenizer("mine", {bytes([i]): i for i in range(256)}, GPT2_PATTERN, {EOT: 256})
    ck = save_checkpoint(build_model(TINY, seed=0), tmp_path / "ck", tokenizer=tok)
    meta = json.loads((ck / "config.json").read_text())
    meta["files"] = {k: v for k, v in meta["files"].items() if "/" not in k}  # as written before issue 24
    (ck / "config.json").write_text(json.dumps(meta))
    save_checkpoint(build_model(TINY, seed=1), ck, tokenizer=tok)
    assert "tokenizer/ranks.tiktoken" in json.loads((ck / "config.json").read_text())["files"]


def test_quantize_and_hf_import_refuse_a_foreign_out_before_any_work(tmp_path):
    src = save_checkpoint(build_model(TINY, seed=0), tmp_path / "src", tokenizer="bytes")
    before = a_users_folder(tmp_path / "mine")
    with pytest.raises(CheckpointError, match="not a gptstack checkpoint"):
        quantize_checkpoint(QuantizeConfig(str(src), str(tmp_path / "mine")))
    assert tree(tmp_path / "mine") == before
    if not os.environ.get("CI"):
        pytest.importorskip("transformers")
    from gptstack.interop.convert import hf_import

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")  # refused before the folder is even read as a model
    with pytest.raises(CheckpointError, match="not a gptstack checkpoint"):
        hf_import(tmp_path / "hf", tmp_path / "mine")
    assert tree(tmp_path / "mine") == before


# --- 11. a config.json whose model would not fit ------------------------------------------------------------
@pytest.mark.parametrize("name", [*sorted(VARIANTS), "gemma3-270m", "moe-8x7b", "gpt3-175b"])
def test_the_memory_estimate_counts_exactly_what_the_meta_model_holds(name):
    cfg = VARIANTS.get(name) or get_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    est = estimate_memory(cfg)  # from one- and two-layer models, whatever n_layer says
    assert (est.weights, est.derived) == _tensor_bytes(model)
    assert est.weights == 4 * sum(p.numel() for p in model.parameters())  # fp32 parameters, tied ones once


def test_a_quantized_checkpoint_is_estimated_by_its_codes_not_fp32():
    cfg = get_preset("gpt2-small")
    int8 = estimate_memory(cfg, {"method": "int8"}).weights
    assert 0.35 * estimate_memory(cfg).weights < int8 < 0.6 * estimate_memory(cfg).weights  # embedding stays fp32


def test_a_config_over_the_limit_is_refused_naming_the_file(tmp_path):
    cfg = ModelConfig(vocab_size=1000, block_size=25_000_000, n_layer=2, n_head=4, n_embd=256, pos="rope")
    with pytest.raises(CheckpointError, match=r"x/config\.json: this model needs \d+\.\d\d GB .*block_size 25,000,000"):
        check_config_memory(cfg, where="x/config.json", limit=8 << 30)
    assert check_config_memory(cfg.replace(block_size=1024), limit=8 << 30).total < 64 << 20
    with pytest.raises(CheckpointError, match="n_layer 10,000,000"):  # no meta model of 10M layers is built
        check_config_memory(ModelConfig(vocab_size=10, n_layer=10_000_000, n_head=1, n_embd=2), limit=8 << 30)
    with pytest.raises(CheckpointError, match="bad quantization entry"):
        check_config_memory(cfg, quantization={"method": "int3"})


def test_init_refuses_a_config_that_would_not_fit_and_writes_nothing(tmp_path):
    bomb = {**TINY_INIT, "block_size": 10**9}  # a learned position table of 10⁹ × 16 fp32: 64 GB
    with pytest.raises(CheckpointError, match=r"64\.0\d GB to build"):
        init_checkpoint(InitConfig("tiny", str(tmp_path / "ck"), tokenizer="bytes", overrides=bomb))
    assert not (tmp_path / "ck").exists()


BOMBS = """
import gzip, json, sys
from pathlib import Path
from gptstack.checkpoint import CheckpointError, load_model
from gptstack.data.sources import Skip, iter_documents
from gptstack.model import build_model
from gptstack.config import ModelConfig

def status(key):  # kB from /proc/self/status
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))

def growth(fn):  # MB the peak RSS rises over the current one while fn runs (ru_maxrss is inherited over exec)
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, this process's peak
    before = status("VmRSS")
    result = fn()
    return (status("VmHWM") - before) / 1024, result

def load(ck):
    try:
        load_model(ck)
    except CheckpointError as e:
        return str(e)

build_model(ModelConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=128, pos="rope"))  # lazy inits
out = {}
out["config"], out["config_error"] = growth(lambda: load(Path(sys.argv[1])))
reasons = lambda: [x.reason for x in iter_documents([Path(sys.argv[2])], max_bytes=1_000_000) if isinstance(x, Skip)]
out["gzip"], out["gzip_skips"] = growth(reasons)
cfg = ModelConfig(vocab_size=256, block_size=200_000, n_layer=2, n_head=2, n_embd=128, pos="rope")
out["build"], _ = growth(lambda: build_model(cfg, seed=0))
print(json.dumps(out))
"""


def config_bomb(folder: Path) -> Path:
    """A checkpoint folder that is only a 700-byte config.json: RoPE over 10⁹ positions (1.4 TB of tables)."""
    folder.mkdir()
    model = ModelConfig(vocab_size=50257, block_size=10**9, n_layer=12, n_head=12, n_embd=768, pos="rope")
    config = {"format": "gptstack-checkpoint", "version": 1, "model": model.to_dict(), "files": {}}
    (folder / "config.json").write_text(json.dumps(config))
    assert len((folder / "config.json").read_bytes()) < 1000
    return folder


def gzip_bomb(path: Path, mb: int = 64) -> Path:
    """`mb` MB of zeros as a .txt.gz of about mb KB."""
    with gzip.open(path, "wb") as f:
        for _ in range(mb):
            f.write(bytes(1 << 20))
    return path


def test_the_config_bomb_is_refused_before_anything_is_built(tmp_path):
    with pytest.raises(CheckpointError, match=r"bomb/config\.json: this model needs \d{3,}\.\d\d GB to build"):
        load_model(config_bomb(tmp_path / "bomb"))


def status(key: str) -> int:
    """A kB figure of /proc/self/status (VmRSS, VmHWM)."""
    return next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))


def rss_growth(fn) -> float:
    """MB this process's peak RSS rises over its current RSS while fn runs (Linux: VmHWM reset first)."""
    fn()  # once to warm up lazy initialisation
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    fn()
    return (status("VmHWM") - before) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
def test_a_config_without_its_weights_is_refused_before_its_tables_are_built(tmp_path):
    """A config that fits in memory (RoPE over 2M positions: about 0.5 GB) but names no weights used to
    be built in full before load_weights found model.safetensors missing."""
    ck = tmp_path / "ck"
    ck.mkdir()
    model = ModelConfig(vocab_size=256, block_size=2_000_000, n_layer=1, n_head=4, n_embd=128, pos="rope")
    (ck / "config.json").write_text(json.dumps({"format": "gptstack-checkpoint", "model": model.to_dict()}))

    def refused():
        with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
            load_model(ck)

    assert rss_growth(refused) < 32


def test_the_gzip_bomb_inflates_only_to_the_limit(tmp_path):
    bomb = gzip_bomb(tmp_path / "bomb.txt.gz")
    tracemalloc.start()  # the decompressed bytes are Python objects: traced
    try:
        skips = [x.reason for x in iter_documents([bomb], max_bytes=1_000_000)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skips == ["too_large"] and peak < 4 << 20, f"peak {peak / 2**20:.1f} MB for a 1 MB limit"


@pytest.mark.slow
def test_the_config_and_gzip_bombs_stay_within_a_bound_of_peak_rss(tmp_path):
    """The two bombs and a real build in a child process, with its peak RSS (VmHWM) reset before each."""
    ck, bomb = config_bomb(tmp_path / "bomb"), gzip_bomb(tmp_path / "bomb.txt.gz")
    run = subprocess.run([sys.executable, "-c", BOMBS, str(ck), str(bomb)],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    out = json.loads(run.stdout)
    assert "config.json: this model needs" in out["config_error"], out
    assert out["config"] < 32, f"the refused config raised the peak by {out['config']:.0f} MB"
    assert out["gzip_skips"] == ["too_large"]
    assert out["gzip"] < 16, f"the gzip bomb raised the peak by {out['gzip']:.0f} MB"
    est = estimate_memory(ModelConfig(vocab_size=256, block_size=200_000, n_layer=2, n_head=2, n_embd=128, pos="rope"))
    grew = out["build"] * 2**20
    assert 0.3 * est.total < grew <= est.total, f"built: {out['build']:.0f} MB, estimated {est.total / 2**20:.0f} MB"


# --- 12. decompression bombs -------------------------------------------------------------------------------
def test_every_compressed_format_stops_at_the_limit_and_bad_lines_do_not_end_a_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "in"
    d.mkdir()
    big = bytes(200_000)
    (d / "a.txt.gz").write_bytes(gzip.compress(big))
    (d / "b.txt.bz2").write_bytes(bz2.compress(big))
    (d / "c.txt.xz").write_bytes(lzma.compress(big))
    (d / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(big))
    (d / "e.txt.gz").write_bytes(gzip.compress(b"small enough"))
    lines = ['{"text": "first"}', json.dumps({"text": "x" * 100_000}), '{"text": "after"}']
    (d / "f.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    line = json.dumps({"text": "y"}) + " " * 200_000  # longer than any line a 1,000-byte text needs
    (d / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(f'{line}\n{{"text": "last"}}\n'.encode()))
    rows = [f"{i:05d}" + "z" * 95 for i in range(1000)]  # 100 KB inflated: over 64 × max_bytes
    pq.write_table(pa.table({"text": rows}), d / "h.parquet", compression="none", use_dictionary=False)
    (d / "h.parquet.gz").write_bytes(gzip.compress((d / "h.parquet").read_bytes()))
    (d / "h.parquet").unlink()
    out = list(iter_documents([d], max_bytes=1000))
    docs = {x.id: x.text for x in out if isinstance(x, Document)}
    skips = {x.id: x.reason for x in out if isinstance(x, Skip)}
    assert docs == {"e.txt.gz": "small enough", "f.jsonl.gz:1": "first", "f.jsonl.gz:3": "after",
                    "g.jsonl.zst:2": "last"}  # fmt: skip
    assert skips == {"a.txt.gz": "too_large", "b.txt.bz2": "too_large", "c.txt.xz": "too_large",
                     "d.txt.zst": "too_large", "f.jsonl.gz:2": "too_large", "g.jsonl.zst:1": "too_large",
                     "h.parquet.gz": "too_large"}  # fmt: skip


# --- 13. one bad JSONL line aborted the whole run ------------------------------------------------------------
def test_prepare_skips_and_counts_hostile_jsonl_lines(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    hostile = [
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's stack: RecursionError
        '{"text": "lone \\ud800 surrogate"}',  # valid JSON, no UTF-8 form
        '{"text": ' + "1" * 5000 + "}",  # over Python's 4,300-digit integer limit: ValueError
        '{"text": "a real document survives its neighbours"}',
    ]
    (d / "rows.jsonl").write_text("\n".join(hostile) + "\n")
    cfg = PrepareConfig(out=str(tmp_path / "out"), inputs=[str(d)], keep_text=True, **PREPARE)
    manifest = prepare(cfg, LocalExecutor(1), progress=False)
    assert manifest["skipped"] == {"nested_too_deep": 1, "invalid_unicode": 1, "decode_error": 1}
    kept = [json.loads(x)["id"] for x in (tmp_path / "out" / "documents.jsonl").read_text().splitlines()]
    assert kept == ["rows.jsonl:4"]


# --- 14. symbolic links out of an input folder ---------------------------------------------------------------
def test_links_out_of_an_input_folder_are_not_followed_unless_asked(tmp_path):
    secret = tmp_path / "secret"
    (secret / "deep").mkdir(parents=True)
    (secret / "passwords.txt").write_text("the secret outside the input folder")
    (secret / "deep" / "more.txt").write_text("another secret in a linked folder")
    d = tmp_path / "in"
    d.mkdir()
    (d / "own.txt").write_text("a document of the input folder")
    (d / "out.txt").symlink_to(secret / "passwords.txt")
    (d / "outdir").symlink_to(secret / "deep")
    (d / "alias.txt").symlink_to(d / "own.txt")  # inside the folder: allowed
    (d / "dangling.txt").symlink_to(d / "gone.txt")
    (d / "loop").symlink_to(d)  # a cycle once links are followed
    os.mkfifo(d / "pipe.txt")  # opening it would block for ever
    cfg = PrepareConfig(out=str(tmp_path / "out"), inputs=[str(d)], keep_text=True, **PREPARE)
    manifest = prepare(cfg, LocalExecutor(1), progress=False)
    texts = (tmp_path / "out" / "documents.jsonl").read_text()
    assert "secret" not in texts and texts.count("a document of the input folder") == 2
    assert manifest["skipped"] == {"symlink_outside": 2, "not_a_file": 2}
    followed = {x.id: x for x in iter_documents([d], follow_symlinks=True)}
    assert followed["out.txt"].text.startswith("the secret") and "outdir/more.txt" in followed
    assert not any(k.startswith("loop/") for k in followed)  # the cycle: each folder is walked once


# --- 4. data prepare deleted every *.bin it did not write ----------------------------------------------------
def test_prepare_keeps_what_it_did_not_write_and_refuses_to_overwrite_it(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("some text to tokenize")
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"a user's file")
    (out / "notes.txt").write_text("notes")
    cfg = PrepareConfig(out=str(out), inputs=[str(d)], **PREPARE)
    manifest = prepare(cfg, LocalExecutor(1), progress=False)
    assert (out / "weights.bin").read_bytes() == b"a user's file" and (out / "notes.txt").is_file()
    assert not (out / LEDGER).exists() and read_manifest(out)["fingerprint"] == manifest["fingerprint"]
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "train-000000.bin").write_bytes(b"not ours")
    with pytest.raises(PrepareError, match=r"train-000000\.bin: `data prepare` did not write this file"):
        prepare(PrepareConfig(out=str(clash), inputs=[str(d)], **PREPARE), LocalExecutor(1), progress=False)
    assert (clash / "train-000000.bin").read_bytes() == b"not ours"


def test_prepare_removes_only_the_stale_files_its_ledger_names(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("some text to tokenize")
    out = tmp_path / "out"
    out.mkdir()  # as an interrupted run with more shards left it
    for name in ("train-000000.bin", "train-000007.bin", "documents.jsonl"):
        (out / name).write_bytes(b"an earlier run's")
    (out / LEDGER).write_text(json.dumps({"files": ["train-000000.bin", "train-000007.bin", "documents.jsonl"]}))
    (out / "val-000003.bin.keep").write_bytes(b"a user's")
    prepare(PrepareConfig(out=str(out), inputs=[str(d)], **PREPARE), LocalExecutor(1), progress=False)
    names = sorted(p.name for p in out.iterdir())  # train-000007 and documents.jsonl were ours: gone
    assert names == ["manifest.json", "tokenizer", "train-000000.bin", "val-000000.bin", "val-000003.bin.keep"]


def test_a_deeply_nested_line_in_post_training_data_is_one_clear_error(tmp_path):
    from gptstack.files import iter_jsonl, read_json

    bomb = "[" * 200_000 + "]" * 200_000
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a"}\n' + bomb + "\n")
    (tmp_path / "one.json").write_text(bomb)
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: JSON nested too deeply"):
        list(iter_jsonl(tmp_path / "rows.jsonl"))
    with pytest.raises(ValueError, match=r"one\.json: JSON nested too deeply"):
        read_json(tmp_path / "one.json")
    (tmp_path / "rows.jsonl").write_bytes(b'{"prompt": "a"}\n{"n": ' + b"1" * 5000 + b'}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON \(Exceeds the limit"):  # 4,300 digits
        list(iter_jsonl(tmp_path / "rows.jsonl"))
    (tmp_path / "rows.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON \(.*can't decode byte 0xff"):
        list(iter_jsonl(tmp_path / "rows.jsonl"))


def test_pruning_checkpoints_deletes_only_what_they_wrote(tmp_path):
    from gptstack.checkpoint import remove_checkpoint
    from gptstack.train.loop import clear_interrupted, discard_checkpoints

    root = tmp_path / "checkpoints"
    old = save_checkpoint(build_model(TINY, seed=0), root / "step-000001", tokenizer="bytes")
    (old / "notes.txt").write_text("mine")  # a user's file inside a checkpoint that a run prunes
    done = save_checkpoint(build_model(TINY, seed=0), root / "step-000002", tokenizer="bytes")
    discard_checkpoints([old, done])
    assert not (root / "step-000001").exists() and not (root / "step-000002").exists()
    assert not (root / ".pruned-step-000002").exists()  # nothing of anyone else's: gone entirely
    assert sorted(p.name for p in (root / ".pruned-step-000001").iterdir()) == ["notes.txt"]
    clear_interrupted(root)  # the next run's clean-up keeps it too
    assert (root / ".pruned-step-000001" / "notes.txt").read_text() == "mine"
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "model.safetensors").write_text("not ours")
    remove_checkpoint(stranger)  # no config.json of ours: left alone
    assert (stranger / "model.safetensors").exists()


def test_exports_never_write_over_what_is_already_there(tmp_path):
    from gptstack.interop.convert import gguf_export, hf_export
    from gptstack.interop.hf import InteropError

    ck = save_checkpoint(build_model(TINY, seed=0), tmp_path / "ck", tokenizer="bytes")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("the user's")
    (tmp_path / "model.gguf").write_text("the user's")
    with pytest.raises(InteropError, match="not an empty folder"):
        hf_export(ck, tmp_path / "hf")
    with pytest.raises(InteropError, match="already exists"):
        gguf_export(ck, tmp_path / "model.gguf")
    assert (tmp_path / "hf" / "config.json").read_text() == "the user's"
    assert (tmp_path / "model.gguf").read_text() == "the user's"
