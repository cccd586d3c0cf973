"""Tiny random-weight LVLMs of every supported family, with inputs whose image tokens sit at known
positions (the transformers model-test recipe: hidden 32-64, 2 decoder layers, 8x8-16x16 images).

``build_tiny(family, seed=0, batch=1, padded=False) -> (model, inputs)``

The number of placeholder tokens per image is read from the model itself
(``get_image_features``), so the inputs stay right whatever the family's feature layout.
Token ids below ``SPECIAL_BASE`` are plain text; the image/video/marker ids sit above it.
"""

from __future__ import annotations

import torch

VOCAB = 128
SPECIAL_BASE = 100
IMAGE, VIDEO, VSTART, VEND, BOI, EOI = 120, 121, 122, 123, 124, 125
PAD = 0

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
            "idefics3", "smolvlm", "internvl", "mistral3")
# Mixture-of-experts LVLMs (fused 3-D experts), kept apart from FAMILIES: only the MoE tests build them.
MOE_FAMILIES = ("qwen3_vl_moe", "glm4v_moe")
_QWEN_LIKE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v_moe")

_LLAMA_TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)
_CLIP_VISION = dict(model_type="clip_vision_model", image_size=8, patch_size=2, hidden_size=16, intermediate_size=32,
                    num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
_QWEN_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})


def _config(family: str):
    import transformers as tf

    if family == "llava":
        return tf.LlavaConfig(text_config=_LLAMA_TEXT, vision_config=_CLIP_VISION, image_token_id=IMAGE,
                              vision_feature_layer=-1, projector_hidden_act="gelu")
    if family == "llava_next":
        return tf.LlavaNextConfig(text_config=_LLAMA_TEXT, vision_config=_CLIP_VISION, image_token_id=IMAGE,
                                  vision_feature_layer=-1, image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]])
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            text_config={**_LLAMA_TEXT, "model_type": "qwen2"},
            vision_config={**_CLIP_VISION, "model_type": "siglip_vision_model"}, image_token_id=IMAGE,
            video_token_id=VIDEO, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[8, 8], [8, 16], [16, 8]])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cls = tf.Qwen2VLConfig if family == "qwen2_vl" else tf.Qwen2_5_VLConfig
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        if family == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=2,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1])
        return cls(text_config=_QWEN_TEXT, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                   vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        text = {**_QWEN_TEXT, "head_dim": 16,
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                    "mrope_interleaved": True}}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 1])
        cls = tf.Qwen3VLConfig
        if family == "qwen3_vl_moe":  # 8 experts, top-2; layer 1 a dense MLP (mlp_only_layers): both kinds of block
            text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        mlp_only_layers=[1])
            cls = tf.Qwen3VLMoeConfig
        return cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                   vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family == "glm4v_moe":
        # layer 0 dense (first_k_dense_replace), layers 1-2 MoE with 8 routed experts (top-2) and a shared expert
        text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=PAD, moe_intermediate_size=32, num_experts_per_tok=2,
                    n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                    rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.5})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=64, image_size=8)
        return tf.Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                                 image_start_token_id=VSTART, image_end_token_id=VEND)
    if family == "gemma3":
        text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention",
                    "full_attention", "sliding_attention", "full_attention"], pad_token_id=PAD)
        vision = dict(image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=IMAGE,
                               boi_token_id=BOI, eoi_token_id=EOI)
    if family in ("idefics3", "smolvlm"):
        cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        vision = dict(image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2)
        return cls(text_config=_LLAMA_TEXT, vision_config=vision, image_token_id=IMAGE, scale_factor=2,
                   pad_token_id=PAD)
    if family == "internvl":
        vision = dict(image_size=[8, 8], patch_size=[2, 2], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2)
        return tf.InternVLConfig(text_config={**_LLAMA_TEXT, "model_type": "qwen2"}, vision_config=vision,
                                 image_token_id=IMAGE, downsample_ratio=0.5, vision_feature_layer=-1)
    if family == "mistral3":
        vision = dict(model_type="pixtral", image_size=16, patch_size=2, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, head_dim=8)
        return tf.Mistral3Config(text_config={**_LLAMA_TEXT, "model_type": "mistral"}, vision_config=vision,
                                 image_token_id=IMAGE, spatial_merge_size=2, vision_feature_layer=-1)
    raise ValueError(f"no tiny config for family {family!r}; choose one of {FAMILIES + MOE_FAMILIES}")


def _vision_inputs(family: str, config, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Model inputs of one image (batch dimension 1 where the family has one)."""
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    if family == "llava":
        return {"pixel_values": randn(1, 3, 8, 8)}
    if family in ("llava_next", "llava_onevision"):
        # an 8x16 image: the base view plus two 8x8 tiles of the anyres grid
        return {"pixel_values": randn(1, 3, 3, 8, 8), "image_sizes": torch.tensor([[8, 16]])}
    if family in _QWEN_LIKE:
        vc = config.vision_config
        grid = torch.tensor([[1, 4, 4]])
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        return {"pixel_values": randn(16, patch_dim), "image_grid_thw": grid}
    if family == "gemma3":
        return {"pixel_values": randn(1, 3, 8, 8)}
    if family in ("idefics3", "smolvlm"):
        return {"pixel_values": randn(1, 1, 3, 8, 8), "pixel_attention_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool)}
    if family == "internvl":
        return {"pixel_values": randn(1, 3, 8, 8)}
    if family == "mistral3":
        return {"pixel_values": randn(1, 3, 16, 16), "image_sizes": torch.tensor([[16, 16]])}
    raise ValueError(family)


def _features_per_image(model, vision: dict[str, torch.Tensor]) -> int:
    # the base model's features; BLIP-2-style models (no base model) compute them on the head model, and
    # video-only ones (InstructBLIP-Video) have video features only
    features_of = (getattr(getattr(model, "model", None), "get_image_features", None)
                   or getattr(model, "get_image_features", None) or model.get_video_features)
    with torch.no_grad():
        out = features_of(**vision)
    features = out.pooler_output if getattr(out, "pooler_output", None) is not None else out
    if getattr(out, "pooler_output", 0) is None and getattr(out, "deepstack_features", None):
        features = out.deepstack_features[0][1]  # Granite 4 Vision: only (decoder layer, features) pairs
    features = getattr(features, "last_hidden_state", features)  # Fuyu: patch embeddings, no pooling
    if isinstance(features, torch.Tensor):
        return int(features.reshape(-1, features.shape[-1]).shape[0])
    return sum(int(f.reshape(-1, f.shape[-1]).shape[0]) for f in features)


def _row(family: str, n_image: int, g: torch.Generator, text_len: int) -> list[int]:
    """Text, then the image placeholder run (with the family's markers), then text."""
    text = lambda n: torch.randint(1, SPECIAL_BASE, (n,), generator=g).tolist()  # noqa: E731
    before, after = text(3), text(text_len)
    if family in _QWEN_LIKE:
        image = [VSTART] + [IMAGE] * n_image + [VEND]
    elif family == "gemma3":
        image = [BOI] + [IMAGE] * n_image + [EOI]
    else:
        image = [IMAGE] * n_image
    return before + image + after


def _stack(family: str, visions: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in visions[0]:
        out[key] = torch.cat([v[key] for v in visions])
    return out


def build_tiny(family: str, seed: int = 0, batch: int = 1, padded: bool = False, text_len: int = 6,
               dtype: torch.dtype = torch.float32):
    """A tiny random ``family`` model (weights from ``seed``) and a batch of ``batch`` samples, one image each.

    ``padded=True`` gives the rows different text lengths, right-padded with ``attention_mask`` 0.
    """
    import transformers as tf

    config = _config(family)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    visions = [_vision_inputs(family, config, g) for _ in range(batch)]
    n_image = _features_per_image(model, visions[0])
    rows = [_row(family, n_image, g, text_len + (2 * b if padded else 0)) for b in range(batch)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((batch, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **_stack(family, visions)}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    if family in _QWEN_LIKE:
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).long()
    if family == "gemma3":
        inputs["token_type_ids"] = (input_ids == IMAGE).long()
    return model, inputs
