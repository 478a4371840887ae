"""Drafter training loop: draft vocabulary, initialisation, AdamW, resumable checkpoints, logs, plot."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from neuron_peagle.config import DrafterConfig
from neuron_peagle.errors import ConfigError
from neuron_peagle.files import atomic_path, atomic_write_text
from neuron_peagle.models.drafter import Drafter, draft_target_ids
from neuron_peagle.models.drafter_io import load_drafter, save_drafter
from neuron_peagle.models.target import TargetModel
from neuron_peagle.runtime.drafter_choice import random_drafter
from neuron_peagle.training.data import load_shards
from neuron_peagle.training.evaluate import HELDOUT_DIR
from neuron_peagle.training.objective import OBJECTIVES, LossSettings


PRECISIONS = ("auto", "float32", "bfloat16")
# Raised whenever what a checkpoint holds changes meaning (the linear weights' [out, in] order, say: a square
# matrix of another order would load without complaint, transposed): one of another format is refused.
CHECKPOINT_FORMAT = 2


@dataclass
class TrainConfig:
    objective: str = "peagle"
    num_layers: int = 1
    draft_vocab_size: int = 8192
    depths: int = 7
    epochs: float = 2.0
    lr: float = 1e-3
    seconds: float | None = None  # wall-clock budget; the schedule is fitted to it (see `train`)
    seed: int = 0
    accumulate: int = 4  # sequences per optimizer step
    max_sequence: int = 384
    checkpoint_every: int = 50  # optimizer steps
    init_from: str | None = None  # a drafter directory to continue from (its draft vocabulary is kept;
    # with num_layers above its own, it grows: see `grow_drafter`)
    run_name: str | None = None  # names the checkpoint and log in the work dir (default: the objective)
    feature_sets: tuple[str, ...] = ("features",)  # folders of the work dir whose shards are trained on
    # "bfloat16": forward and backward under CPU autocast (weights and optimizer stay float32; about 2x
    # the steps per second where the CPU has bf16 matrix units); "auto" picks it where they exist.
    precision: str = "auto"
    # Weight of the target's predictions of prompt tokens in the loss (response tokens weigh 1); with 0
    # the mask depths are sampled only where a response token is learned (see training.objective).
    prompt_weight: float = 0.0
    # How the elements' losses make the loss (training.objective.LossSettings): "depth" or "element"
    # weighting, depth d weighted depth_decay**d (None: the objective's own), and the share of
    # cross-entropy on the target's top token in each element's loss.
    depth_weighting: str = "depth"
    depth_decay: float | None = None
    ce_weight: float = 0.0
    # Regularisers against memorising the training answers: uniform noise on the target features, of
    # half-width feature_noise x the median |feature| of each feature layer (the three layers differ
    # by 10x in scale); the drafter's head frozen where it starts (speculators freezes it); AdamW weight
    # decay on the matrices.
    feature_noise: float = 0.0
    freeze_head: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        self.loss_settings()  # checks them
        if self.feature_noise < 0 or self.weight_decay < 0:
            raise ValueError("feature_noise and weight_decay must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "auto":
            self.precision = "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"

    @property
    def run(self) -> str:
        return self.run_name or self.objective

    def loss_settings(self) -> LossSettings:
        return LossSettings(prompt_weight=self.prompt_weight, weighting=self.depth_weighting,
                            decay=self.depth_decay, ce_weight=self.ce_weight)


def feature_scales(examples: list[dict], layers: int, sample: int = 64) -> torch.Tensor:
    """[layers] the median |feature| of each feature layer over the first `sample` examples."""
    features = torch.cat([e["features"].float() for e in examples[:sample]])  # [T, layers x H]
    return features.abs().reshape(features.shape[0], layers, -1).transpose(0, 1).reshape(layers, -1).median(-1).values


def noisy(features: torch.Tensor, half_widths: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """features [T, L x H] plus uniform noise of half-width half_widths[l] on feature layer l."""
    layers = half_widths.numel()
    noise = torch.rand(features.shape, generator=generator) * 2 - 1
    return features + (noise.reshape(features.shape[0], layers, -1) * half_widths[:, None]).reshape(features.shape)


def build_draft_vocab(examples: list[dict], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` most frequent response tokens (ties broken by id), sorted: draft id -> target id."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for example in examples:
        counts.index_add_(0, example["ids"][int(example["prompt_length"]):].long(),
                          torch.ones(len(example["ids"]) - int(example["prompt_length"]), dtype=torch.float64))
    counts -= torch.arange(vocab_size, dtype=torch.float64) * 1e-9
    return counts.topk(min(size, vocab_size)).indices.sort().values


def init_drafter(target: TargetModel, config: TrainConfig, draft_ids: torch.Tensor, max_length: int) -> Drafter:
    drafter_config = DrafterConfig.for_target(target.config, target.feature_layers, num_layers=config.num_layers,
                                              draft_vocab_size=len(draft_ids), trained_with=config.objective,
                                              num_speculative_tokens=config.depths)
    drafter = random_drafter(drafter_config, max_length, seed=config.seed)
    with torch.no_grad():
        # Start the head where the target's is: the drafter first learns to reproduce its features.
        drafter.lm_head.weight.copy_(target.lm_head.weight[draft_ids])
        drafter.norm.weight.copy_(target.norm.weight)
        drafter.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        drafter.mask_embedding.copy_(target.embed_tokens.weight.mean(0))
    for param in drafter.parameters():
        param.requires_grad_(True)
    return drafter


def grow_drafter(drafter: Drafter, num_layers: int) -> Drafter:
    """`drafter` with layers appended up to `num_layers`, computing exactly what it computed before.

    Each new layer is a residual block whose output projections (attention o_proj, MLP down_proj)
    start at zero, so it adds nothing until training moves them; the other new weights are random.
    """
    old = drafter.config.num_layers
    if num_layers < old:
        raise ConfigError(f"cannot shrink a {old}-layer drafter to {num_layers} layers")
    if num_layers == old:
        return drafter
    grown = random_drafter(dataclasses.replace(drafter.config, num_layers=num_layers), drafter.max_length,
                           seed=0).to(drafter.fc.weight.dtype)
    missing, unexpected = grown.load_state_dict(drafter.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("layers.") for name in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in grown.layers[old:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown


def _plot(log: list[dict], path: Path, depths: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for d in range(depths):
        points = [(r["step"], r[f"acc{d}"]) for r in log if f"acc{d}" in r]
        if points:
            ax.plot(*zip(*points), label=f"depth {d} (draft {d + 1})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("top-1 agreement with the target")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_resumable(checkpoint: Path, saved: dict, config: TrainConfig) -> None:
    """A checkpoint resumes only the run that wrote it: the same settings, the wall-clock budget aside."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # settings added since it was written
    differ = sorted(k for k, v in asdict(config).items() if k != "seconds" and saved.get(k, defaults[k]) != v)
    if differ:
        raise ConfigError(f"{checkpoint} belongs to a run with other settings ({', '.join(differ)} differ); "
                          "pass another --run-name for a new run, or delete the checkpoint to start over")


def train(model_dir: Path, work: Path, config: TrainConfig, out: Path | None) -> Path:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    if HELDOUT_DIR in config.feature_sets:
        raise ConfigError(f"{HELDOUT_DIR} holds held-out responses, for evaluation only; train on other feature sets")
    examples = []
    for name in config.feature_sets:
        shards = sorted((work / name).glob("shard_*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no feature shards under {work / name}: run the stage that writes them "
                                    "(data + features for 'features', corpus for 'features_corpus')")
        examples += [e for e in load_shards(shards) if len(e["ids"]) <= config.max_sequence]
    target = TargetModel.from_pretrained(model_dir, 512, feature_layers=None)
    max_length = config.max_sequence + config.depths + 2
    if config.init_from is not None:
        drafter = load_drafter(Path(config.init_from), target.config, max_length, torch.float32)
        drafter = grow_drafter(drafter, config.num_layers)
        # The checkpoint says how it was trained last: from here on it is trained with this objective.
        drafter.config = dataclasses.replace(drafter.config, trained_with=config.objective)
        draft_ids = draft_target_ids(drafter.d2t)
        for param in drafter.parameters():
            param.requires_grad_(True)
    else:
        draft_ids = build_draft_vocab(examples, target.config.vocab_size, config.draft_vocab_size)
        drafter = init_drafter(target, config, draft_ids, max_length)
    if config.freeze_head:
        drafter.lm_head.weight.requires_grad_(False)
    head = target.lm_head.weight[draft_ids].clone()  # [draft_vocab, H]
    loss_fn = OBJECTIVES[config.objective]
    settings = config.loss_settings()
    layers = len(target.feature_layers)
    half_widths = feature_scales(examples, layers) * config.feature_noise if config.feature_noise > 0 else None
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    total_steps = epoch_steps = max(1, int(config.epochs * len(examples) / config.accumulate))

    checkpoint = work / f"checkpoint_{config.run}.pt"
    log_path = work / f"train_log_{config.run}.jsonl"
    step, log, used = 0, [], 0.0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{checkpoint}: checkpoint format {state.get('format')!r}, this version reads format "
                              f"{CHECKPOINT_FORMAT}; delete it to start over, or finish that run with the version "
                              "that wrote it")
        _check_resumable(checkpoint, state["config"], config)
        drafter.load_state_dict(state["drafter"])
        optimizer.load_state_dict(state["optimizer"])
        step, log, used = state["step"], state["log"], state["seconds"]
        total_steps = state["total_steps"]
        generator.set_state(state["generator"])

    def lr_at(s: int) -> float:
        warmup = max(1, total_steps // 20)
        if s < warmup:
            return config.lr * (s + 1) / warmup
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))

    def elapsed() -> float:  # seconds of training so far, across resumed runs
        return used + time.perf_counter() - start

    def save() -> None:  # whole or not at all: a stop mid-save keeps the previous checkpoint
        with atomic_path(checkpoint) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "drafter": drafter.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step, "log": log, "generator": generator.get_state(), "seconds": elapsed(),
                        "total_steps": total_steps, "config": asdict(config)}, tmp)

    start = time.perf_counter()
    first_step = step
    bar = tqdm(total=total_steps, initial=step, desc=f"train {config.objective}", unit="step")
    order = torch.randperm(len(examples), generator=generator)
    cursor = (step * config.accumulate) % len(examples)
    sums: dict[str, torch.Tensor] = {}
    fits: deque[tuple[int, float]] = deque(maxlen=5)  # (step, time) at the last schedule fits
    while step < total_steps:
        if config.seconds is not None:
            if elapsed() > config.seconds:
                break
            # Fit the cosine schedule to the wall-clock budget from the recent step rate, so the
            # learning rate has decayed when the budget ends (rather than stopping at a high rate);
            # the fit follows the rate both ways, so a slow spell (another job) is not held forever.
            if step - first_step >= 20 and step % 25 == 0:
                fits.append((step, time.perf_counter()))
                (s0, t0), (s1, t1) = fits[0], fits[-1]
                rate = (s1 - s0) / (t1 - t0) if s1 > s0 else (step - first_step) / (t1 - start)
                total_steps = min(epoch_steps, step + max(1, int(rate * (config.seconds - elapsed()))))
                bar.total = total_steps
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        for _ in range(config.accumulate):
            example = examples[int(order[cursor % len(examples)])]
            cursor += 1
            if cursor % len(examples) == 0:
                order = torch.randperm(len(examples), generator=generator)
            hidden = example["hidden"].float()
            with torch.no_grad():
                teacher = F.linear(target.norm(hidden), head)
            features = example["features"].float()
            if half_widths is not None:
                features = noisy(features, half_widths, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
                loss, stats = loss_fn(drafter, target.embed_tokens, example["ids"].long(), features, teacher,
                                      int(example["prompt_length"]), config.depths, generator, settings)
            (loss / config.accumulate).backward()
            for name, value in stats.items():  # (loss, correct, count, sequences)
                sums[name] = sums.get(name, torch.zeros(4)) + torch.cat([value, torch.ones(1)])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == total_steps:
            record = {"step": step, "lr": lr_at(step), "seconds": elapsed()}
            for d in range(config.depths):
                if f"depth{d}" in sums:
                    loss_sum, correct, count, sequences = sums[f"depth{d}"].tolist()
                    record[f"acc{d}"] = correct / max(count, 1)
                    record[f"loss{d}"] = loss_sum / max(sequences, 1)  # mean KL per sequence
            log.append(record)
            sums = {}
            bar.set_postfix(acc0=f"{record.get('acc0', 0):.2f}", acc3=f"{record.get('acc3', 0):.2f}")
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if step % config.checkpoint_every == 0:
            save()
    bar.close()
    save()
    _plot(log, work / f"accuracy_{config.run}.png", config.depths)
    destination = out or work / f"drafter_{config.run}"
    for param in drafter.parameters():
        param.requires_grad_(False)
    save_drafter(drafter, destination, verifier=Path(model_dir).name, verifier_config=target.config)
    atomic_write_text(destination / "training.json", json.dumps(
        {"train_config": {**asdict(config), "init_from": Path(config.init_from).name if config.init_from else None},
         "steps": step, "examples": len(examples), "final": log[-1] if log else {}},
        indent=2) + "\n")
    _plot(log, destination / "accuracy.png", config.depths)
    return destination
