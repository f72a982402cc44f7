"""`gptstack vision train`: teach a language model to see (LLaVA-1.5's two stages, at laptop size).

    vision_train(VisionTrainConfig(lm="ckpt/", encoder="efficientnet-lite0", data="data/train.jsonl", stage=1))

The data is the image JSONL format of data/images.py (`{"images": [...], "messages": [...], "caption"}`,
an `<image>` marker per image). A tower (VisionTower: encoder + projector into the LM's width) is built
for the LM, or continued from the checkpoint `lm` names when it already has one (stage 2 after stage 1).

- Stage 1, alignment: each image with its caption (`caption`, else the row's own conversation) as a chat
  "<image> Describe the image." → caption; the LM is frozen and only the projector learns to map image
  features into its input space. The pretrained EfficientNet-Lite0 stays frozen too (LLaVA's frozen CLIP);
  a from-scratch ViT has nothing to keep, so it trains with the projector.
- Stage 2, instruction tuning: the rows' conversations; projector and LM learn (the LM fully, or LoRA
  adapters with `lora_rank`), the ViT too, EfficientNet-Lite0 only with `tune_encoder`.

The loss is SFT's (posttrain/sft.py: `encode_example` with the image-aware chat encoding, `sft_loss` with
the tower's rows spliced at the placeholders), on the assistant's tokens only. A frozen encoder runs once
per image before training (its pooled feature grid is cached), so an epoch costs the projector and the LM.
Checkpoints, resume, the non-finite guard, the progress bar and the report are StageRun's, with the tower
saved beside the LM as vision.safetensors + vision.json: `<out>/vision-<stage>/step-N/` loads in eval,
chat and serve like any checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gptstack.checkpoint import load_model, load_vision
from gptstack.data.images import IMAGE_MARKER, read_image_rows
from gptstack.model import GPT
from gptstack.posttrain.common import DataError, SkipRow, StageConfig, StageRun, max_len_of, maybe_lora, optimize
from gptstack.posttrain.sft import encode_example, sft_loss
from gptstack.vision import (
    VisionConfig,
    VisionTower,
    choose_image_token_id,
    encode_image_chat,
    image_positions,
    preprocess,
    read_image,
)

CAPTION_PROMPT = "Describe the image."
ENCODE_BATCH = 64  # images through a frozen encoder at once


@dataclass
class VisionTrainConfig(StageConfig):
    """train a vision tower into a language model (stage 1: projector on captions; 2: + LM on conversations)"""

    lm: str = ""  # the language model: a checkpoint folder (with a tower: continue it) or a .gguf file
    stage: int = 1  # 1: captions, LM frozen | 2: conversations, projector + LM (or its LoRA adapters)
    encoder: Literal["vit", "efficientnet-lite0"] = "vit"  # vit: from scratch, trained; efficientnet-lite0: frozen
    tune_encoder: bool = False  # stage 2: train EfficientNet-Lite0 too
    projector: Literal["mlp", "pixel-shuffle"] = "mlp"  # mlp (LLaVA-1.5) | pixel-shuffle (space-to-depth + linear)
    image_tokens: int = 16  # LM positions per image (a square number)
    image_size: int = 0  # input side in pixels (0: 64 for vit, 224 for efficientnet-lite0)
    patch_size: int = 8  # vit: pixels per patch side
    width: int = 192  # vit: channels
    depth: int = 4  # vit: transformer blocks
    heads: int = 3  # vit: attention heads
    lr: float = 1e-3
    batch_size: int = 32
    eval_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        self.init = self.init or self.lm  # what the report and StageRun call the starting checkpoint
        if self.stage not in (1, 2):
            raise ValueError(f"--stage must be 1 or 2, got {self.stage}")

    def to_dict(self) -> dict:
        """As saved in a checkpoint's train config, where "stage" is StageRun's name ("vision-2")."""
        d = super().to_dict()
        d["vision_stage"] = d.pop("stage")
        return d

    def vision_config(self, n_embd: int, image_token_id: int) -> VisionConfig:
        return VisionConfig(
            encoder=self.encoder, image_size=self.image_size, patch_size=self.patch_size, width=self.width,
            depth=self.depth, heads=self.heads, projector=self.projector, n_image_tokens=self.image_tokens,
            n_embd=n_embd, image_token_id=image_token_id,
        )  # fmt: skip


class VisionLM(nn.Module):
    """The LM and its tower as one module, so that the optimizer sees every trainable parameter."""

    def __init__(self, lm: GPT, tower: VisionTower):
        super().__init__()
        self.lm, self.tower = lm, tower


def start(cfg: VisionTrainConfig) -> tuple[GPT, VisionTower]:
    """The LM (with its tokenizer) and a tower: the checkpoint's own, or a new one for this LM."""
    if not cfg.lm:
        raise ValueError("--lm: the language model (checkpoint folder or .gguf file) is required")
    lm = load_model(cfg.lm, device=cfg.device, require_tokenizer=True)
    found = load_vision(cfg.lm, device=cfg.device)
    torch.manual_seed(cfg.seed)
    if found is not None:
        if found[1].encoder != cfg.encoder:
            raise ValueError(
                f"{cfg.lm} has a {found[1].encoder} tower; pass --encoder {found[1].encoder} to continue it"
            )
        return lm, found[0]
    vcfg = cfg.vision_config(lm.config.n_embd, choose_image_token_id(lm.tokenizer, lm.config.vocab_size))
    return lm, VisionTower(vcfg).to(cfg.device)


def freeze_parts(cfg: VisionTrainConfig, lm: GPT, tower: VisionTower) -> bool:
    """Set what learns in this stage; True when the encoder is frozen (its features can be cached)."""
    frozen_encoder = tower.config.encoder != "vit" and not (cfg.stage == 2 and cfg.tune_encoder)
    for p in tower.encoder.parameters():
        p.requires_grad_(not frozen_encoder)
    for p in lm.parameters():
        p.requires_grad_(cfg.stage == 2 and not cfg.lora_rank)
    if cfg.stage == 2:
        maybe_lora(lm, cfg)  # then only the adapters of the LM learn
    if frozen_encoder:
        tower.encoder.eval()  # BatchNorm keeps its ImageNet statistics
    return frozen_encoder


def conversation(row: dict, stage: int) -> dict:
    """The row as the stage trains on it: stage 1 the caption, stage 2 the row's conversation."""
    if stage == 2 or not row.get("caption"):
        return row
    prompt = IMAGE_MARKER * len(row["images"]) + "\n" + CAPTION_PROMPT
    return {**row, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["caption"]}]}


def encode_rows(rows: list[dict], lm: GPT, vcfg: VisionConfig, stage: int, max_len: int) -> tuple[list, list[str]]:
    """Items (inputs, targets, segments, image indices) and the distinct image paths they index."""
    paths: dict[str, int] = {}
    items, skipped = [], 0

    def encode_chat(messages):
        ids, mask, _ = encode_image_chat(lm.tokenizer, messages, vcfg)
        return ids, mask

    for row in rows:
        try:
            inp, tgt = encode_example(lm.tokenizer, conversation(row, stage), max_len, encode_chat)
        except SkipRow:
            skipped += 1
            continue
        images = [paths.setdefault(p, len(paths)) for p in row["images"]]
        items.append((inp, tgt, [0] * len(inp), images))
    if not items:
        raise DataError(f"no usable rows ({skipped} skipped: no assistant turn, or longer than the context)")
    return items, list(paths)


def image_inputs(paths: list[str], tower: VisionTower, cached: bool, progress: bool) -> Tensor:
    """Every image once: the frozen encoder's pooled grids (N, C, g, g), or the preprocessed pixels
    (N, 3, S, S) for an encoder that trains; bfloat16 to halve the memory."""
    out = []
    device = next(tower.parameters()).device
    for i in tqdm(range(0, len(paths), ENCODE_BATCH), desc="images", disable=not progress, unit="batch"):
        pixels = preprocess([read_image(p) for p in paths[i : i + ENCODE_BATCH]], tower.config).to(device)
        with torch.no_grad():
            out.append((tower.encode(pixels) if cached else pixels).to(torch.bfloat16))
    return torch.cat(out)


def image_loss(model: VisionLM, inputs: Tensor, cached: bool, items: list) -> tuple[Tensor, float, dict]:
    """SFT's loss with the tower's rows of the items' images spliced in at their placeholders."""
    device = model.lm.lm_head.weight.device
    T = max(len(r[0]) for r in items)
    idx = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in items], device=device)  # as sft.collate pads
    which = torch.tensor([k for r in items for k in r[3]], dtype=torch.long)
    x = inputs[which].to(device, torch.float32)
    rows = model.tower.projector(x) if cached else model.tower(x)  # (n, n_image_tokens, D)
    return sft_loss(model.lm, items, embeds=(image_positions(idx, model.tower.config), rows.flatten(0, 1)))


def vision_train(cfg: VisionTrainConfig) -> dict:
    """Run one stage; returns the summary (also in the checkpoint's config.json and the report)."""
    lm, tower = start(cfg)
    rows = read_image_rows(cfg.data, tower.config.image_token)
    random.Random(cfg.seed).shuffle(rows)
    n_eval = int(len(rows) * cfg.eval_fraction)
    items, paths = encode_rows(rows, lm, tower.config, cfg.stage, max_len_of(cfg, lm))
    held, train = items[:n_eval], items[n_eval:]
    cached = freeze_parts(cfg, lm, tower)
    inputs = image_inputs(paths, tower, cached, cfg.progress)
    model = VisionLM(lm, tower)
    tower.config.extra = {"stage": cfg.stage, "data": cfg.data}
    run = StageRun(cfg, f"vision-{cfg.stage}", lm, vision=tower)

    def loss_fn(batch):
        if cached:
            tower.encoder.eval()
        return image_loss(model, inputs, cached, batch)

    def evaluate() -> dict[str, float]:
        total, n, right = 0.0, 0, 0.0
        for i in range(0, len(held), cfg.batch_size):
            loss, k, m = image_loss(model, inputs, cached, held[i : i + cfg.batch_size])
            total, n, right = total + float(loss), n + k, right + m["acc"]
        return {"loss": total / max(n, 1), "acc": right / max(n, 1)}

    steps = optimize(model, train, loss_fn, run, evaluate if held else None)
    last = run.records[-1]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "stage": cfg.stage, "encoder": tower.config.encoder, "image_tokens": tower.config.n_image_tokens,
        "train_examples": len(train), "eval_examples": len(held), "images": len(paths),
        "encoder_frozen": cached, "trainable_params": trainable, "steps": steps, "train_loss": last["loss"],
        "eval_loss": last.get("eval_loss", float("nan")), "eval_token_acc": last.get("eval_acc", float("nan")),
        "train_seconds": round(run.elapsed, 1),
    }  # fmt: skip
    run.finish(summary, plots=[("loss", ["loss", "eval_loss"])])
    return summary
