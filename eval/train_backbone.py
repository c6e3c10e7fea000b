"""`fwserve train-backbone`: train the bundled ViT on MNIST digits 0-4 (training split only).

Seeded and CPU-friendly. Writes the weights (safetensors) and a metrics JSON.
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
from models.data import HELD_OUT_PER_CLASS, KNOWN_CLASSES, NOVEL_CLASSES, SPLIT_SEED, mnist_splits
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


def linear_probe_accuracy(train_f, train_y, test_f, test_y) -> float:
    """Multinomial logistic regression on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f)
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(scaler.transform(train_f), train_y)
    return float((clf.predict(scaler.transform(test_f)) == test_y).mean())


def evaluate(model, cfg, train, held_out) -> dict:
    known_test = held_out.subset(KNOWN_CLASSES)
    model.eval()
    with torch.no_grad():
        logits = model(to_tensor(known_test.images, cfg))
    known_acc = float((logits.argmax(1).numpy() == known_test.labels).mean())
    novel_train, novel_test = train.subset(NOVEL_CLASSES), held_out.subset(NOVEL_CLASSES)
    probe = linear_probe_accuracy(
        extract(model, to_tensor(novel_train.images, cfg)).numpy(),
        novel_train.labels,
        extract(model, to_tensor(novel_test.images, cfg)).numpy(),
        novel_test.labels,
    )
    return {"held_out_accuracy_known": known_acc, "linear_probe_accuracy_novel": probe}


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = get_config(DEFAULT_BACKBONE)
    train_split, held_out = mnist_splits(SPLIT_SEED)
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

    metrics = evaluate(model, cfg, train_split, held_out)
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
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "command": "fwserve train-backbone " + " ".join(args.argv),
        }
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, out / f"{DEFAULT_BACKBONE}.safetensors", metadata={"config": DEFAULT_BACKBONE})
    (out / f"{DEFAULT_BACKBONE}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
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
    args = p.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = train(args)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
