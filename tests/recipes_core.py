"""Tiny recipes of the first families tested beyond the registered ones (see tiny_kit.Recipe)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from tiny_kit import _SMALL, END, IMAGE, PAD, START, VIDEO, VOCAB, Recipe, _pixels, _qwen_patches, _tokens, _vision


# -- per-family recipes: config edits, one image's inputs, markers around the image run --------------
def _paligemma(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_index=IMAGE)
    c.text_config.num_image_tokens = 16
    c.projection_dim = 64


def _aya_vision(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_index=IMAGE)
    c.downsample_factor = 2


def _idefics2(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    c.perceiver_config.hidden_size = 64
    c.perceiver_config.resampler_n_latents = 4
    c.perceiver_config.resampler_depth = 1
    c.perceiver_config.resampler_n_heads = 2
    c.perceiver_config.resampler_head_dim = 8
    c.perceiver_config.num_key_value_heads = 1
    _tokens(c, image_token_id=IMAGE)


def _llava_next_video(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_index=IMAGE, video_token_index=VIDEO)
    c.image_grid_pinpoints = [[8, 8], [8, 16], [16, 8]]
    c.vision_feature_layer = -1


def _cohere2_vision(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64)
    _tokens(c, image_token_id=IMAGE)
    c.alignment_intermediate_size = 64


def _got_ocr2(c):
    _vision(c, image_size=32, patch_size=4, hidden_size=32, output_channels=16, mlp_dim=64, global_attn_indexes=[1],
            window_size=4)
    _tokens(c, image_token_index=IMAGE)


def _ovis2(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, vocab_size=16, hidden_stride=2,
            num_visual_indicator_tokens=5)
    _tokens(c, image_token_id=IMAGE, visual_indicator_token_ids=[240, 241, 242, 243, 244])
    c.vocab_size = VOCAB


def _glm4v(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, out_hidden_size=64,
            spatial_merge_size=2, temporal_patch_size=2)
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=START, image_end_token_id=END,
            video_start_token_id=248, video_end_token_id=249)


def _qwen3_5(c):
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, num_position_embeddings=64)
    t = c.text_config
    t.layer_types = ["linear_attention", "full_attention"]
    t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim = 2, 4, 8, 8
    t.rope_parameters = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                         "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _qwen3_vl_moe(c):
    # DeepStack after layer 0 only, so that the last layer's output is the decoder's output
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    c.text_config.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                     "mrope_interleaved": True}
    c.text_config.decoder_sparse_step = 1
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _lfm2_vl(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, num_patches=16)
    t = c.text_config
    t.layer_types = ["conv", "full_attention"]
    t.block_ff_dim = 128
    c.projector_hidden_size = 64
    _tokens(c, image_token_id=IMAGE)


def _gemma4(c):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig, Gemma4VisionConfig

    c.vision_config = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=2,
                                         pooling_kernel_size=2, position_embedding_size=64)
    c.audio_config = None
    # built anew: the per-layer config is derived from layer_types at construction. The last two layers
    # share the K/V of the first two (KV sharing: they hold no k_proj/v_proj of their own).
    small = {k: v for k, v in _SMALL.items() if k in vars(c.text_config) and k != "num_hidden_layers"}
    c.text_config = Gemma4TextConfig(**small,
                                     num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                     num_kv_shared_layers=2, sliding_window=8, hidden_size_per_layer_input=16,
                                     vocab_size_per_layer_input=VOCAB, global_head_dim=16)
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, boi_token_id=START, eoi_token_id=END,
            audio_token_id=249, boa_token_id=248, eoa_token_id=247)


def _gemma4_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image as 16 flattened 2x2 patches with their (x, y) grid positions."""
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), dim=-1).reshape(1, 16, 2)
    return {"pixel_values": torch.rand(1, 16, 12, generator=g), "image_position_ids": grid}


def _mistral4(c):
    c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim = 32, 16, 8, 8, 16
    c.n_group, c.topk_group, c.first_k_dense_replace, c.num_key_value_heads = 1, 1, 1, 4


def _vq_vocabulary(codebook: int, first_id: int = 10) -> dict[str, int]:
    """Chameleon's vocabulary map: '<image>' and one 'IMGIMG<index in letters>Z' token per VQ code."""
    letters = lambda k: "".join(chr(ord("A") + int(d)) for d in str(k))  # noqa: E731
    return {"<image>": IMAGE, **{f"IMGIMG{letters(k)}Z": first_id + k for k in range(codebook)}}


def _chameleon(c):
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

    c.vq_config = ChameleonVQVAEConfig(embed_dim=4, num_embeddings=8, latent_channels=4, base_channels=32,
                                       channel_multiplier=[1, 2], resolution=8)
    c.vocabulary_map, c.image_token_id = _vq_vocabulary(8), IMAGE


def _emu3(c):
    from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig

    c.vq_config = Emu3VQVAEConfig(codebook_size=8, embed_dim=4, latent_channels=4, base_channels=32,
                                  channel_multiplier=[1, 1], attn_resolutions=[], hidden_size=32,
                                  num_attention_heads=1, temporal_downsample_factor=2, num_res_blocks=1)
    codes = {f"<|visual token{k:06d}|>": 10 + k for k in range(8)}  # Emu3's names for the VQ codes
    c.vocabulary_map, c.image_token_id = {"<image>": IMAGE, "<|extra_200|>": 30, **codes}, IMAGE
    c.text_config.pad_token_id, c.text_config.bos_token_id, c.text_config.eos_token_id = PAD, 1, 2


def _emu3_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=g), "image_sizes": torch.tensor([[8, 8]])}


def _molmo2(c):
    from transformers.models.molmo2.configuration_molmo2 import Molmo2AdapterConfig, Molmo2VisionConfig

    c.vision_config = Molmo2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                         image_size=[8, 8], patch_size=2)
    c.adapter_config = Molmo2AdapterConfig(vision_feature_layer=[-1], hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                           text_hidden_size=64)
    _tokens(c, image_patch_id=IMAGE, image_start_token_id=START, image_end_token_id=END,
            low_res_image_start_token_id=248, frame_start_token_id=247, frame_end_token_id=246)


def _molmo2_image(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One 8x8 image: 16 patches of 2x2; 8 tokens (two 2x2 grids), each pooling 4 of the patches."""
    return {"pixel_values": torch.randn(1, 16, 12, generator=g), "image_grids": torch.tensor([[2, 2, 2, 2]]),
            "image_token_pooling": torch.randint(0, 16, (8, 4), generator=g),
            "image_num_crops": torch.ones(1, dtype=torch.long)}


def _molmo2_offsets(inputs: dict) -> None:
    """Shift each image's pooling indices onto the batch's patches where the model expects that.

    Up to transformers 5.24 the processor shifted them (the model indexes the patches of all images at
    once); from 5.25 each image's indices are its own and the model shifts them, given ``image_num_crops``.
    Told apart by the model's ``get_image_features`` signature, not by a version number.
    """
    from transformers.models.molmo2.modeling_molmo2 import Molmo2Model

    if "image_num_crops" in inspect.signature(Molmo2Model.get_image_features).parameters:
        return
    per_image = inputs["image_token_pooling"].shape[0] // inputs["pixel_values"].shape[0]
    image = torch.arange(inputs["image_token_pooling"].shape[0]) // per_image
    inputs["image_token_pooling"] = inputs["image_token_pooling"] + 16 * image[:, None]


def _fuyu(c):
    c.image_size, c.patch_size = 8, 2
    c.text_config.partial_rotary_factor = 0.5
    _tokens(c, image_token_id=IMAGE)


def _bamba(_c):
    """A Mamba2 + attention hybrid (layer 0 a state-space mixer, layer 1 attention), built anew: its
    layer types are derived at construction."""
    from transformers import BambaConfig

    return BambaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4,
                       mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16, max_position_embeddings=512)


RECIPES: dict[str, Recipe] = {
    "paligemma": Recipe(_paligemma, _pixels(8), token_types="token_type_ids"),
    "aya_vision": Recipe(_aya_vision, _pixels(8)),
    "idefics2": Recipe(_idefics2, lambda c, g: {"pixel_values": torch.randn(1, 1, 3, 8, 8, generator=g)}),
    "llava_next_video": Recipe(_llava_next_video, lambda c, g: {"pixel_values": torch.randn(1, 3, 3, 8, 8, generator=g),
                                                                "image_sizes": torch.tensor([[8, 16]])}),
    "cohere2_vision": Recipe(_cohere2_vision, _pixels(8)),
    "got_ocr2": Recipe(_got_ocr2, _pixels(32)),
    "ovis2": Recipe(_ovis2, _pixels(8)),
    "glm4v": Recipe(_glm4v, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "qwen3_5": Recipe(_qwen3_5, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "qwen3_vl_moe": Recipe(_qwen3_vl_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "lfm2_vl": Recipe(_lfm2_vl, lambda c, g: {"pixel_values": torch.randn(1, 16, 12, generator=g),
                                              "spatial_shapes": torch.tensor([[4, 4]]),
                                              "pixel_attention_mask": torch.ones(1, 16, dtype=torch.bool)}),
    "gemma4": Recipe(_gemma4, _gemma4_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "chameleon": Recipe(_chameleon, _pixels(8)),
    "emu3": Recipe(_emu3, _emu3_image),
    "molmo2": Recipe(_molmo2, _molmo2_image, (START,), (END,), finish=_molmo2_offsets, token_types="mm_token_type_ids"),
    "fuyu": Recipe(_fuyu, lambda c, g: {"pixel_values": torch.randn(1, 16, 12, generator=g)}),
    # a text-only causal LM in transformers' image-text-to-text table: fed text only
    "mistral4": Recipe(_mistral4, None),
    # not an LVLM: the state-space hybrid decoder that no listed family builds on this transformers
    "bamba": Recipe(_bamba, None, causal_lm=True),
}
