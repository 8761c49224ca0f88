"""TempFlow-GRPO: GRPO fine-tuning of a flow-matching text-to-image model (Stable Diffusion 3.5-medium) with
trajectory branching and noise-aware weighting, and the Flow-GRPO baseline behind a flag, in one file.

    python tempflow_grpo.py --tiny --prompt-file tiny_world/prompts.txt --out runs/tiny   # CPU, minutes
    python tempflow_grpo.py --prompt-file prompts.txt --out runs/sd35m                    # one GPU, SD3.5-M + PickScore
    python tempflow_grpo.py --method flow_grpo ...                                       # the baseline

An epoch: sample P prompts; for each, S initial noises; integrate an ODE trunk from each noise and, at every
branch step k, draw G SDE branches from the trunk state x_k, each finished by the ODE (TempFlow, SPEC 3). The
reward of a branch's image is the process reward of step k, so advantages are normalised over the G branches of
one (prompt, seed, k). The clipped GRPO loss on each recorded transition x_k -> y is weighted by w_k, the SDE
std of step k over its mean (SPEC 5), plus beta times the exact KL to the base model (LoRA switched off).

Notation (code -> paper):
    sigmas[i]         s_i, noise level of grid index i; s_0 = 1 (noise) > ... > s_T = 0 (image)
    dt                dt_i = s_{i+1} - s_i < 0
    noise_level       a, SDE noise level; sigma_i = a sqrt(s_i / (1 - s_i))
    std               std_i = sigma_i sqrt(-dt_i), std of one SDE transition
    guidance          g, classifier-free guidance: v = v_u + g (v_c - v_u)
    steps             T, sampling steps
    branch_steps      B, the branched and trained steps k
    branches          G, SDE branches per (prompt, seed, k)
    seeds_per_prompt  S, initial noises per prompt
    step_weight[k]    w_k, noise-aware weight
    clip_range, beta  eps and beta of the loss

Shape letters: N initial noises (trunks), M final images, K recorded transitions, C, H, W a latent's channels,
height and width, P prompts, L prompt tokens, D embedding width.

Deliberate departures from the paper or the official code (each a flag where it is a choice):
  1. log pi is averaged, not summed, over the latent's C*H*W elements (the official convention; SPEC 2).
  2. w_k is computed from the grid; one public script divides by a hard-coded 2.25 instead (SPEC 5).
  3. A trunk stops after the last branch step, as SPEC 3's cost counts it (max(B) + 1 trunk evaluations).
  4. Groups whose rewards are all equal (A = 0) are dropped from training; a sample with a non-finite reward is
     left out of its group and counted as invalid.
  5. The Flow-GRPO rollout takes the SDE at the trained steps (all but the last) and the ODE at the last.
  6. Latents are float32 throughout; on CUDA the transformer runs under bf16 autocast, the step math in float32.
  7. --tiny changes the model, reward, resolution and the optimisation settings listed in TINY below, each
     chosen by a measurement given there and in README.md.
"""
import argparse
import ast
import copy
import json
import logging
import math
import os
import shutil
import signal
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from reward import load_reward, parse_spec, to_pil

# Without torchvision, transformers falls back to its PIL image processors (fine here) and says so at every start.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())


# =====================================================================================================
# Configuration: every setting, its default (SPEC's reference value where it has one) and its meaning.
# The command line is generated from these fields; their docstrings are its --help.
# =====================================================================================================


@dataclass
class Args:
    # ---- what to run
    prompt_file: str = ""
    """training prompts, one per line (required)"""
    out: str = "runs/tempflow"
    """output folder: config.json, metrics.jsonl, checkpoints/, the final LoRA in lora/"""
    tiny: bool = False
    """the CPU demo: the tiny world (tiny_world/pipeline), geneval_toy, 64 px, and the departures in the docstring
    (from Python: Args(**TINY, tiny=True, ...), as the command line does)"""
    model: str = "stabilityai/stable-diffusion-3.5-medium"
    """diffusers StableDiffusion3Pipeline: a hub id or a local folder"""
    reward: str = "pickscore"
    """reward spec: name[:weight],... or path/to/file.py:function (see reward.py)"""
    seed: int = 0
    """seed of prompt order, initial noise and SDE noise"""
    epochs: int = 1000
    """epochs, each a rollout then --optimizer-steps updates (paper: 1000 for PickScore)"""

    # ---- method: --method sets the next three; each can be overridden alone for the paper's ablations
    method: str = "tempflow"
    """tempflow (branch, noise, seed) or flow_grpo (sde, uniform, prompt)"""
    rollout: str = ""
    """branch: ODE trunk with G SDE branches per branch step (SPEC 3); sde: SDE at every branch step (SPEC 7)"""
    weighting: str = ""
    """noise: w_k = std_k / mean_j std_j (SPEC 5); uniform: w_k = 1"""
    group: str = ""
    """seed: advantages over the G branches of one (prompt, seed, k); prompt: over all S*G samples of (prompt, k)"""

    # ---- sampling
    steps: int = 10
    """T, sampling steps of the rollout (paper: 10)"""
    branch_steps: str = ""
    """B, the trained steps: comma list or range like 0-8 (default: all 0..T-2; the last step is never trained)"""
    branches: int = 6
    """G, SDE branches per (prompt, seed, branch step) (paper: 6); --rollout sde draws S*G samples per prompt"""
    seeds_per_prompt: int = 4
    """S, initial noises per prompt (paper: 4); Flow-GRPO's group is S*G = 24 samples"""
    prompts_per_epoch: int = 2
    """P, prompts per epoch; an epoch samples P*S*|B|*G branch images (branch) or P*S*G images (sde)"""
    noise_level: float = 0.7
    """a, the SDE noise level (paper: 0.7)"""
    guidance: float = 4.5
    """g, classifier-free guidance in rollout and training (paper: 4.5)"""
    resolution: int = 512
    """image side in pixels (paper: 512)"""
    max_batch: int = 32
    """most latents in one transformer call, CFG's two halves counted, in rollout and training (memory cap)"""

    # ---- optimisation
    lr: float = 3e-4
    """AdamW learning rate (paper: 3e-4)"""
    beta: float = 0.001
    """KL weight to the base model (paper: 0.001 for PickScore, 0.004 for GenEval-style rewards)"""
    clip_range: float = 1e-4
    """eps, the PPO clip range of the ratio (paper: 1e-4)"""
    adv_clip: float = 5.0
    """advantages are clipped to [-adv_clip, adv_clip] (paper: 5)"""
    lora_rank: int = 32
    """LoRA rank r on the attention projections (paper: 32); alpha is 2r"""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper: 1e-4)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip (paper: 1.0)"""
    optimizer_steps: int = 2
    """optimizer steps per epoch; the epoch's transitions are split evenly among them (paper: 2)"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in backward: less memory, about a third more time"""

    # ---- long runs: checkpoints, evaluation, images
    resume: bool = False
    """continue the run in --out from its last complete checkpoint, up to --epochs"""
    save_every: int = 10
    """epochs between checkpoints in --out/checkpoints (also written on SIGINT/SIGTERM and at the end)"""
    eval_prompt_file: str = ""
    """evaluation prompts, one image each from fixed noise with the ODE; empty: no evaluation"""
    eval_every: int = 10
    """epochs between evaluations (and after the last epoch)"""
    eval_steps: int = 40
    """ODE steps of evaluation (paper: 40)"""
    image_every: int = 10
    """epochs between PNG grids of the epoch's samples, with their prompts and rewards, in --out/images"""
    max_nfe: int = 0
    """stop once this many latents went through the transformer, for compute-matched comparisons (0: no limit)"""


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


def cfg_copies(guidance: float) -> int:
    """Latents the transformer sees per row: the empty prompt's and the prompt's under CFG (guidance > 1, as in
    the pipeline), the prompt's alone otherwise."""
    return 2 if guidance > 1 else 1


def cfg_velocity(transformer, x: Tensor, sigma: Tensor, prompts: PromptEmbeds, guidance: float) -> Tensor:
    """The policy's velocity with classifier-free guidance for latents x [N, C, H, W] at noise levels sigma [N];
    prompts holds N rows. One transformer call of cfg_copies(guidance) * N latents."""
    copies = cfg_copies(guidance)
    # the empty prompt first, as in the pipeline ([-copies:] keeps the prompt alone without CFG);
    # the transformer's timestep is 1000 t (SPEC 1)
    v = transformer(hidden_states=x.repeat(copies, 1, 1, 1).to(transformer.dtype),
                    encoder_hidden_states=torch.cat([prompts.neg_embeds, prompts.embeds][-copies:]),
                    pooled_projections=torch.cat([prompts.neg_pooled, prompts.pooled][-copies:]),
                    timestep=1000 * sigma.repeat(copies), return_dict=False)[0]
    if copies == 1:
        return v
    v_uncond, v_cond = v.chunk(2)
    # v = v_u + g (v_c - v_u)
    return v_uncond + guidance * (v_cond - v_uncond)


# =====================================================================================================
# TempFlow pieces (SPEC 3, 5): which steps branch and train, and how much each weighs
# =====================================================================================================


def parse_branch_steps(text: str, steps: int) -> list[int]:
    """`0-8` or `0,2,4` -> sorted grid indices; empty means every step but the last, 0..T-2."""
    if not text:
        return list(range(steps - 1))
    picked = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        picked.update(range(int(low), int(high or low) + 1))
    return sorted(picked)


def noise_aware_weights(sigmas: Tensor, noise_level: float, steps) -> Tensor:
    """w_k for the trained steps k: proportional to the SDE std of step k, mean exactly 1 over the steps."""
    _, std = sde_scale(sigmas.double(), torch.as_tensor(steps, dtype=torch.long), noise_level)
    # w_k = std_k / mean_{j in B} std_j   (the noise level a cancels; the grid alone decides)
    return (std / std.mean()).float()  # [len(steps)]


# =====================================================================================================
# Rollouts (SPEC 3, 7): one wavefront loop for both methods
# =====================================================================================================


def velocity(transformer, x: Tensor, sigma: Tensor, prompts: PromptEmbeds, rows: Tensor, guidance: float,
             max_batch: int) -> Tensor:
    """cfg_velocity of N latents x, latent n under prompt rows[n], in chunks of at most max_batch latents per
    transformer call; each chunk gathers its own prompt rows (SD3.5's are 2.7 MB each)."""
    per_call = max(1, max_batch // cfg_copies(guidance))
    return torch.cat([cfg_velocity(transformer, x[j:j + per_call], sigma[j:j + per_call],
                                   prompts.take(rows[j:j + per_call]), guidance)
                      for j in range(0, len(x), per_call)])


def ode_rollout(transformer, x: Tensor, sigmas: Tensor, prompts: PromptEmbeds, guidance: float,
                start: int = 0, max_batch: int = 1 << 30) -> Tensor:
    """Integrate the ODE from grid index start down to s_T = 0. x: [N, C, H, W]; prompts: N rows."""
    for i in range(start, len(sigmas) - 1):
        v = velocity(transformer, x, sigmas[i].expand(len(x)).to(x.device), prompts,
                     torch.arange(len(x), device=prompts.embeds.device), guidance, max_batch)
        x = ode_step(x, v, sigmas, i)
    return x


class Rollout(NamedTuple):
    """What a rollout leaves for training. M final images, K recorded SDE transitions."""
    latents: Tensor       # [M, C, H, W] final latents at s_T = 0
    image_noise: Tensor   # [M] which initial noise (trunk) each image grew from
    image_step: Tensor    # [M] the branch step k that made it, -1 for an SDE rollout's images
    x: Tensor             # [K, C, H, W] x_k, the state the transition left
    y: Tensor             # [K, C, H, W] x_{k+1}, the SDE sample it reached
    log_prob: Tensor      # [K] log pi_old(y | x_k)
    step: Tensor          # [K] k
    image: Tensor         # [K] the image whose reward scores the transition


@torch.no_grad()
def rollout(transformer, noise: Tensor, prompts: PromptEmbeds, sigmas: Tensor, branch_steps: list[int],
            branches: int, noise_level: float, guidance: float, max_batch: int,
            generator: torch.Generator) -> Rollout:
    """Sample from N initial noises [N, C, H, W] (prompts: N rows), recording every SDE transition.

    branches > 0, TempFlow (SPEC 3): each row is an ODE trunk; at each branch step k it forks `branches` SDE
    children y_{k,g} ~ N(mean_k, std_k^2), each finished by the ODE. Trunks stop after the last branch step.
    branches = 0, Flow-GRPO (SPEC 7): each row takes the SDE at the branch steps and the ODE elsewhere.
    All live rows sit at the same grid index, so the rollout is T batched transformer calls (chunked by max_batch).
    """
    trunk, trunk_id = noise.float(), torch.arange(len(noise), device=noise.device)  # [N, C, H, W], [N]
    leaves, leaf_id = trunk[:0], trunk_id[:0]  # finished-by-ODE branches and the trunk each grew from
    records, last = [], max(branch_steps)
    for i in tqdm(range(len(sigmas) - 1), desc="sample", leave=False, disable=None):
        if branches and i > last:
            trunk, trunk_id = trunk[:0], trunk_id[:0]  # no branch left to spawn: the trunk's work is done
        x, rows = torch.cat([trunk, leaves]), torch.cat([trunk_id, leaf_id])
        v = velocity(transformer, x, sigmas[i].expand(len(x)).to(x.device), prompts, rows, guidance, max_batch)
        v_trunk, v_leaves = v[:len(trunk)], v[len(trunk):]
        leaves = ode_step(leaves, v_leaves, sigmas, i)
        if i in branch_steps and branches:
            x_k, parent = trunk.repeat_interleave(branches, 0), trunk_id.repeat_interleave(branches)
            y, log_prob, _, _ = sde_step(x_k, v_trunk.repeat_interleave(branches, 0), sigmas, i, noise_level,
                                         generator=generator)
            records.append((x_k, y, log_prob, i, len(leaves) + torch.arange(len(y), device=y.device)))
            leaves, leaf_id = torch.cat([leaves, y]), torch.cat([leaf_id, parent])
            trunk = ode_step(trunk, v_trunk, sigmas, i)
        elif i in branch_steps:
            y, log_prob, _, _ = sde_step(trunk, v_trunk, sigmas, i, noise_level, generator=generator)
            records.append((trunk, y, log_prob, i, trunk_id))
            trunk = y
        else:
            trunk = ode_step(trunk, v_trunk, sigmas, i)
    x_k, y, log_prob, step, image = zip(*records)
    step = torch.cat([torch.full_like(lp, k, dtype=torch.long) for lp, k in zip(log_prob, step)])
    if branches:
        latents, image_noise, image_step = leaves, leaf_id, step
    else:
        latents, image_noise, image_step = trunk, trunk_id, torch.full_like(trunk_id, -1)
    return Rollout(latents, image_noise, image_step, torch.cat(x_k), torch.cat(y), torch.cat(log_prob), step,
                   torch.cat(image))


def rollout_nfe(rollout: str, steps: int, branch_steps: list[int], branches: int, guidance: float) -> int:
    """Transformer evaluations of one latent per initial noise (SPEC 3), CFG's halves counted."""
    halves = cfg_copies(guidance)
    if rollout == "sde":
        return halves * steps
    # max(B) + 1 for the trunk, plus G (T - 1 - k) for the branches of every k in B
    return halves * (max(branch_steps) + 1 + branches * sum(steps - 1 - k for k in branch_steps))


# =====================================================================================================
# Advantages and the loss (SPEC 4, 6)
# =====================================================================================================


def group_advantages(rewards: Tensor, groups: Tensor, clip: float = 5.0) -> tuple[Tensor, Tensor]:
    """Per-group normalised advantages of M rewards; groups [M] are group ids. A non-finite reward is left out of
    its group's statistics and gets A = 0. Returns advantages [M] and the zero-std flag of each sample's group."""
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, 0.0).double()
    n = torch.zeros(int(groups.max()) + 1, dtype=torch.double, device=groups.device).index_add_(0, groups, valid.double())
    mean = torch.zeros_like(n).index_add_(0, groups, r) / n.clamp(min=1)
    var = torch.zeros_like(n).index_add_(0, groups, torch.where(valid, (r - mean[groups]) ** 2, 0.0)) / n.clamp(min=1)
    # A = (r - mean_group r) / (std_group r + 1e-4), population std, clipped to [-5, 5]
    advantages = ((r - mean[groups]) / (var[groups].sqrt() + 1e-4)).clamp(-clip, clip)
    return torch.where(valid, advantages, 0.0).float(), var[groups] == 0


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, weights: Tensor, mean: Tensor,
              ref_mean: Tensor, std: Tensor, clip_range: float, beta: float) -> tuple[Tensor, dict]:
    """Clipped GRPO loss over B transitions, each term weighted by its step's w_k, plus beta times the exact KL
    to the base model. log_prob, old_log_prob, advantages, weights, std: [B]; mean, ref_mean: [B, C, H, W]."""
    # ratio = exp(log pi_theta(y | x_k) - log pi_old(y | x_k))
    ratio = torch.exp(log_prob - old_log_prob)
    # max(-w_k A ratio, -w_k A clip(ratio, 1 - eps, 1 + eps)); the weight scales the policy term only
    policy = torch.maximum(-weights * advantages * ratio,
                           -weights * advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    # KL_k = mean_CHW (mean_theta - mean_ref)^2 / (2 std_k^2), closed form for two Gaussians of one std
    kl = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    loss = (policy + beta * kl).mean()
    stats = dict(policy_loss=policy.mean(), kl=kl.mean(), ratio_mean=ratio.mean(),
                 clipfrac=((ratio - 1).abs() > clip_range).float().mean())
    return loss, {k: v.detach() for k, v in stats.items()}


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


@torch.no_grad()
def decode_latents(pipe, latents: Tensor) -> Tensor:
    """Latents [B, C, H, W] -> images [B, 3, H*f, W*f] in [0, 1], unscaled and post-processed as the pipeline does."""
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pt")


@torch.no_grad()
def ode_images(pipe, prompts: list[str], steps: int, guidance: float, resolution: int, generator: torch.Generator,
               max_batch: int = 1 << 30) -> Tensor:
    """One ODE sample per prompt from fresh noise, decoded: images [N, 3, H, W] in [0, 1]."""
    noise = initial_noise(pipe, len(prompts), resolution, generator)
    with autocast(noise.device):
        latents = ode_rollout(pipe.transformer, noise, sigma_grid(pipe.scheduler, steps), encode_prompts(pipe, prompts),
                              guidance, max_batch=max_batch)
        return torch.cat([decode_latents(pipe, z) for z in latents.split(max_batch)])


def read_prompts(path: str, flag: str = "--prompt-file") -> list[str]:
    """Non-blank lines of a UTF-8 text file, or one line saying what is wrong with it."""
    file = Path(path)
    if not path:
        raise SystemExit(f"error: {flag} is required")
    if not file.is_file():
        raise SystemExit(f"error: {flag} {path!r} does not exist")
    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: {flag} {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not prompts:
        raise SystemExit(f"error: {flag} {path!r} has no prompts (it is empty or only blank lines)")
    return prompts


# SPEC 6: LoRA on the attention projections of the image stream and of the context (text) stream
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def add_lora(transformer, rank: int) -> list[torch.nn.Parameter]:
    """Freeze the transformer and add a LoRA adapter (alpha = 2 rank, B = 0 so it starts as the base model);
    returns its parameters, kept in float32 whatever the transformer's dtype."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextmanager
def lora_disabled(transformer):
    """The base model, for the KL reference: the adapter switched off, not a second copy of the transformer."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def save_lora(pipe, folder: Path):
    """The adapter in diffusers' format: StableDiffusion3Pipeline.load_lora_weights(folder) loads it back."""
    from peft.utils import get_peft_model_state_dict

    type(pipe).save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())


class Cost:
    """Training cost so far: latents through the transformer (CFG's halves counted), kept up by a forward hook,
    and wall seconds. Evaluation runs inside paused() and counts in neither."""
    def __init__(self, transformer, nfe: int = 0, wall_s: float = 0.0):
        self.nfe, self.wall_before, self.since = nfe, wall_s, time.time()
        transformer.register_forward_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs, output):
        self.nfe += len(kwargs["hidden_states"])

    def wall_s(self) -> float:
        return round(self.wall_before + time.time() - self.since, 2)

    @contextmanager
    def paused(self):
        nfe, wall_s = self.nfe, self.wall_s()
        yield
        self.nfe, self.wall_before, self.since = nfe, wall_s, time.time()


# ---------------- long runs: the out folder, checkpoints, signals, evaluation, image grids ----------------

# settings a resumed run may change: none of them alters the trajectory of training
RESUMABLE = {"epochs", "resume", "save_every", "eval_every", "image_every", "eval_prompt_file", "eval_steps",
             "max_nfe"}


def prepare_out(args: Args) -> Path:
    """Refuse an --out that holds another run, or this run without --resume; then write config.json."""
    out, config = Path(args.out), asdict(args)
    saved = out / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        changed = sorted(k for k in (config.keys() | old.keys()) - RESUMABLE if config.get(k) != old.get(k))
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {config.get(k)!r}" for k in changed[:3])
            raise SystemExit(f"error: --out {args.out} holds a run with another configuration ({diffs}); "
                             f"choose another --out or remove it")
        if not args.resume:
            raise SystemExit(f"error: --out {args.out} already holds this run; pass --resume to continue it or "
                             f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config, indent=1))
    return out


def save_checkpoint(out: Path, transformer, optimizer, gen: torch.Generator, state: dict):
    """Write checkpoints/epoch_N atomically (a temporary folder renamed when complete), then drop older ones."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final, tmp = root / f"epoch_{state['epoch']:06d}", root / f"epoch_{state['epoch']:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(get_peft_model_state_dict(transformer), tmp / "lora.safetensors")
    rng = dict(gen=gen.get_state(), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    torch.save(dict(optimizer=optimizer.state_dict(), rng=rng), tmp / "optimizer_rng.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, transformer, optimizer, gen: torch.Generator) -> dict | None:
    """Restore the last complete checkpoint (an interrupted one, still .tmp, is ignored); None if there is none."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    done = sorted(p for p in (out / "checkpoints").glob("epoch_*") if p.suffix != ".tmp")
    if not done:
        return None
    set_peft_model_state_dict(transformer, load_file(done[-1] / "lora.safetensors"))
    saved = torch.load(done[-1] / "optimizer_rng.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    gen.set_state(saved["rng"]["gen"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return json.loads((done[-1] / "state.json").read_text())


class StopOnSignal:
    """SIGINT or SIGTERM asks the loop to finish the current epoch, save a checkpoint and exit; a second one stops
    at once."""
    def __init__(self):
        self.signum = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this epoch, then saving a checkpoint (again to abort)")


@torch.no_grad()
def evaluate(pipe, prompts: list[str], reward_fn, args: Args, grid: Path) -> dict:
    """Mean rewards of one ODE sample (--eval-steps) per prompt from noise fixed by --seed, so that evaluations
    of one run, and of runs with one seed, are comparable; the samples go to a PNG grid."""
    generator = torch.Generator(pipe.transformer.device).manual_seed(args.seed)
    images = ode_images(pipe, prompts, args.eval_steps, args.guidance, args.resolution, generator, args.max_batch)
    scores = reward_fn(images, prompts)
    save_grid(images, [f"{p} | {r:.3g}" for p, r in zip(prompts, scores["reward"].tolist())], grid)
    return {f"eval_{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.items()}


def save_grid(images: Tensor, captions: list[str], path: Path, columns: int = 8, side: int = 192):
    """A PNG of images [N, 3, H, W] in [0, 1], each over its caption."""
    from PIL import Image, ImageDraw

    rows = math.ceil(len(images) / columns)
    text_height = 36
    grid = Image.new("RGB", (columns * side, rows * (side + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for n, (image, caption) in enumerate(zip(to_pil(images), captions)):
        x, y = n % columns * side, n // columns * (side + text_height)
        grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=side // 6)[:3]
        draw.multiline_text((x + 2, y + side + 1), "\n".join(lines), fill="black", spacing=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def save_samples(images: Tensor, captions: list[str], path: Path, most: int = 32):
    """A grid of at most `most` of an epoch's samples, evenly spread over the epoch's order."""
    pick = torch.linspace(0, len(images) - 1, min(most, len(images))).long().tolist()
    save_grid(images[pick], [captions[j] for j in pick], path)


# ---------------- the tiny pipeline: real diffusers/transformers classes, tiny configs, no network ----------------

TINY_WORDS = ("a an the of on in at and with one two three four five red green blue yellow orange purple pink "
              "cyan white black gray brown circle circles square squares triangle triangles ball balls left "
              "right top bottom middle center picture photo").split()
TINY_TOKENS = 16  # prompt tokens per text encoder; captions of the tiny world are at most 8 words
TINY_WORLD = Path(__file__).parent / "tiny_world" / "pipeline"


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


# =====================================================================================================
# The training loop: rollout -> rewards -> advantages -> optimizer steps -> log
# =====================================================================================================


class Batch(NamedTuple):
    """One epoch's training transitions, after the rewards and advantages are known. K transitions."""
    x: Tensor          # [K, C, H, W]
    y: Tensor          # [K, C, H, W]
    log_prob: Tensor   # [K]
    step: Tensor       # [K]
    prompt: Tensor     # [K] row of the epoch's PromptEmbeds
    advantage: Tensor  # [K]


def collect(pipe, args: Args, prompt_list: list[str], reward_fn, sigmas: Tensor, branch_steps: list[int],
            gen: torch.Generator) -> tuple[Batch, PromptEmbeds, dict, tuple]:
    """Sample an epoch (SPEC 3 or 7), score its images and turn rewards into advantages (SPEC 4). Also returns
    the images [M, 3, H, W] with captions, for the image grids."""
    picks = torch.randint(len(prompt_list), (args.prompts_per_epoch,), generator=gen, device=gen.device).tolist()
    prompts = [prompt_list[j] for j in picks]
    embeds = encode_prompts(pipe, prompts)
    per_prompt = args.seeds_per_prompt * (1 if args.rollout == "branch" else args.branches)
    noise_prompt = torch.arange(len(prompts), device=gen.device).repeat_interleave(per_prompt)  # [N]
    noise = initial_noise(pipe, len(noise_prompt), args.resolution, gen)  # [N, C, H, W]
    with autocast(gen.device):
        out = rollout(pipe.transformer, noise, embeds.take(noise_prompt), sigmas, branch_steps,
                      args.branches if args.rollout == "branch" else 0, args.noise_level, args.guidance,
                      args.max_batch, gen)
        images = torch.cat([decode_latents(pipe, z) for z in out.latents.split(args.max_batch)])  # [M, 3, H, W]
    image_prompt = noise_prompt[out.image_noise]  # [M]
    captions = [prompts[p] for p in image_prompt.tolist()]
    scores = reward_fn(images, captions)
    # seed groups share (prompt, initial noise, k); prompt groups share (prompt, k)
    seed = out.image_noise if args.group == "seed" else torch.zeros_like(out.image_noise)
    keys = torch.stack([image_prompt, seed, out.image_step], dim=1).cpu()
    groups = torch.unique(keys, dim=0, return_inverse=True)[1]  # [M]
    advantages, zero_std = group_advantages(scores["reward"], groups, args.adv_clip)
    valid = torch.isfinite(scores["reward"])
    keep = (valid & ~zero_std)[out.image.cpu()].to(out.x.device)  # train on transitions with a signal
    batch = Batch(out.x[keep], out.y[keep], out.log_prob[keep], out.step[keep], image_prompt[out.image][keep],
                  advantages.to(out.x.device)[out.image][keep])
    rewards = scores["reward"][valid]
    metrics = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
                   images=len(images), invalid=int((~valid).sum()), transitions=len(batch.x),
                   zero_std_frac=groups[zero_std].unique().numel() / groups.unique().numel())
    metrics.update({f"reward_{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.items() if k != "reward"})
    captions = [f"{c} | {r:.3g}" for c, r in zip(captions, scores["reward"].tolist())]
    return batch, embeds, metrics, (images.cpu(), captions)  # the images wait for their grid off the GPU


def transition_loss(transformer, batch: Batch, rows: Tensor, embeds: PromptEmbeds, sigmas: Tensor,
                    step_weight: Tensor, args: Args) -> tuple[Tensor, dict]:
    """grpo_loss of some transitions: the policy's log-prob of the recorded y with gradients, the base model's
    mean without (skipped when beta = 0)."""
    x, y, k = batch.x[rows], batch.y[rows], batch.step[rows]
    prompts, sigma = embeds.take(batch.prompt[rows]), sigmas.to(x.device)[k]
    with autocast(x.device):
        v = cfg_velocity(transformer, x, sigma, prompts, args.guidance)
    _, log_prob, mean, std = sde_step(x, v, sigmas, k, args.noise_level, prev_sample=y)
    ref_mean = mean.detach()
    if args.beta > 0:
        with torch.no_grad(), lora_disabled(transformer), autocast(x.device):
            v_ref = cfg_velocity(transformer, x, sigma, prompts, args.guidance)
        ref_mean = sde_step(x, v_ref, sigmas, k, args.noise_level, prev_sample=y)[2]
    return grpo_loss(log_prob, batch.log_prob[rows], batch.advantage[rows], step_weight.to(x.device)[k], mean,
                     ref_mean, std, args.clip_range, args.beta)


def update(transformer, params, optimizer, batch: Batch, embeds: PromptEmbeds, sigmas: Tensor,
           step_weight: Tensor, args: Args, gen: torch.Generator) -> dict:
    """--optimizer-steps AdamW steps over a shuffled epoch, each accumulating gradients over micro-batches of at
    most --max-batch latents, so that its loss is the mean over its transitions. A step whose loss or gradient is
    not finite is skipped, counted and warned about: it never reaches the weights."""
    per_call = max(1, args.max_batch // cfg_copies(args.guidance))
    order = torch.randperm(len(batch.x), generator=gen, device=gen.device).to(batch.x.device)
    totals = dict(skipped_updates=0)
    bar = tqdm(total=len(order), desc="train", leave=False, disable=None)
    for part in order.tensor_split(args.optimizer_steps):
        if not len(part):
            continue  # every group of the epoch had equal rewards: nothing to learn from
        finite = True
        for rows in part.split(per_call):
            loss, stats = transition_loss(transformer, batch, rows, embeds, sigmas, step_weight, args)
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                (loss * len(rows) / len(part)).backward()
            for key, value in dict(stats, loss=loss.detach()).items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(rows) / len(order)
            bar.update(len(rows))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
        else:
            totals["skipped_updates"] += 1
            tqdm.write(f"warning: skipped an update with a non-finite {'loss' if not finite else 'gradient'}")
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] = grad_norm.item()
    bar.close()
    return totals


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the step math casts back to float32); nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def setup(args: Args, device: torch.device) -> tuple:
    """The pipeline, frozen but for a fresh LoRA on its transformer, and the AdamW over that LoRA."""
    pipe = load_pipeline(args.model, torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False)
    torch.manual_seed(args.seed)  # LoRA's initial A
    params = add_lora(pipe.transformer, args.lora_rank)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    return pipe, params, optimizer


def train(args: Args) -> list[dict]:
    """The whole run, resumable; returns the metrics rows of the epochs it ran."""
    prompt_list = read_prompts(args.prompt_file)
    eval_prompts = read_prompts(args.eval_prompt_file, "--eval-prompt-file") if args.eval_prompt_file else []
    out, device = prepare_out(args), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward_fn = load_reward(args.reward, device)
    pipe, params, optimizer = setup(args, device)
    sigmas = sigma_grid(pipe.scheduler, args.steps).to(device)
    branch_steps = parse_branch_steps(args.branch_steps, args.steps)
    step_weight = torch.ones(args.steps)  # w_k by grid index k
    if args.weighting == "noise":
        step_weight[branch_steps] = noise_aware_weights(sigmas.cpu(), args.noise_level, branch_steps)
    gen = torch.Generator(device).manual_seed(args.seed)
    state = load_checkpoint(out, pipe.transformer, optimizer, gen) if args.resume else None
    state = state or dict(epoch=0, metrics_rows=0, nfe=0, wall_s=0.0)
    keep_metrics_rows(out / "metrics.jsonl", state["metrics_rows"])  # drop rows of epochs after the checkpoint
    cost, stop, rows, base = Cost(pipe.transformer, state["nfe"], state["wall_s"]), StopOnSignal(), [], {}
    if eval_prompts and state["epoch"] == 0:  # the base model, for the first row
        with cost.paused():
            scores = evaluate(pipe, eval_prompts, reward_fn, args, out / "images" / "eval_base.png")
        base = {"base_" + k: v for k, v in scores.items()}
    done = 0 < args.max_nfe <= state["nfe"]  # a resumed run that had already spent its --max-nfe
    bar = tqdm(range(state["epoch"], args.epochs if not done else state["epoch"]), desc="epochs",
               initial=state["epoch"], total=args.epochs)
    for epoch in bar:
        try:
            batch, embeds, metrics, samples = collect(pipe, args, prompt_list, reward_fn, sigmas, branch_steps, gen)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            metrics.update(update(pipe.transformer, params, optimizer, batch, embeds, sigmas, step_weight, args, gen))
            last = epoch + 1 == args.epochs or 0 < args.max_nfe <= cost.nfe
            if eval_prompts and ((epoch + 1) % args.eval_every == 0 or last):
                with cost.paused():
                    grid = out / "images" / f"eval_{epoch:06d}.png"
                    metrics.update(evaluate(pipe, eval_prompts, reward_fn, args, grid))
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"error: CUDA out of memory in epoch {epoch}: lower --max-batch (now {args.max_batch}) "
                             f"or add --gradient-checkpointing") from None
        if (epoch + 1) % args.image_every == 0 or last:
            save_samples(*samples, out / "images" / f"{epoch:06d}.png")
        rows.append(dict(epoch=epoch, **metrics, **(base if epoch == 0 else {}), nfe=cost.nfe, wall_s=cost.wall_s()))
        log(rows[-1], out / "metrics.jsonl")
        if (epoch + 1) % args.save_every == 0 or last or stop.signum:
            save_checkpoint(out, pipe.transformer, optimizer, gen, dict(
                epoch=epoch + 1, metrics_rows=state["metrics_rows"] + len(rows), nfe=cost.nfe, wall_s=cost.wall_s()))
        if stop.signum:
            raise SystemExit(128 + stop.signum)
        if last:
            break
    save_lora(pipe, out / "lora")
    return rows


def keep_metrics_rows(path: Path, n: int):
    """Truncate metrics.jsonl to its first n rows: those of the epochs a resumed run keeps."""
    lines = path.read_text().splitlines(keepends=True)[:n] if path.exists() else []
    path.write_text("".join(lines))


def log(row: dict, path: Path):
    """One fixed-format line per epoch, and the same numbers in metrics.jsonl."""
    evaluation = f" | base eval {row['base_eval_reward']:.3f}" if "base_eval_reward" in row else ""
    evaluation += f" | eval {row['eval_reward']:.3f}" if "eval_reward" in row else ""
    tqdm.write(f"epoch {row['epoch']} | reward {row['reward_mean']:.3f} +- {row['reward_std']:.3f}{evaluation} | "
               f"loss {row.get('loss', 0):.3g} | kl {row.get('kl', 0):.2e} | clipfrac {row.get('clipfrac', 0):.2f} | "
               f"zero-std {row['zero_std_frac']:.2f} | nfe {row['nfe']} | {row['wall_s']:.0f} s")
    sys.stdout.flush()
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


# =====================================================================================================
# Entry point: the command line is Args' fields
# =====================================================================================================

METHODS = {"tempflow": dict(rollout="branch", weighting="noise", group="seed"),
           "flow_grpo": dict(rollout="sde", weighting="uniform", group="prompt")}
TINY = dict(  # --tiny: the same loop on a CPU; README.md gives the measurements behind each departure
    model=str(TINY_WORLD), reward="geneval_toy", resolution=64, max_batch=512,
    eval_prompt_file=str(TINY_WORLD.parent / "prompts.txt"),
    beta=0.004,                      # SPEC 6's value for GenEval-style rewards
    lr=1e-3, clip_range=0.02,        # at 3e-4 and 1e-4 the tiny model does not move; at lr 3e-3 it collapses
    branches=4, seeds_per_prompt=2,  # G = 6, S = 4 cost 3x the time for about the same gain per epoch
    epochs=60)


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field, for --help."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == cls.__name__)
    return {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs, tiny = field_docs(Args), "--tiny" in (sys.argv[1:] if argv is None else argv)
    for f in fields(Args):
        default = TINY.get(f.name, f.default) if tiny else f.default
        help_text = docs[f.name] + (f" [--tiny: {TINY[f.name]}]" if f.name in TINY else "")
        kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(type=f.type)
        parser.add_argument("--" + f.name.replace("_", "-"), default=default, help=help_text, **kind)
    return finalize(Args(**vars(parser.parse_args(argv))))


def finalize(args: Args) -> Args:
    """Fill in the method's defaults and check every setting, each failure one line naming its flag, before any
    model loads."""
    check(not args.tiny or args.model != Args.model, "tiny=True without the tiny settings: use "
          "Args(**TINY, tiny=True, ...), as --tiny on the command line does")
    check(args.method in METHODS, f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for key, value in METHODS[args.method].items():
        setattr(args, key, getattr(args, key) or value)
    for flag, value, choices in (("rollout", args.rollout, "branch sde"), ("group", args.group, "seed prompt"),
                                 ("weighting", args.weighting, "noise uniform")):
        check(value in choices.split(), f"--{flag} {value!r} is unknown; choose one of {choices.replace(' ', ', ')}")
    read_prompts(args.prompt_file)
    if args.eval_prompt_file:
        read_prompts(args.eval_prompt_file, "--eval-prompt-file")
    check(args.steps >= 2, f"--steps {args.steps}: need at least 2 sampling steps")
    try:
        steps = parse_branch_steps(args.branch_steps, args.steps)
    except ValueError:
        raise SystemExit(f"error: --branch-steps {args.branch_steps!r} is not a list like 0,2,4 or a range like 0-8")
    check(steps and 0 <= steps[0] and steps[-1] <= args.steps - 2,
          f"--branch-steps {args.branch_steps!r}: steps must lie in 0..{args.steps - 2} (T - 2; the last step is "
          f"never trained)")
    check(args.group == "prompt" or args.rollout == "branch", "--group seed needs --rollout branch: the samples "
          "of an SDE rollout share no initial noise; use --group prompt")
    group = args.branches * (args.seeds_per_prompt if args.group == "prompt" else 1)
    check(args.branches >= 1 and group >= 2, f"--branches {args.branches} and --seeds-per-prompt "
          f"{args.seeds_per_prompt} make groups of {group}; advantages need at least 2 samples per group")
    check(args.noise_level > 0, f"--noise-level {args.noise_level}: must be positive (the SDE needs noise)")
    factor = resolution_factor(args.model)
    check(args.resolution > 0 and args.resolution % factor == 0,
          f"--resolution {args.resolution}: must be a positive multiple of {factor} (VAE factor x patch size)")
    for flag in ("epochs", "prompts_per_epoch", "seeds_per_prompt", "lora_rank", "optimizer_steps", "save_every",
                 "eval_every", "eval_steps", "image_every"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    check(args.max_batch >= 2, f"--max-batch {args.max_batch}: must be at least 2 (CFG's two halves)")
    check(args.lr > 0 and args.clip_range > 0 and args.beta >= 0, "--lr and --clip-range must be positive, --beta "
          "not negative")
    parse_spec(args.reward)
    return args


def check(condition, message: str):
    if not condition:
        raise SystemExit(f"error: {message}")


def resolution_factor(model: str) -> int:
    """VAE down-sampling x patch size, read from a local model's configs (SD3's 8 x 2 for a hub id)."""
    try:
        vae = json.loads((Path(model) / "vae" / "config.json").read_text())
        patch = json.loads((Path(model) / "transformer" / "config.json").read_text())["patch_size"]
        return 2 ** (len(vae["block_out_channels"]) - 1) * patch
    except (OSError, KeyError, ValueError):
        return 16


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    train(args)


if __name__ == "__main__":
    main()
