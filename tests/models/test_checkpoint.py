"""timm-layout checkpoints load strictly; the key list comes from timm itself (fixture)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import VisionTransformer, get_config, load_backbone, read_state_dict, resample_pos_embed

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "timm_vit_keys.json").read_text())
TIMM_MODELS = sorted(FIXTURE["models"])


def random_timm_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) for k, shape in FIXTURE["models"][name].items()}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_layout_matches_timm(name):
    ours = {k: list(v.shape) for k, v in VisionTransformer(get_config(name)).state_dict().items()}
    assert ours == FIXTURE["models"][name]


@pytest.mark.parametrize("name", TIMM_MODELS)
@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped"])
def test_timm_checkpoint_loads_strictly(tmp_path, name, fmt):
    state = random_timm_state(name)
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state} if fmt == "pth-wrapped" else state, path)
    bb = load_backbone(name, weights=path)
    loaded = bb.model.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.11.mlp.fc2.bias", "head.weight", "pos_embed"):
        assert torch.equal(loaded[key], state[key])


def test_missing_and_unexpected_keys_are_rejected(tmp_path):
    state = random_timm_state("vit_tiny_patch16_224")
    del state["blocks.3.attn.qkv.weight"]
    state["blocks.3.attn.extra"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing.*blocks.3.attn.qkv.weight.*unexpected.*blocks.3.attn.extra"):
        load_backbone("vit_tiny_patch16_224", weights=path)


def test_wrong_shapes_are_rejected(tmp_path):
    state = random_timm_state("vit_small_patch16_224")
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="shapes do not match"):
        load_backbone("vit_tiny_patch16_224", weights=path)


def test_position_embeddings_are_resampled_for_another_image_size(tmp_path):
    state = random_timm_state("vit_tiny_patch16_224")
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    bb = load_backbone("vit_tiny_patch16_224", weights=path, img_size=256)
    assert bb.model.pos_embed.shape == (1, 1 + 16 * 16, 192)
    # the class token's embedding is carried over untouched
    assert torch.equal(bb.model.pos_embed[:, 0], state["pos_embed"][:, 0])
    assert bb.features(torch.randn(1, 3, 256, 256)).shape == (1, 192)


def test_resampling_a_constant_grid_keeps_it_constant():
    pos = torch.cat([torch.zeros(1, 1, 4), torch.full((1, 9, 4), 2.5)], dim=1)
    out = resample_pos_embed(pos, 5)
    assert out.shape == (1, 26, 4)
    assert torch.allclose(out[:, 1:], torch.full((1, 25, 4), 2.5), atol=1e-5)


def test_ddp_prefix_is_stripped(tmp_path):
    state = {f"module.{k}": v for k, v in random_timm_state("vit_tiny_patch16_224").items()}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    assert "cls_token" in read_state_dict(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backbone("vit_tiny_patch16_224", weights=tmp_path / "nope.safetensors")
