"""One dataclass describes a backbone: architecture, preprocessing and base-head labels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTConfig:
    name: str
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    num_classes: int = 1000
    layer_norm_eps: float = 1e-6
    # Preprocessing: clients send plain images; the server converts them to this spec.
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "bicubic"  # PIL resampling used when an image's size differs from img_size
    class_names: tuple[str, ...] = field(default=())

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def labels(self) -> tuple[str, ...]:
        """Base-head label names; numbered when a config does not name its classes."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))

    def with_overrides(self, **changes) -> "ViTConfig":
        return replace(self, **changes)


MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig("vit_tiny_patch16_224", embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig("vit_small_patch16_224", embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig("vit_base_patch16_224", embed_dim=768, depth=12, num_heads=12),
    # The bundled default: trained on MNIST digits 0-4 only (see models/weights/MODEL_CARD.md).
    "fwserve-mnist-vit": ViTConfig(
        "fwserve-mnist-vit",
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=2.0,
        num_classes=5,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        resize="bilinear",
        class_names=("0", "1", "2", "3", "4"),
    ),
}

DEFAULT_BACKBONE = "fwserve-mnist-vit"


def get_config(name: str) -> ViTConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        known = ", ".join(sorted(CONFIGS))
        raise ValueError(f"unknown backbone {name!r}; known: {known}") from None
