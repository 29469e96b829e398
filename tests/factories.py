"""The one factory of reduced-size models for tests, and a tiny random text encoder / VAE
(nothing is downloaded)."""
from pathlib import Path

import torch

from nitro_ar import NitroAR, NitroARConfig, NitroE, NitroEConfig

# The acceptance sizes: 2 heads x 32, text width 48, head width 128, head depth 2; one block
# per group, which keeps every code path of the released 4 / 16 / 4 layout: the three groups,
# token compression and reconstruction between them, the context-pre-only last block and, for
# Nitro-E, all three ASA patterns (blocks 0, 1, 2 are (1, 1), (4, 1), (4, 4)).
TINY = dict(num_attention_heads=2, attention_head_dim=32, caption_projection_dim=64, caption_channels=48,
            block_groups=(1, 1, 1))
TINY_AR = dict(TINY, diffloss_w=128, diffloss_d=2)
TEXT_WIDTH = 48


def tiny_ar_config(variant: str = "gan", **overrides) -> NitroARConfig:
    return NitroARConfig.for_variant(variant, **{**TINY_AR, **overrides})


def tiny_e_config(**overrides) -> NitroEConfig:
    return NitroEConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Overwrite every parameter with N(0, scale): zero-initialised layers would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_ar(variant: str = "gan", seed: int = 0, **overrides) -> NitroAR:
    return randomize_(NitroAR(tiny_ar_config(variant, **overrides)), seed).eval()


def tiny_e(seed: int = 0, **overrides) -> NitroE:
    return randomize_(NitroE(tiny_e_config(**overrides)), seed).eval()


def save_tiny_text_encoder(path: Path, hidden: int = TEXT_WIDTH) -> Path:
    """A random 2-layer Llama with a word-level tokenizer, saved like a hub download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "a an the red blue green fox cat dog owl tree sky under over made of toy photo <unk> <s> </s>".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=words.index("<s>"), eos_token_id=words.index("</s>"),
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_vae(path: Path) -> Path:
    """A random DC-AE with f32 down-sampling and 32 latent channels but 8-channel stages."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    stages = 6
    vae = AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8,
        encoder_block_types=("ResBlock",) * stages, decoder_block_types=("ResBlock",) * stages,
        # The deepest stage is as wide as the latent: DC-AE's shortcuts regroup channels.
        encoder_block_out_channels=(8,) * (stages - 1) + (32,), decoder_block_out_channels=(8,) * (stages - 1) + (32,),
        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages,
        encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
        upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    vae.save_pretrained(path)
    return path
