"""Tiny random-initialised diffusers components, built offline (no download), for tests and examples.

Sizes: 2 double + 2 single blocks with 2 heads of dim 16, text
encoders of width 32, VAEs of width 8 with 4 latent channels (×8 downsampling). Every model is in
eval mode (a freshly constructed model has dropout on) and seeded, so two builds with one seed are
identical and two calls with one generator give bit-identical images.
"""

from __future__ import annotations

from typing import Any

import torch


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _eval(pipe: Any) -> Any:
    """Freshly constructed models are in training mode (dropout on); pipelines loaded from disk are not."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# the transformer sizes every tiny model shares: 2 (double) blocks of 2 heads of dim 16, text width 32
_TINY_BLOCKS: dict[str, Any] = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32)


def _tiny_vae(vae_class: Any, **extra: Any) -> Any:
    """A `vae_class` (AutoencoderKL or a variant) of width 8, 4 latent channels, ×8 downsampling."""
    return vae_class(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    )


def _word_tokenizer(max_length: int) -> Any:
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3}
    for i, word in enumerate(
        [
            "a",
            "photo",
            "of",
            "cat",
            "dog",
            "red",
            "blue",
            "green",
            "tree",
            "house",
            "sky",
            "the",
            "an",
            "on",
            "in",
        ]
    ):
        vocab[word] = 4 + i
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
    )


def flux_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True) -> Any:
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_single_layers=2,
        **_TINY_BLOCKS,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_flux_pipeline(seed: int = 0) -> Any:
    """A FluxPipeline: CLIP + T5 of width 32, tiny VAE (latent 4 ch, ×8), 2+2 transformer blocks.

    `pipe("a photo of a cat", height=64, width=64, num_inference_steps=4)` attends over 32 text +
    16 image tokens (a 4×4 packed grid).
    """
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    transformer = tiny_flux_transformer(seed)
    _seeded(seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            projection_dim=32,
            max_position_embeddings=77,
        )
    )
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=64))
    vae = _tiny_vae(AutoencoderKL, shift_factor=0.0, scaling_factor=1.0)
    return _eval(
        FluxPipeline(
            scheduler=flux_scheduler(),
            vae=vae,
            text_encoder=clip,
            tokenizer=_word_tokenizer(77),
            text_encoder_2=t5,
            tokenizer_2=_word_tokenizer(32),
            transformer=transformer,
        )
    )


def tiny_flux2_transformer(seed: int = 0) -> Any:
    from diffusers import Flux2Transformer2DModel

    _seeded(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_single_layers=2,
        **_TINY_BLOCKS,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def tiny_flux2_pipeline(seed: int = 0) -> Any:
    """A Flux2Pipeline without text encoder (pass `prompt_embeds` of shape `[B, N_txt, 32]`)."""
    from diffusers import AutoencoderKLFlux2, Flux2Pipeline

    transformer = tiny_flux2_transformer(seed)
    _seeded(seed + 1)
    vae = _tiny_vae(AutoencoderKLFlux2)
    return _eval(
        Flux2Pipeline(
            scheduler=flux_scheduler(), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        )
    )


def tiny_qwenimage_transformer(seed: int = 0) -> Any:
    from diffusers import QwenImageTransformer2DModel

    _seeded(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        **_TINY_BLOCKS,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_sd3_transformer(seed: int = 0, dual_attention_layers: tuple[int, ...] = (0,)) -> Any:
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        **_TINY_BLOCKS,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=dual_attention_layers,
    ).eval()
