"""The small demo models: real diffusers / transformers classes in the SD1.5 and SDXL layouts, shrunk.

Layouts (what LoRA code sees) are those of the real models; only widths and depths are small:

- SD1.5: UNet2DConditionModel with down blocks 3 x CrossAttnDownBlock2D + DownBlock2D, up blocks mirrored
  (up_blocks.0 has no attention), layers_per_block 2, use_linear_projection False; one CLIPTextModel.
- SDXL: down blocks DownBlock2D + 2 x CrossAttnDownBlock2D, up blocks 2 x CrossAttnUpBlock2D + UpBlock2D
  (up_blocks.0.attentions.0/1 are B-LoRA's content/style blocks), "text_time" size conditioning,
  CLIPTextModel + CLIPTextModelWithProjection, use_linear_projection True.
- Both: AutoencoderKL mapping RGB to latents 8x smaller (64 px -> 8 x 8 x 4; the 128 px world's models
  16 x 16 x 4); text encoders keep CLIP's 49408-token vocabulary and 77 positions, 32 wide (128 wide in the
  128 px world).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from studio.core.families import check_family
from studio.core.tokenizers import MODEL_MAX_LENGTH, VOCAB_SIZE

BOS_ID, EOS_ID = 49406, 49407
TEXT_WIDTH = 32  # hidden size of the 64 px demo text encoders
# The 128 px world's text encoders are 4x wider: orthogonal adaptation needs each concept's frozen slice to be a
# small share of the input width (a rank-8 slice is 1/4 of a 32-wide text space, 1/16 of 128; SD1.5: rank 20
# of 768), measured in bench/results/orthogonal_probe.md.
TEXT_WIDTHS = {64: TEXT_WIDTH, 128: 4 * TEXT_WIDTH}
SDXL_TIME_EMBED = 8  # addition_time_embed_dim: 6 size numbers x 8 = 48 inputs


def build_vae(image_size: int = 64) -> AutoencoderKL:
    """A small KL autoencoder: RGB <-> latents 8x smaller, 4 channels (three downsamplings, like SD's VAE)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,  # few channels: per-channel (instance) norm would erase flat colours
        sample_size=image_size,
        scaling_factor=1.0,  # set from the data after training
    )


def text_width(image_size: int) -> int:
    """Hidden size of the demo text encoders of the world drawn at `image_size` pixels."""
    return TEXT_WIDTHS.get(image_size, TEXT_WIDTH)


def text_config(with_projection: bool, pad_token_id: int, width: int = TEXT_WIDTH) -> CLIPTextConfig:
    """A narrow CLIP text transformer with the real vocabulary, positions and special-token ids."""
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu" if not with_projection else "gelu",
        projection_dim=width,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=pad_token_id,
    )


def build_text_encoders(family: str, image_size: int = 64) -> list[CLIPTextModel]:
    """[text_encoder] for SD1.5, [text_encoder, text_encoder_2 (with projection)] for SDXL."""
    width = text_width(image_size)
    if check_family(family) == "sd15":
        return [CLIPTextModel(text_config(False, EOS_ID, width))]
    return [
        CLIPTextModel(text_config(False, EOS_ID, width)),
        CLIPTextModelWithProjection(text_config(True, 0, width)),
    ]


def build_unet(family: str, image_size: int = 64) -> UNet2DConditionModel:
    """The denoiser in the family's block layout, for latents of image_size / 8 (8 x 8 at 64 px; at 128 px
    16 x 16, where SDXL's up_blocks.0, B-LoRA's blocks, work on 4 x 4 maps)."""
    if check_family(family) == "sd15":
        return UNet2DConditionModel(
            sample_size=image_size // 8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=text_width(image_size),
            attention_head_dim=4,
            use_linear_projection=False,
        )
    return UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        norm_num_groups=8,
        cross_attention_dim=2 * text_width(image_size),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + text_width(image_size),
    )


def train_scheduler() -> DDPMScheduler:
    """The noise schedule of SD1.5 and SDXL (scaled-linear betas 0.00085..0.012, 1000 steps, epsilon)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
        steps_offset=1,
    )
