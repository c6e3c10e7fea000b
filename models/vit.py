"""A Vision Transformer whose parameter names and shapes follow timm's VisionTransformer.

Keeping timm's layout (`patch_embed.proj`, `blocks.N.attn.qkv`, ...) lets a user's timm
checkpoint load with strict key checking, without timm installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ViTConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # [B, d, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, d]


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, d_head]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d_head]
        return self.proj(x.transpose(1, 2).reshape(B, N, d))


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        if init:  # skipped when a checkpoint overwrites every tensor anyway (large models init slowly)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random initialisation in the usual ViT style (truncated normal, zero biases)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, generator=gen)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.proj.in_channels * self.cfg.patch_size**2
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=fan_in**-0.5, generator=gen)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=gen)
        nn.init.normal_(self.cls_token, std=1e-6, generator=gen)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> class token after the final norm, [B, d]."""
        x = self.patch_embed(x)  # [B, N, d]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, d]
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, N+1, d]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]  # [B, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # [B, num_classes]
