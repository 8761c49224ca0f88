"""The tiny world's pipeline: a StableDiffusion3Pipeline of real diffusers and transformers classes with tiny configs,
built offline in code. `python -m tiny_world.build` trains it on captioned shapes into tiny_world/pipeline, which
`tempflow_grpo.py --tiny` loads; the tests build it random, and bench/sd35m.py borrows its tokenizers."""
import copy
from pathlib import Path

import torch

TINY_WORDS = ("a an the of on in at and with one two three four five red green blue yellow orange purple pink "
              "cyan white black gray brown circle circles square squares triangle triangles ball balls left "
              "right top bottom middle center picture photo").split()
TINY_TOKENS = 16  # prompt tokens per text encoder; captions of the tiny world are at most 8 words
TINY_WORLD = Path(__file__).parent / "pipeline"


def _tiny_clip_tokenizer():
    """A byte-level BPE CLIPTokenizer whose merges spell each word of TINY_WORDS; other words fall back to letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.update({c: len(vocab), c + "</w>": len(vocab) + 1})
    merges = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces[1:]:
            merges.append((pieces[0], piece))
            pieces[0] += piece
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TINY_TOKENS)


def _tiny_t5_tokenizer():
    """A Unigram T5Tokenizer with TINY_WORDS as whole-word pieces and single characters as the fallback."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TINY_TOKENS)


def build_tiny_pipeline(seed: int = 0, pretrained: bool = False):
    """A StableDiffusion3Pipeline of tiny random components (64 px images, 4 x 16 x 16 latents), built offline,
    deterministic for a seed, every component in eval mode. pretrained=True loads the tiny world instead: the
    same components trained on captioned shapes by `python -m tiny_world.build` (the seed is then unused)."""
    if pretrained:
        from plumbing import load_pipeline

        return load_pipeline(str(TINY_WORLD))
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_3 = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    clip = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, projection_dim=16,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_TOKENS,
                          hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        components = dict(
            # SD3.5's layout in miniature: patch 2, qk RMS norm, a dual-attention layer
            transformer=SD3Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
                pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
            vae=AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0),
            text_encoder=CLIPTextModelWithProjection(clip),
            text_encoder_2=CLIPTextModelWithProjection(clip),
            text_encoder_3=T5EncoderModel(t5),
        )
    for module in components.values():
        module.eval()  # a T5 built from a config has dropout on, and the pipeline never turns it off
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=tokenizer,
                                    tokenizer_2=copy.deepcopy(tokenizer), tokenizer_3=tokenizer_3, **components)
