"""Backbones for fwserve: a timm-layout Vision Transformer, its configs and preprocessing."""

from models.backbone import Backbone, bundled_weights, load_backbone
from models.checkpoint import load_into, read_state_dict, resample_pos_embed
from models.config import CONFIGS, DEFAULT_BACKBONE, ViTConfig, get_config
from models.preprocess import array_to_image, preprocess
from models.rule_params import RuleParams, RuleParamsMismatch, load_rule_params
from models.vit import VisionTransformer

__all__ = [
    "Backbone",
    "CONFIGS",
    "DEFAULT_BACKBONE",
    "VisionTransformer",
    "ViTConfig",
    "array_to_image",
    "bundled_weights",
    "get_config",
    "load_backbone",
    "load_into",
    "RuleParams",
    "RuleParamsMismatch",
    "load_rule_params",
    "preprocess",
    "read_state_dict",
    "resample_pos_embed",
]
