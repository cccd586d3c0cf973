"""Tiny recipes of further families (see tiny_kit.Recipe)."""

from __future__ import annotations

from typing import Any

import torch
from tiny_kit import END, IMAGE, PAD, SPECIAL_BASE, START, VIDEO, Recipe, _pixels, _qwen_patches, _tokens, _vision


def _vipllava(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    c.vision_feature_layers = [-2, -1]
    _tokens(c, image_token_index=IMAGE)


def _video_llava(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    c.vision_feature_layer = -1
    _tokens(c, image_token_index=IMAGE, video_token_index=VIDEO)


def _qwen2_5_omni_thinker(c):
    # the audio encoder is not shrunk by its own field names (encoder_layers, d_model, ...)
    a = c.audio_config
    a.encoder_layers, a.d_model, a.encoder_attention_heads, a.encoder_ffn_dim, a.output_dim = 1, 32, 2, 64, 64
    _vision(c, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1])
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    _tokens(c, image_token_index=IMAGE, video_token_index=VIDEO, vision_start_token_id=START,
            audio_token_index=249, audio_start_token_id=248, audio_end_token_id=247)


def _video_llama_3(c):
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO)


def _video_llama_3_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as 16 flattened 2x2 patches (grid 1x4x4), merged 2x2 into 4 tokens."""
    return {"pixel_values": torch.randn(16, 12, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]]),
            "image_merge_sizes": torch.tensor([2])}


def _muse_glimmer(c):
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64, pos_emb_height=4, pos_emb_width=4,
            max_position_embeddings=16, layer_types=["window_attention", "full_attention"])
    t = c.text_config  # one sliding RoPE layer, one full-attention NoPE layer (rope theta 0)
    t.layer_types, t.layer_rope_theta, t.sliding_window = ["sliding_attention", "full_attention"], [10000.0, 0], 4
    t.bos_token_id, t.eos_token_id = 1, 2
    c.out_hidden_size, c.projector_hidden_size = 128, 64  # 2x2 merged patches of width 32
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO)


def _glimmer_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as 16 flattened 2x2 patches of 2 frames (grid 1x4x4), merged 2x2 into 4 tokens."""
    return {"pixel_values": torch.randn(16, 24, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def _step3p7(c):
    # 16x16 image: 8x8 patches, two stride-2 downsampling convolutions -> 2x2 = 4 tokens
    _vision(c, image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, mlp_ratio=2.0,
            max_position_embeddings=64)
    t = c.text_config  # a sliding dense layer, then a full-attention MoE layer (routed experts + a shared expert)
    t.mlp_layer_types, t.share_expert_dim, t.query_pre_attn_scalar = ["dense", "sparse"], 32, 16
    t.layer_types, t.sliding_window = ["sliding_attention", "full_attention"], 4
    t.rope_parameters = {kind: {"rope_type": "default", "rope_theta": 10000.0} for kind in t.layer_types}
    _tokens(c, image_token_id=IMAGE)


def _unlimited_ocr(c):
    # SAM (32x32 image, 8x8 patches) -> two stride-2 convolutions (2x2) -> a CLIP encoder on those features;
    # 2 rows of 2 features, each row closed by a newline, then a view separator: 7 tokens
    sam = c.vision_config.sam_config
    sam.image_size, sam.patch_size, sam.hidden_size, sam.output_channels, sam.mlp_dim = 32, 4, 32, 16, 64
    sam.window_size, sam.global_attn_indexes, sam.downsample_channels = 4, [1], [16, 32]
    enc = c.vision_config.encoder_config
    enc.hidden_size, enc.intermediate_size, enc.image_size, enc.patch_size = 32, 64, 8, 4
    t = c.text_config  # a dense layer, then an MoE layer
    t.mlp_layer_types, t.sliding_window = ["dense", "sparse"], 4
    _tokens(c, image_token_id=IMAGE)


def _blip_parts(c):
    """The BLIP-2 family: a vision tower, a Q-Former of 4 queries, an OPT decoder (fc1/fc2, out_proj)."""
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    c.qformer_config.encoder_hidden_size, c.num_query_tokens = 32, 4
    t = c.text_config
    t.ffn_dim, t.word_embed_proj_dim, t.pad_token_id = 128, 64, PAD
    c.image_text_hidden_size = 32


def _blip_2(c):
    _blip_parts(c)
    _tokens(c, image_token_index=IMAGE)


def _instructblip_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image and the instruction the Q-Former reads with its queries (4 text tokens)."""
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=g),
            "qformer_input_ids": torch.randint(1, SPECIAL_BASE, (1, 4), generator=g),
            "qformer_attention_mask": torch.ones(1, 4, dtype=torch.long)}


def _instructblipvideo(c):
    _blip_parts(c)
    _tokens(c, video_token_index=IMAGE)  # video-only: the batch's placeholder run is its video token


def _instructblip_video(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One video of two 8x8 frames (4 queries each: 8 tokens) and a 4-token instruction."""
    return {**_instructblip_image(config, g), "pixel_values": torch.randn(1, 2, 3, 8, 8, generator=g)}


def _kosmos_text(c):
    """Kosmos-2's own text decoder (fields named embed_dim, layers, ffn_dim, attention_heads)."""
    t = c.text_config
    t.embed_dim, t.layers, t.ffn_dim, t.attention_heads, t.pad_token_id, t.bos_token_id = 64, 2, 128, 4, PAD, 1


def _kosmos_2(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _kosmos_text(c)
    c.latent_query_num = 4


def _kosmos_2_5(c):
    _vision(c, hidden_size=32, intermediate_size=64, patch_embed_hidden_size=12, max_num_patches=16)
    _kosmos_text(c)
    c.latent_query_num = 4


def _kosmos_2_5_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as Pix2Struct-style patches: 16 rows of (row, column, 2x2x3 pixels), positions from 1."""
    rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
    pixels = torch.randn(16, 12, generator=g)
    patches = torch.cat([rows.reshape(16, 1).float(), cols.reshape(16, 1).float(), pixels], dim=1)
    return {"flattened_patches": patches[None]}


def _minicpm(c):
    """MiniCPM-V 4.6 / 4.7 / OCR: a NaViT SigLIP tower on a Qwen3.5 hybrid decoder (linear + full attention).
    A 16x16 image (8x8 patches) is merged 2x2 by the window merger after layer 0 (skipped in MiniCPM-OCR's
    default "4x" mode) and 2x2 by the final merger: 4 tokens (16 for MiniCPM-OCR)."""
    _vision(c, image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, insert_layer_id=0)
    c.insert_layer_id = 0
    t = c.text_config
    t.layer_types = ["linear_attention", "full_attention"]
    t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim = 2, 4, 8, 8
    t.rope_parameters = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                         "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO)


def _minicpmv4_7(c):
    _minicpm(c)  # its canvas M-RoPE places the markers around each image
    _tokens(c, image_start_id=START, image_end_id=END, slice_start_id=248, slice_end_id=249, newline_id=247)


def _navit_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 16x16 image in NaViT layout: its 64 2x2 patches side by side, (1, 3, 2, 64 * 2), grid 8x8."""
    return {"pixel_values": torch.randn(1, 3, 2, 128, generator=g), "target_sizes": torch.tensor([[8, 8]])}


def _navit_pack(inputs: dict) -> None:
    """The model reads all images of a batch packed side by side in one row."""
    inputs["pixel_values"] = torch.cat(list(inputs["pixel_values"]), dim=-1)[None]


RECIPES: dict[str, Recipe] = {
    "vipllava": Recipe(_vipllava, _pixels(8)),
    "video_llava": Recipe(_video_llava, _pixels(8)),
    "qwen2_5_omni_thinker": Recipe(_qwen2_5_omni_thinker, _qwen_patches, (START,), (END,)),
    "video_llama_3": Recipe(_video_llama_3, _video_llama_3_image),
    "muse_glimmer": Recipe(_muse_glimmer, _glimmer_patches),
    "step3p7": Recipe(_step3p7, _pixels(16)),
    "unlimited_ocr": Recipe(_unlimited_ocr, _pixels(32)),
    "blip-2": Recipe(_blip_2, _pixels(8)),
    "instructblip": Recipe(_blip_2, _instructblip_image),
    "instructblipvideo": Recipe(_instructblipvideo, _instructblip_video),
    # the image positions are marked by an input (image_embeds_position_mask), not by a token id
    "kosmos-2": Recipe(_kosmos_2, _pixels(8), (START,), (END,), token_types="image_embeds_position_mask"),
    "kosmos-2.5": Recipe(_kosmos_2_5, _kosmos_2_5_patches, (START,), (END,), token_types="image_embeds_position_mask"),
    "minicpm_ocr": Recipe(_minicpm, _navit_patches, finish=_navit_pack),
    "minicpmv4_6": Recipe(_minicpm, _navit_patches, finish=_navit_pack),
    "minicpmv4_7": Recipe(_minicpmv4_7, _navit_patches, (START,), (END,), finish=_navit_pack,
                          token_types="mm_token_type_ids"),
    # Not here: shieldgemma2. Its image-text-to-text class is Gemma3ForConditionalGeneration, whose save/reload does
    # not round-trip under model_type 'shieldgemma2' in transformers 5.24 (the checkpoint renaming that type
    # registers is meant for ShieldGemma2ForImageClassification): the reload misses every language-model weight.
}
