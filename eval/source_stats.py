"""python -m eval.source_stats WEIGHTS: (re)compute the source feature statistics beside a
checkpoint of the bundled architecture (models/source_stats.py holds the format; this tool loads
the backbone, so it lives outside models/)."""

from __future__ import annotations

from pathlib import Path

import torch

from models.source_stats import compute_source_stats, save_source_stats


def main(argv=None) -> int:
    """(Re)compute the file for the bundled architecture
    from the training split's digits 0-4 (what fwserve train-backbone records)."""
    import argparse

    from models.backbone import load_backbone
    from models.config import DEFAULT_BACKBONE
    from models.data import KNOWN_CLASSES, mnist_split

    p = argparse.ArgumentParser(prog="python -m eval.source_stats")
    p.add_argument("weights", type=Path)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    args = p.parse_args(argv)
    bb = load_backbone(args.backbone, weights=args.weights)
    train = mnist_split("train").subset(KNOWN_CLASSES)
    images = train.images
    feats = torch.cat([bb.features(torch.stack([bb.preprocess(i) for i in images[j:j + 500]]))
                       for j in range(0, len(images), 500)])
    path = save_source_stats(args.weights, compute_source_stats(feats, torch.from_numpy(train.labels)),
                             "training split, digits 0-4 (the backbone's training images, clean, no augmentation)")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
