import pytest
import torch

from models import CONFIGS, VisionTransformer, get_config, load_backbone


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_features_and_head_shapes(name):
    bb = load_backbone(name, random_init=True)
    cfg = bb.config
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    feats = bb.features(x)
    assert feats.shape == (2, cfg.embed_dim)
    assert feats.dtype == torch.float32
    assert bb.base_logits(feats).shape == (2, cfg.num_classes)
    assert len(bb.class_names) == cfg.num_classes


def test_backbone_is_frozen_and_deterministic():
    bb = load_backbone("fwserve-mnist-vit", random_init=True, seed=3)
    assert not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    x = torch.randn(4, 1, 28, 28)
    first, second = bb.features(x), bb.features(x)
    assert torch.equal(first, second)
    # a row's features do not depend on the rest of its batch
    assert torch.allclose(bb.features(x[:1]), first[:1], atol=1e-5)


def test_random_init_is_seeded():
    a = load_backbone("fwserve-mnist-vit", random_init=True, seed=1).model.state_dict()
    b = load_backbone("fwserve-mnist-vit", random_init=True, seed=1).model.state_dict()
    c = load_backbone("fwserve-mnist-vit", random_init=True, seed=2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_unknown_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_config("vit_huge_nonexistent")


def test_missing_bundled_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="no bundled weights"):
        load_backbone("vit_tiny_patch16_224")


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    model = VisionTransformer(get_config("fwserve-mnist-vit")).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, 128)
    B, N, d = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, h, d // h).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, N, d))
    assert torch.allclose(attn(x), expected, atol=1e-5)
