"""Loading timm-layout checkpoints (.safetensors or .pth) into our VisionTransformer."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from models.vit import VisionTransformer

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in _WRAPPER_KEYS:
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    # DataParallel / DDP checkpoints prefix every key with "module."
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a [1, prefix + g*g, d] position embedding to a new_grid x new_grid grid."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(math.isqrt(grid.shape[1]))
    if old_grid * old_grid != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()  # [1, d, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def load_into(model: VisionTransformer, state: dict[str, torch.Tensor]) -> None:
    """Strictly load a timm-layout state dict, resampling position embeddings when sizes differ."""
    state = dict(state)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.cfg.grid_size)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match {model.cfg.name}: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"checkpoint shapes do not match {model.cfg.name}: " + "; ".join(wrong[:8]))
    model.load_state_dict(state, strict=True)


def save_safetensors(model: VisionTransformer, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
