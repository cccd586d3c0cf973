"""Tiny recipes of further families (see tiny_kit.Recipe)."""

from __future__ import annotations

from typing import Any

import torch
from tiny_kit import _SMALL, END, IMAGE, START, VIDEO, Recipe, _pixels, _qwen_patches, _tokens, _vision


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


def _cosmos3_omni(c):
    """Qwen3-VL layout: DeepStack after layer 0 only (so the last layer's output is the decoder's)."""
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                     "mrope_interleaved": True}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _exaone4_5(c):
    """EXAONE 4.5: a windowed Qwen2.5-VL-like tower; a decoder of sliding and full attention layers."""
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, window_size=8, fullatt_block_indexes=[1])
    c.text_config.layer_types, c.text_config.sliding_window = ["sliding_attention", "full_attention"], 4
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO)


def _hyperclovax_vision_v2(c):
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, window_size=8, fullatt_block_indexes=[1])
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO)


def _paddleocr_vl(c):
    _vision(c, image_size=8, patch_size=2, spatial_merge_size=2, hidden_size=32, intermediate_size=64)
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _paddle_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as 16 patches of (3, 2, 2), grid 1x4x4."""
    return {"pixel_values": torch.randn(16, 3, 2, 2, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def _cosmos3_edge(c):
    """Cosmos3 Edge: packed SigLIP2 patches (learned 4x4 position grid), M-RoPE decoder."""
    _vision(c, patch_size=2, spatial_merge_size=2, hidden_size=32, intermediate_size=64, num_patches=16)
    c.projector_hidden_size = 64
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _packed_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as 16 flattened 2x2 patches, grid 1x4x4."""
    return {"pixel_values": torch.randn(16, 12, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def _apertus1p5(c):
    """Apertus 1.5: images become VQ codes (ids 10-17 of the tiny vocabulary) embedded by the text embedding;
    the audio tokenizer's 8 codes follow them (ids 18-25), as the config requires."""
    v = c.vision_config
    v.codebook_size, v.embed_dim, v.latent_channels, v.base_channels = 8, 4, 4, 32
    v.channel_multiplier, v.num_res_blocks, v.attn_resolutions, v.resolution = [1, 2], 1, [], 8
    v.spatial_scale_factor = 2  # derived from channel_multiplier at construction
    a = c.audio_config
    a.codebook_size, a.codebook_dim, a.num_filters, a.upsampling_ratios, a.num_lstm_layers = 8, 64, 8, [2, 2], 1
    # llama3 rope scaling kept, its original context cut below the tiny max_position_embeddings
    c.text_config.rope_parameters["original_max_position_embeddings"] = 64
    _tokens(c, image_token_id=IMAGE, audio_token_id=249, image_token_offset=10, audio_token_offset=18)


def _apertus_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, "image_sizes": torch.tensor([[8, 8]])}


def _gemma4_unified(c):
    """Gemma 4 unified: no vision tower (raw 4x4-pixel patches projected into the decoder), a sliding and a
    full attention layer; image tokens attend bidirectionally in the sliding layer (mm_token_type_ids)."""
    from transformers.models.gemma4_unified.configuration_gemma4_unified import (
        Gemma4UnifiedAudioConfig,
        Gemma4UnifiedTextConfig,
        Gemma4UnifiedVisionConfig,
    )

    c.vision_config = Gemma4UnifiedVisionConfig(patch_size=2, pooling_kernel_size=2, mm_embed_dim=32,
                                                mm_posemb_size=16, output_proj_dims=32)
    c.audio_config = Gemma4UnifiedAudioConfig(audio_embed_dim=16)
    # built anew: the full layers' head_dim (global_head_dim) is derived from layer_types at construction
    small = {k: v for k, v in _SMALL.items() if k in vars(c.text_config)}
    c.text_config = Gemma4UnifiedTextConfig(**small, layer_types=["sliding_attention", "full_attention"],
                                            sliding_window=8, global_head_dim=16)
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, boi_token_id=START, eoi_token_id=END,
            audio_token_id=249, boa_token_id=248, eoa_token_index=247)


def _gemma4_unified_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 16x16 image as 16 merged 4x4-pixel patches (48 values) with their (x, y) grid positions."""
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), dim=-1).reshape(1, 16, 2)
    return {"pixel_values": torch.rand(1, 16, 48, generator=g), "image_position_ids": grid}


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
    "cosmos3_omni": Recipe(_cosmos3_omni, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "exaone4_5": Recipe(_exaone4_5, _qwen_patches),
    "hyperclovax_vision_v2": Recipe(_hyperclovax_vision_v2, _qwen_patches),
    "paddleocr_vl": Recipe(_paddleocr_vl, _paddle_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "cosmos3_edge": Recipe(_cosmos3_edge, _packed_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "apertus1p5": Recipe(_apertus1p5, _apertus_image),
    "gemma4_unified": Recipe(_gemma4_unified, _gemma4_unified_patches, (START,), (END,),
                             token_types="mm_token_type_ids"),
}
