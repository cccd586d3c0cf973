"""Tiny recipes of further families (see tiny_kit.Recipe)."""

from __future__ import annotations

from typing import Any

import torch
from tiny_kit import END, IMAGE, START, VIDEO, Recipe, _pixels, _qwen_patches, _tokens, _vision


def _siglip_llama(c):
    """DeepSeek-VL: a SigLIP tower, an MLP aligner, a Llama decoder."""
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_id=IMAGE)


def _deepseek_vl_hybrid(c):
    """DeepSeek-VL hybrid: a low-resolution SigLIP and a high-resolution SAM tower, fused per patch."""
    _siglip_llama(c)
    h = c.high_res_vision_config
    h.image_size, h.patch_size, h.hidden_size, h.output_channels, h.mlp_dim = 32, 4, 32, 16, 64
    h.global_attn_indexes, h.window_size, h.num_pos_feats = [1], 4, 16


def _janus(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, projection_dim=64, num_image_tokens=16)
    v = c.vq_config
    v.num_embeddings, v.embed_dim, v.latent_channels, v.base_channels = 8, 4, 4, 32
    v.channel_multiplier, v.num_res_blocks, v.num_patches = [1, 2], 1, 4
    v.projection_dim, v.image_token_embed_dim = 64, 64
    _tokens(c, image_token_id=IMAGE)


def _lighton_ocr(c):
    _vision(c, image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, head_dim=16)
    _tokens(c, image_token_id=IMAGE)


def _qianfan_ocr(c):
    _vision(c, image_size=[8, 8], patch_size=[2, 2], hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_id=IMAGE)


def _pp_chart2table(c):
    _vision(c, image_size=32, patch_size=4, hidden_size=32, output_channels=16, mlp_dim=64, global_attn_indexes=[1],
            window_size=4)
    _tokens(c, image_token_index=IMAGE)


def _glm(c):
    """GLM-4.xV layout (GLM-4.6V, GLMGA, GLM-OCR): M-RoPE over half the head, image start/end markers."""
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
            spatial_merge_size=2, temporal_patch_size=2)
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=START, image_end_token_id=END,
            video_start_token_id=248, video_end_token_id=249)


def _pixtral_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 16, 16, generator=g), "image_sizes": torch.tensor([[16, 16]])}


RECIPES: dict[str, Recipe] = {
    "deepseek_vl": Recipe(_siglip_llama, _pixels(8)),
    "deepseek_vl_hybrid": Recipe(_deepseek_vl_hybrid, lambda c, g: {
        "pixel_values": torch.randn(1, 3, 8, 8, generator=g),
        "high_res_pixel_values": torch.randn(1, 3, 32, 32, generator=g)}),
    "janus": Recipe(_janus, _pixels(8)),
    "lighton_ocr": Recipe(_lighton_ocr, _pixtral_image),
    "qianfan_ocr": Recipe(_qianfan_ocr, _pixels(8)),
    "pp_chart2table": Recipe(_pp_chart2table, _pixels(32)),
    "glm46v": Recipe(_glm, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "glmga": Recipe(_glm, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "glm_ocr": Recipe(_glm, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
}
