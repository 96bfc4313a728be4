"""Tiny random-weight diffusers pipelines, saved the way a user's weights are.

No package ships text-to-image weights, so tests (and ``bench/diffusion_bench.py``) build
small pipelines with diffusers and ``save_pretrained`` them into a models directory: a
character-level CLIP tokenizer and a 2-layer CLIP text encoder, a two-block UNet and VAE,
DDIM. The server then loads them through ``--models-dir`` exactly as it would real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"


def _tokenizer(directory: Path) -> Any:
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CHARS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=32
    )


def _unet2d(in_channels: int = 4, width: int = 32) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(width, width * 2),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )


def build_models(root: Path, *, video: bool = True) -> dict[str, Path]:
    """Write ``tiny-sd``, ``tiny-pix2pix``, ``tiny-t2v``, ``tiny-svd`` and a broken dir.

    Returns the paths, plus ``lora`` (a LoRA for tiny-sd's UNet under ``root/loras``) and
    ``not_lora`` (a safetensors file with no LoRA tensors).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(root / "_tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            vocab_size=len(tokenizer) + 2,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    common = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
              "scheduler": scheduler}
    paths: dict[str, Path] = {}
    sd = StableDiffusionPipeline(
        unet=_unet2d(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **common,
    )
    paths["tiny-sd"] = root / "tiny-sd"
    sd.save_pretrained(paths["tiny-sd"])
    (paths["tiny-sd"] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    pix = StableDiffusionInstructPix2PixPipeline(
        unet=_unet2d(in_channels=8), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **common,
    )
    paths["tiny-pix2pix"] = root / "tiny-pix2pix"
    pix.save_pretrained(paths["tiny-pix2pix"])
    paths["tiny-sdxl"] = _sdxl(root, tokenizer, vae)
    if video:
        paths.update(_video_models(root, common))
    broken = root / "not-a-pipeline"
    broken.mkdir(exist_ok=True)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV99Pipeline"}))
    paths["not-a-pipeline"] = broken
    paths["lora"], paths["not_lora"] = _loras(root / "loras", paths["tiny-sd"])
    return paths


def _sdxl(root: Path, tokenizer: Any, vae: Any) -> Path:
    """A tiny SDXL: two text encoders (the second projects a pooled embedding), a UNet
    conditioned on text and time ids (32 + 6 x 8 = 80 extra inputs), Euler."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(3)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, vocab_size=len(tokenizer) + 2, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, projection_dim=32,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
            timestep_spacing="leading",
        ),
    )
    path = root / "tiny-sdxl"
    pipe.save_pretrained(path)
    return path


def _video_models(root: Path, common: dict[str, Any]) -> dict[str, Path]:
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        TextToVideoSDPipeline,
        UNet3DConditionModel,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    out: dict[str, Path] = {}
    unet3d = UNet3DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    )
    t2v = TextToVideoSDPipeline(unet=unet3d, **common)
    out["tiny-t2v"] = root / "tiny-t2v"
    t2v.save_pretrained(out["tiny-t2v"])
    svd_unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    svd_vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        latent_channels=4,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=2,
                         num_attention_heads=4, image_size=224, intermediate_size=37,
                         patch_size=32)
    )
    svd = StableVideoDiffusionPipeline(
        vae=svd_vae,
        image_encoder=encoder,
        unet=svd_unet,
        scheduler=EulerDiscreteScheduler(),
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    out["tiny-svd"] = root / "tiny-svd"
    svd.save_pretrained(out["tiny-svd"])
    return out


def _loras(directory: Path, sd_dir: Path) -> tuple[Path, Path]:
    """A random (non-zero) LoRA for tiny-sd's UNet, and a safetensors file that is not one."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                   target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    state = get_peft_model_state_dict(unet)
    state = {k: v * 4.0 for k, v in state.items()}  # strong enough to change a tiny image
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=state, weight_name="style.safetensors"
    )
    not_lora = directory / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    return directory / "style.safetensors", not_lora
