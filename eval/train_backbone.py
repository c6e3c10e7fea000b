"""`fwserve train-backbone`: train the bundled ViT on MNIST digits 0-4 (training split only).

Seeded and CPU-friendly. Writes the weights (safetensors), the source feature statistics the
label-free rules standardise against (models/source_stats.py) and a metrics JSON.
Recipes are compared on the *selection* split (models/data.py) alone: base-head accuracy on
its digits 0-4 and a cross-validated linear probe trained on the training images of 5-9 and
scored on the selection images of 5-9. The held-out (test) split is scored only with
--record-test, once, for the recipe already chosen.
Features must transfer to the digits the backbone never sees (5-9). Cross-entropy on five
classes alone lets the class token forget everything that does not separate them (a linear
probe on its features then scores below one on raw pixels), so training adds an auxiliary
task: a small decoder, discarded afterwards, reconstructs the (augmented) image from the class
token. Strong geometric augmentation does the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.backbone import WEIGHTS_DIR
from models.checkpoint import save_safetensors
from models.config import DEFAULT_BACKBONE, get_config
from models.data import (
    HELD_OUT_PER_CLASS, KNOWN_CLASSES, NOVEL_CLASSES, SELECTION_PER_CLASS, SPLIT_SEED, mnist_split,
)
from models.vit import VisionTransformer


def to_tensor(images: np.ndarray, cfg) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float32 [N, 1, 28, 28] (the server's preprocessing)."""
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return (x - cfg.mean[0]) / cfg.std[0]


def augment(x: torch.Tensor, gen: torch.Generator, background: float) -> torch.Tensor:
    """Random rotation, scale, shear and translation of a batch [B, 1, H, W], in one grid_sample."""
    B = x.shape[0]
    u = lambda lo, hi: torch.empty(B).uniform_(lo, hi, generator=gen)  # noqa: E731
    angle = u(-15, 15) * math.pi / 180
    scale = u(0.85, 1.15)
    shear = u(-0.2, 0.2)
    tx, ty = u(-0.12, 0.12), u(-0.12, 0.12)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with zeros; shift so that padding is the (normalised) black background
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


@torch.no_grad()
def extract(model: VisionTransformer, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(x[i : i + batch]) for i in range(0, len(x), batch)])


PROBE_CS = tuple(float(c) for c in np.logspace(-3, 2, 6))  # the probe's grid of inverse regularisations


def linear_probe_accuracy(train_f, train_y, test_f, test_y) -> tuple[float, float]:
    """Multinomial logistic regression on standardised frozen features, C chosen by 5-fold
    cross-validation on the training rows. Returns (test accuracy, chosen C)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f)
    clf = LogisticRegressionCV(Cs=list(PROBE_CS), cv=5, max_iter=3000).fit(scaler.transform(train_f), train_y)
    return float((clf.predict(scaler.transform(test_f)) == test_y).mean()), float(clf.C_[0])


def evaluate(model, cfg, train, scored, prefix: str) -> dict:
    """Base-head accuracy on `scored`'s digits 0-4 and the probe from train's 5-9 to scored's 5-9,
    on backbone features and (for reference) on raw pixels."""
    known = scored.subset(KNOWN_CLASSES)
    model.eval()
    with torch.no_grad():
        logits = model(to_tensor(known.images, cfg))
    known_acc = float((logits.argmax(1).numpy() == known.labels).mean())
    novel_train, novel_scored = train.subset(NOVEL_CLASSES), scored.subset(NOVEL_CLASSES)
    probe, probe_c = linear_probe_accuracy(
        extract(model, to_tensor(novel_train.images, cfg)).numpy(), novel_train.labels,
        extract(model, to_tensor(novel_scored.images, cfg)).numpy(), novel_scored.labels,
    )
    pixels, pixels_c = linear_probe_accuracy(
        novel_train.images.reshape(len(novel_train.labels), -1) / 255.0, novel_train.labels,
        novel_scored.images.reshape(len(novel_scored.labels), -1) / 255.0, novel_scored.labels,
    )
    return {f"{prefix}_accuracy_known": known_acc, f"{prefix}_linear_probe_accuracy_novel": probe,
            f"{prefix}_linear_probe_C": probe_c, f"{prefix}_pixel_probe_accuracy_novel": pixels,
            f"{prefix}_pixel_probe_C": pixels_c}


SOURCE_STATS_SET = "training split, digits 0-4 (the backbone's training images, clean, no augmentation)"


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = get_config(DEFAULT_BACKBONE)
    train_split = mnist_split("train", SPLIT_SEED)
    known = train_split.subset(KNOWN_CLASSES)
    x_all, y_all = to_tensor(known.images, cfg), torch.from_numpy(known.labels)
    background = float((0 - cfg.mean[0]) / cfg.std[0])

    model = VisionTransformer(cfg)
    model.reset_parameters(seed=args.seed)
    pixels = cfg.in_chans * cfg.img_size**2
    decoder = torch.nn.Sequential(  # [B, d] -> [B, C*H*W]; not part of the saved backbone
        torch.nn.Linear(cfg.embed_dim, 512), torch.nn.GELU(), torch.nn.Linear(512, pixels)
    )
    params = list(model.named_parameters()) + [(f"decoder.{n}", p) for n, p in decoder.named_parameters()]
    decay = [p for n, p in params if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "pos_embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = math.ceil(len(x_all) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch * 3
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc="train-backbone", unit="epoch", disable=args.quiet)
    for epoch in bar:
        model.train()
        decoder.train()
        order = torch.randperm(len(x_all), generator=gen)
        running = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb = augment(x_all[idx], gen, background)
            feats = model.features(xb)  # [B, d]
            loss = F.cross_entropy(model.head(feats), y_all[idx], label_smoothing=args.label_smoothing)
            if args.recon_weight > 0:
                loss = loss + args.recon_weight * F.mse_loss(decoder(feats), xb.flatten(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        bar.set_postfix(loss=f"{running / len(order):.4f}")
    wall = time.perf_counter() - start

    metrics = evaluate(model, cfg, train_split, mnist_split("selection", SPLIT_SEED), "selection")
    if args.record_test:  # the test split, for the recipe already chosen on the selection split
        metrics.update(evaluate(model, cfg, train_split, mnist_split("held_out", SPLIT_SEED), "held_out"))
    metrics.update(
        {
            "train_wall_seconds": round(wall, 1),
            "train_images": int(len(x_all)),
            "epochs": args.epochs,
            "recon_weight": args.recon_weight,
            "label_smoothing": args.label_smoothing,
            "seed": args.seed,
            "split_seed": SPLIT_SEED,
            "held_out_per_class": HELD_OUT_PER_CLASS,
            "selection_per_class": SELECTION_PER_CLASS,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": "fwserve train-backbone " + " ".join(args.argv),
        }
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{DEFAULT_BACKBONE}.safetensors"
    save_safetensors(model, weights, metadata={"config": DEFAULT_BACKBONE})
    from models.source_stats import compute_source_stats, save_source_stats

    with torch.no_grad():
        feats = extract(model, x_all)
    save_source_stats(weights, compute_source_stats(feats, y_all), SOURCE_STATS_SET)
    (out / f"{DEFAULT_BACKBONE}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def record_test(directory: Path) -> dict:
    """Score the held-out (test) split for the weights in `directory` (a recipe already chosen on
    the selection split) and add it to their metrics JSON."""
    from models.backbone import load_backbone

    directory = Path(directory)
    cfg = get_config(DEFAULT_BACKBONE)
    model = load_backbone(DEFAULT_BACKBONE, weights=directory / f"{DEFAULT_BACKBONE}.safetensors").model
    path = directory / f"{DEFAULT_BACKBONE}.metrics.json"
    metrics = json.loads(path.read_text())
    metrics.update(evaluate(model, cfg, mnist_split("train", SPLIT_SEED), mnist_split("held_out", SPLIT_SEED),
                            "held_out"))
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fwserve train-backbone", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--recon-weight", type=float, default=1.0, help="weight of the auxiliary reconstruction loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(WEIGHTS_DIR), help="directory for weights and metrics")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--record-test", action="store_true",
                   help="also score the held-out (test) split; only for the recipe chosen on the selection split")
    p.add_argument("--score-test", metavar="DIR",
                   help="train nothing: score the held-out (test) split for the weights in DIR, add it to their metrics")
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = record_test(Path(args.score_test)) if args.score_test else train(args)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
