"""TempFlow-GRPO: GRPO fine-tuning of a flow-matching text-to-image model (Stable Diffusion 3.5-medium) with
trajectory branching and noise-aware weighting, in one file.

Notation (code -> paper):
    sigmas[i]      s_i, the noise level of grid index i; s_0 = 1 (noise) > ... > s_T = 0 (image)
    dt             dt_i = s_{i+1} - s_i < 0
    noise_level    a, the SDE noise level; sigma_i = a sqrt(s_i / (1 - s_i))
    std            std_i = sigma_i sqrt(-dt_i), the std of one SDE transition
    guidance       g, classifier-free guidance: v = v_u + g (v_c - v_u)

Shapes: B batch, C latent channels, H, W latent height and width, T sampling steps, L prompt tokens, D width.
"""
import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor

# =====================================================================================================
# Flow-matching math (SPEC 1-2). Pure functions of tensors: torch only, float32 inside.
# =====================================================================================================


def sigma_grid(scheduler, steps: int) -> Tensor:
    """The T-step grid s_0 = 1 > s_1 > ... > s_T = 0, as the pipeline's FlowMatchEulerDiscreteScheduler makes it."""
    scheduler = copy.deepcopy(scheduler)  # set_timesteps mutates it; the pipeline's own stays untouched
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError("schedulers with use_dynamic_shifting need a resolution-dependent mu; SD3.5 has none")
    scheduler.set_timesteps(steps)
    return scheduler.sigmas  # [T + 1], float32


def grid_step(sigmas: Tensor, i: Tensor) -> tuple[Tensor, Tensor]:
    """s_i and dt_i for grid indices i (any shape)."""
    # dt_i = s_{i+1} - s_i < 0: sampling runs from noise (s = 1) to image (s = 0)
    return sigmas[i], sigmas[i + 1] - sigmas[i]


def sde_scale(sigmas: Tensor, i: Tensor, noise_level: float) -> tuple[Tensor, Tensor]:
    """sigma_i, the diffusion coefficient of the reverse SDE, and std_i, the std of one Euler-Maruyama step."""
    s, dt = grid_step(sigmas, i)
    # sigma_i = a sqrt(s_i / (1 - s_i)); at s_i = 1 the denominator uses s_1 to stay finite
    sigma = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, sigmas[1], s)))
    # std_i = sigma_i sqrt(-dt_i)
    return sigma, sigma * torch.sqrt(-dt)


def _as_index(i, batch: int, device) -> Tensor:
    """An int or a LongTensor[B] of grid indices as a LongTensor[B]."""
    return torch.as_tensor(i, dtype=torch.long, device=device).expand(batch)


def _per_sample(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1], to broadcast over a latent


def sde_step(x: Tensor, v: Tensor, sigmas: Tensor, i, noise_level: float, prev_sample: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of Flow-GRPO's reverse SDE from s_i to s_{i+1}, and the policy's log-density of its result.

    x, v: [B, C, H, W] latent and velocity (any float dtype; the math runs in float32). i: int or LongTensor[B],
    so a batch may mix grid indices. With prev_sample given, that sample is only scored.
    Returns prev_sample [B, C, H, W], log_prob [B] (averaged over C*H*W), mean [B, C, H, W], std [B].
    """
    x, v, sigmas = x.float(), v.float(), sigmas.to(x.device, torch.float32)
    i = _as_index(i, x.shape[0], x.device)
    s, dt = map(_per_sample, grid_step(sigmas, i))
    sigma, std = map(_per_sample, sde_scale(sigmas, i, noise_level))
    # mean_i = x_i + [v + sigma_i^2 / (2 s_i) (x_i + (1 - s_i) v)] dt_i   (drift plus the score correction)
    mean = x + (v + sigma**2 / (2 * s) * (x + (1 - s) * v)) * dt
    if prev_sample is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        # x_{i+1} = mean_i + std_i eps, eps ~ N(0, I)
        prev_sample = mean + std * eps
    # log pi(x_{i+1} | x_i) = -|x_{i+1} - mean_i|^2 / (2 std_i^2) - log std_i - log sqrt(2 pi), mean over C*H*W
    # (the reference convention: averaged, not summed as a density would be, to keep the ratio in range)
    log_prob = -((prev_sample.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    log_prob = log_prob.mean(dim=(1, 2, 3))  # [B]
    return prev_sample, log_prob, mean, std.flatten()


def ode_step(x: Tensor, v: Tensor, sigmas: Tensor, i) -> Tensor:
    """One Euler step of the probability-flow ODE from s_i to s_{i+1}; i is an int or a LongTensor[B]."""
    x, v, sigmas = x.float(), v.float(), sigmas.to(x.device, torch.float32)
    dt = _per_sample(grid_step(sigmas, _as_index(i, x.shape[0], x.device))[1])
    # x_{i+1} = x_i + dt_i v
    return x + dt * v


class PromptEmbeds(NamedTuple):
    """The pipeline's encode_prompt output for P prompts; CFG needs the empty prompt's embeddings too."""
    embeds: Tensor      # [P, L, D]  CLIP-L, CLIP-G and T5 tokens
    pooled: Tensor      # [P, D_pooled]
    neg_embeds: Tensor  # [P, L, D]  the empty prompt
    neg_pooled: Tensor  # [P, D_pooled]

    def take(self, rows: Tensor) -> "PromptEmbeds":
        return PromptEmbeds(*(t[rows] for t in self))


def cfg_velocity(transformer, x: Tensor, sigma: Tensor, prompts: PromptEmbeds, guidance: float) -> Tensor:
    """The policy's velocity with classifier-free guidance for latents x [N, C, H, W] at noise levels sigma [N];
    prompts holds N rows. One transformer call of 2N latents (N when guidance is 1, as in the pipeline)."""
    model_dtype = transformer.dtype
    if guidance == 1:
        return transformer(hidden_states=x.to(model_dtype), encoder_hidden_states=prompts.embeds,
                           pooled_projections=prompts.pooled, timestep=1000 * sigma, return_dict=False)[0]
    # the transformer's timestep is 1000 t (SPEC 1); the empty prompt comes first, as in the pipeline
    v = transformer(hidden_states=torch.cat([x, x]).to(model_dtype),
                    encoder_hidden_states=torch.cat([prompts.neg_embeds, prompts.embeds]),
                    pooled_projections=torch.cat([prompts.neg_pooled, prompts.pooled]),
                    timestep=1000 * torch.cat([sigma, sigma]), return_dict=False)[0]
    v_uncond, v_cond = v.chunk(2)
    # v = v_u + g (v_c - v_u)
    return v_uncond + guidance * (v_cond - v_uncond)


# =====================================================================================================
# TempFlow pieces (SPEC 5)
# =====================================================================================================


def noise_aware_weights(sigmas: Tensor, noise_level: float, steps) -> Tensor:
    """w_k for the trained steps k: proportional to the SDE std of step k, mean exactly 1 over the steps."""
    _, std = sde_scale(sigmas.double(), torch.as_tensor(steps, dtype=torch.long), noise_level)
    # w_k = std_k / mean_{j in B} std_j   (the noise level a cancels; the grid alone decides)
    return (std / std.mean()).float()  # [len(steps)]


# =====================================================================================================
# Rollouts (SPEC 3, 7)
# =====================================================================================================


def ode_rollout(transformer, x: Tensor, sigmas: Tensor, prompts: PromptEmbeds, guidance: float,
                start: int = 0) -> Tensor:
    """Integrate the ODE from grid index start down to s_T = 0. x: [N, C, H, W]; prompts: N rows."""
    for i in range(start, len(sigmas) - 1):
        v = cfg_velocity(transformer, x, sigmas[i].expand(len(x)).to(x.device), prompts, guidance)
        x = ode_step(x, v, sigmas, i)
    return x


# =====================================================================================================
# ---------------- the algorithm ends here; what follows is plumbing around diffusers ----------------
# =====================================================================================================

# SD3's T5 prompt length (SPEC 9: 77 CLIP + 256 T5 tokens); a tokenizer with a shorter model_max_length caps it.
T5_TOKENS = 256


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """StableDiffusion3Pipeline from a hub id or a local folder, or one line saying how to provide it."""
    from diffusers import StableDiffusion3Pipeline

    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SystemExit(f"error: cannot load --model {model!r} ({reason[:200]}). Download it once with "
                         f"`hf download {model}` (after accepting its license on the hub) or pass --model "
                         f"/path/to/a/local/copy.") from None
    return pipe


def encode_prompts(pipe, prompts: list[str]) -> PromptEmbeds:
    """Embeddings of the prompts and of the empty prompt, computed once by the pipeline's own encode_prompt."""
    length = min(T5_TOKENS, pipe.tokenizer_3.model_max_length)
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=length)
    return PromptEmbeds(embeds, pooled, neg_embeds, neg_pooled)


def initial_noise(pipe, n: int, resolution: int, generator: torch.Generator) -> Tensor:
    """x at s_0 = 1: n latents of pure noise, drawn as the pipeline's prepare_latents draws them."""
    side = resolution // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    return torch.randn(n, channels, side, side, generator=generator, device=generator.device)  # [n, C, H, W]


# ---------------- the tiny pipeline: real diffusers/transformers classes, tiny configs, no network ----------------

TINY_WORDS = ("a an the of on in at and with one two three four five red green blue yellow orange purple pink "
              "cyan white black gray brown circle circles square squares triangle triangles ball balls left "
              "right top bottom middle center picture photo").split()
TINY_TOKENS = 16  # prompt tokens per text encoder; captions of the tiny world are at most 8 words


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


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline of tiny random components (64 px images, 4 x 16 x 16 latents), built offline,
    deterministic for a seed, every component in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
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
