"""TempFlow-GRPO (arXiv 2508.04324): GRPO fine-tuning of a flow-matching text-to-image model (Stable Diffusion
3.5-medium) with trajectory branching and noise-aware weighting, and Flow-GRPO and BranchGRPO behind a flag.

    python tempflow_grpo.py --tiny --prompt-file tiny_world/prompts.txt --out runs/tiny   # CPU, minutes
    python tempflow_grpo.py --prompt-file prompts.txt --out runs/sd35m                    # one GPU, SD3.5-M + PickScore
    torchrun --nproc_per_node 8 tempflow_grpo.py --prompt-file prompts.txt ...           # the epoch over 8 GPUs
    python tempflow_grpo.py --method flow_grpo ...                                       # the baseline

An epoch: sample P prompts; for each, S initial noises; integrate an ODE trunk from each noise and, at every
branch step k, draw G SDE branches from the trunk state x_k, each finished by the ODE (TempFlow-GRPO, "Trajectory
Branching"). The reward of a branch's image is the process reward of step k, so advantages are normalised over the
G branches of one (prompt, seed, k). The clipped GRPO loss (Flow-GRPO, arXiv 2505.05470, Eq. 5) on each recorded
transition x_k -> y is weighted by w_k, the SDE std of step k over its mean ("Noise-Aware Policy Weighting"), plus
beta times the exact KL to the base model (LoRA switched off). README.md, "The method, formula by formula", states
each formula with its source; comments cite its items as (method n).

Notation (code -> paper):
    sigmas[i]         s_i, noise level of grid index i; s_0 = 1 (noise) > ... > s_T = 0 (image)
    dt                dt_i = s_{i+1} - s_i < 0
    noise_level       a, SDE noise level; sigma_i = a sqrt(s_i / (1 - s_i))
    std               std_i = sigma_i sqrt(-dt_i), std of one SDE transition (CPS's: s_{i+1} sin(a pi / 2))
    guidance          g, classifier-free guidance: v = v_u + g (v_c - v_u)
    steps             T, sampling steps
    branch_steps      B, the branched and trained steps k
    branches          G, SDE branches per (prompt, seed, k)
    finish_steps      F, most ODE steps that finish a branch (0: all that are left)
    split_steps       BranchGRPO's split steps, at each of which a tree's node forks split_factor = f children
    seeds_per_prompt  S, initial noises per prompt
    step_weight[k]    w_k, noise-aware weight
    clip_range, beta  eps and beta of the loss

Shape letters: N initial noises (trunks), M final images, K recorded transitions, C, H, W a latent's channels,
height and width, P prompts, L prompt tokens, D embedding width.

Deliberate departures from the paper or the official code (each a flag where it is a choice):
  1. log pi is averaged, not summed, over the latent's C*H*W elements (the official convention; method 2).
  2. w_k is computed from the grid; one public script multiplies std_k by a hard-coded 2.25 instead (about 1 / the
     mean std of the reference grid, 0.1% off; method 5).
  3. A trunk stops after the last branch step, as the method's cost counts it (max(B) + 1 trunk evaluations).
  4. A sample with a non-finite reward, image, y or old log-prob is left out of its group and counted as invalid
     (the official code has no such case; not_finite); zero advantages follow the official rule (method 6,
     `trained_images`).
  5. The Flow-GRPO rollout takes the SDE at the trained steps (all but the last) and the ODE at the last.
  6. Latents are float32 throughout; a bf16 pipeline (CUDA's) runs under bf16 autocast, the step math in float32.
  7. Rewards enter the advantages as they are; the official code divides PickScore by 26 first, which only the
     1e-4 in the std's denominator notices (it weighs 26x more against the spread there).
  8. The reference epoch's 48 prompts are accumulated on one GPU, or split over torchrun's processes, where the
     official run used 48 GPUs; drawn as its sampler draws them (drawn_prompts), the update they make is the same.
  9. --sampler cps scores a transition by its Gaussian density, as the SDE does; Flow-GRPO's cps code drops the
     1 / (2 std_k^2) and -log std_k, so its log-ratios are 2 std_k^2 times these (sde_step).
 10. The KL divides by 2 std_k^2 under every method, as TempFlow-GRPO's code and Flow-GRPO's before July 2025 do;
     Flow-GRPO's current code divides by 2 sigma_k^2 (no sqrt(-dt_k)), a KL -dt_k times this one (1/25 at k = 0 to
     1/3.7 at k = 8 on the reference grid), so the same beta regularises less there.
 11. --method branch_grpo (arXiv 2509.06040) fuses rewards by the plain mean of a node's leaves (the paper may
     weight them by path probability), takes the ODE at the last step as Flow-GRPO here does, and trains every
     node's transition unless --prune-width or --prune-depth says otherwise.
 12. --tiny changes the model, reward, resolution and the optimisation settings listed in TINY below, each
     chosen by a measurement given there and in bench/README.md.
"""
import copy
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from reward import RewardServerError, check_rewards, first_line, load_reward, parse_spec, required_models, to_pil


# =====================================================================================================
# Configuration: every setting, its default (the papers' reference recipe where it has one) and its meaning.
# tyro makes the command line from these fields; their docstrings are its --help.
# =====================================================================================================


@dataclass
class Args:
    # ---- what to run
    prompt_file: str = ""
    """training prompts, one per line (required)"""
    out: str = "runs/tempflow"
    """output folder: config.json, metrics.jsonl, checkpoints/, the final LoRA in lora/"""
    tiny: bool = False
    """the CPU demo: the tiny world (tiny_world/pipeline), geneval_toy, 64 px and TINY's settings as defaults,
    which `--tiny --help` shows (from Python: Args(**TINY, tiny=True, ...))"""
    model: str = "stabilityai/stable-diffusion-3.5-medium"
    """diffusers StableDiffusion3Pipeline: a hub id or a local folder"""
    reward: str = "pickscore"
    """reward spec: name[:weight],... or path/to/file.py:function or http://host:port/path, a reward server; see
    reward.py"""
    reward_wait: float = 300.0
    """seconds a reward server may take to answer, retries of one that does not included; then the run saves its
    last complete epoch and stops, for --resume"""
    seed: int = 0
    """seed of prompt order, initial noise and SDE noise"""
    epochs: int = 1000
    """epochs, each a rollout then --optimizer-steps updates (paper: 1000 for PickScore)"""

    # ---- method: --method sets the next three; each can be overridden alone for the paper's ablations
    method: str = "tempflow"
    """tempflow (branch, noise, seed, group std), flow_grpo (sde, uniform, prompt, global std) or BranchGRPO's
    branch_grpo (tree, uniform, seed: a group is one depth of one tree, group std; arXiv 2509.06040)"""
    rollout: str = ""
    """branch: ODE trunk with G SDE branches per branch step (method 3); sde: SDE at every branch step (method 7);
    tree: sde whose rows fork at the --split-steps, BranchGRPO's tree; empty: --method's"""
    weighting: str = ""
    """noise: w_k = std_k / mean_j std_j (method 5); uniform: w_k = 1; empty: --method's"""
    group: str = ""
    """seed: advantages over the G branches of one (prompt, seed, k); prompt: over all S*G samples of (prompt, k);
    empty: --method's"""
    adv_std: str = ""
    """group: A divides by each group's std (TempFlow); global: by the std of all the epoch's rewards, the mean
    still per group (Flow-GRPO's SD3 configs, method 7); empty: --method's"""

    # ---- sampling
    steps: int = 10
    """T, sampling steps of the rollout (paper: 10)"""
    shift: float = 0.0
    """the sigma grid's time shift in rollout and training (0: the model scheduler's own, 3 for SD3.5); evaluation
    keeps the model's, so that runs with other shifts are measured alike"""
    branch_steps: str = ""
    """B, the trained steps: comma list or range like 0-8 (default: all 0..T-2; the last step is never trained)"""
    branches: int = 6
    """G, SDE branches per (prompt, seed, branch step) (paper: 6); --rollout sde draws S*G samples per prompt"""
    seeds_per_prompt: int = 4
    """S, initial noises per prompt (paper: 4); Flow-GRPO's group is S*G = 24 samples"""
    prompts_per_epoch: int = 48
    """P, prompts per epoch (paper: 48, one per GPU of the official run; accumulated here): an epoch samples
    P*S*|B|*G branch images (branch) or P*S*G images (sde)"""
    prompt_draw: str = "shared"
    """shared: an epoch's prompts are the start of one permutation of the file, split among torchrun's processes
    (the official draw: distinct while the file has P); independent: each process draws with replacement (the draw
    of runs begun before this setting, which resume with it)"""
    noise_level: float = 0.7
    """a, the noise level of the stochastic steps (paper: 0.7; with --sampler cps it must lie in (0, 1])"""
    sampler: str = "sde"
    """the stochastic step of rollout and training: sde, Flow-GRPO's reverse SDE (the paper's); cps,
    coefficients-preserving sampling (arXiv 2509.05952; bench/README.md, study 6): std_k = s_{k+1}
    sin(a pi / 2) with a in (0, 1]; the log-probs, the KL and the noise-aware weights follow it"""
    finish_steps: int = 0
    """F: each branch is finished by at most F ODE steps over its remaining grid, ending at s = 0 (0: every step
    left, the paper's); cheaper branches, the same trained steps (--rollout branch only)"""
    split_steps: str = ""
    """BranchGRPO: the steps (list or range, among the branch steps) at which each node forks --split-factor SDE
    children (--rollout tree; its default 0,2,4,6)"""
    split_factor: int = 2
    """BranchGRPO: children per node at a split step (paper: 2)"""
    prune_width: int = 0
    """BranchGRPO's width pruning: train only the paths to the N best and N worst leaves of each tree (0: all)"""
    prune_depth: str = ""
    """BranchGRPO's depth pruning: steps (list or range) whose transitions are sampled but not trained"""
    guidance: float = 4.5
    """g, classifier-free guidance in rollout and training (paper: 4.5)"""
    resolution: int = 512
    """image side in pixels (paper: 512)"""

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
    ema: bool = True
    """evaluate and export an EMA of the LoRA weights, updated every 8th optimizer step (paper: on); training and
    the ratio use the live weights"""
    drop_zero_std: bool = False
    """drop every group whose rewards are all equal, not only trunks with no signal at all (the official rule)"""

    # ---- memory levers: where and how much sits on the GPU at once
    max_batch: int = 32
    """most latents in one no-grad transformer call (rollout, evaluation) and one VAE decode, CFG's halves counted"""
    train_batch: int = 8
    """most latents in one training forward and backward, CFG's halves counted; gradients accumulate over them,
    and 8 fits an 80 GB card (37.6 GiB measured on an H200, bench/README.md)"""
    rollout_prompts: int = 4
    """prompts sampled, decoded and scored together: GPU memory grows with this, not with --prompts-per-epoch"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in backward: less memory, about a third more time"""
    offload_text_encoders: bool = False
    """keep the text encoders on the CPU except while they encode prompts (T5-XXL alone is 9.4 GB in bf16)"""
    offload_reward: bool = False
    """keep the reward model on the CPU except while it scores"""
    reward_dtype: str = "float32"
    """dtype of a model-based reward (pickscore, clipscore): float32 or bfloat16 (half its memory)"""
    compile: str = "auto"
    """on: torch.compile the transformer's blocks, which the rollout, evaluation, training and the KL's reference
    all run; every call is padded to --max-batch or --train-batch latents, so that all compiling happens once, at
    the start (its seconds apart from the epochs'). off: eager. auto: on where the transformer is on CUDA"""

    # ---- long runs: checkpoints, evaluation, images
    resume: bool = False
    """continue the run in --out from its last complete checkpoint, up to --epochs; it may change the bookkeeping
    and the memory levers, nothing that training computes (README.md, "What a resume may change")"""
    save_every: int = 1
    """epochs between checkpoints in --out/checkpoints (also written on SIGINT/SIGTERM and at the end)"""
    eval_prompt_file: str = ""
    """evaluation prompts, one image each from fixed noise with the ODE; empty: no evaluation"""
    eval_reward: str = ""
    """reward spec of evaluation, when it should differ from training's (reward hacking shows as a gap); if
    empty, that of --reward"""
    eval_every: int = 10
    """epochs between evaluations (and after the last epoch)"""
    eval_steps: int = 40
    """ODE steps of evaluation (paper: 40)"""
    image_every: int = 10
    """epochs between PNG grids of the epoch's samples, with their prompts and rewards, in --out/images"""
    max_nfe: int = 0
    """stop once this many latents went through the transformer, for compute-matched comparisons (0: no limit)"""
    wandb: str = ""
    """Weights & Biases project to log metrics, config and image grids to (empty: none; needs `pip install wandb`;
    WANDB_MODE=offline needs no login or network)"""


# =====================================================================================================
# Flow-matching math (method 1-2). Pure functions of tensors: torch only, float32 inside.
# =====================================================================================================


def sigma_grid(scheduler, steps: int, shift: float = 0.0) -> Tensor:
    """The T-step grid s_0 = 1 > s_1 > ... > s_T = 0, as the pipeline's FlowMatchEulerDiscreteScheduler makes it
    (with its own shift, or with `shift` where that is positive)."""
    # set_timesteps mutates the scheduler; the pipeline's own stays untouched
    scheduler = type(scheduler).from_config(scheduler.config, shift=shift) if shift else copy.deepcopy(scheduler)
    if scheduler.config.get("use_dynamic_shifting", False):
        raise ValueError("schedulers with use_dynamic_shifting need a resolution-dependent mu; SD3.5 has none")
    scheduler.set_timesteps(steps)
    return scheduler.sigmas  # [T + 1], float32


def transition_std(sigmas: Tensor, i: Tensor, noise_level: float, sampler: str = "sde") -> tuple[Tensor, Tensor]:
    """sigma_i and std_i of one stochastic step from s_i to s_{i+1}, for grid indices i (any shape): the reverse
    SDE's diffusion coefficient and the std of its Euler-Maruyama step, or CPS's std (and sigma_i None)."""
    if sampler == "cps":
        # std_i = s_{i+1} sin(a pi / 2)
        return None, sigmas[i + 1] * math.sin(noise_level * math.pi / 2)
    s = sigmas[i]
    # sigma_i = a sqrt(s_i / (1 - s_i)) (Flow-GRPO, after Eq. 9); at s_i = 1 the denominator uses s_1, to stay finite
    sigma = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, sigmas[1], s)))
    # std_i = sigma_i sqrt(-dt_i), where -dt_i = s_i - s_{i+1} > 0
    return sigma, sigma * torch.sqrt(s - sigmas[i + 1])


def sde_step(x: Tensor, v: Tensor, sigmas: Tensor, i, noise_level: float, prev_sample: Tensor | None = None,
             generator: torch.Generator | None = None, sampler: str = "sde") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step from s_i to s_{i+1}, and the policy's log-density of its result.

    sampler "sde": Flow-GRPO's reverse SDE (Euler-Maruyama), the paper's. "cps": coefficients-preserving sampling
    (arXiv 2509.05952), a DDIM-like step whose noise coefficients add in quadrature to s_{i+1}, so that exact
    predictions land on the flow's marginal; its std is 0 at the last step (s_T = 0), which is the ODE's.
    x, v: [B, C, H, W] latent and velocity (any float dtype; the math runs in float32). i: int or LongTensor[B],
    so a batch may mix grid indices. With prev_sample given, that sample is only scored.
    Returns prev_sample [B, C, H, W], log_prob [B] (averaged over C*H*W), mean [B, C, H, W], std [B].
    Departure: Flow-GRPO's cps code drops the Gaussian's 1 / (2 std_i^2) and -log std_i, so its log-ratios are
    2 std_i^2 times these and its clip range means another thing at every step; here both samplers use the density.
    """
    x, v, sigmas = x.float(), v.float(), sigmas.to(x.device, torch.float32)
    i = torch.as_tensor(i, dtype=torch.long, device=x.device).expand(len(x))  # [B]
    sigma, std = (t if t is None else t.view(-1, 1, 1, 1) for t in transition_std(sigmas, i, noise_level, sampler))
    s = sigmas[i].view(-1, 1, 1, 1)  # [B, 1, 1, 1], to broadcast over a latent
    # dt_i = s_{i+1} - s_i < 0: sampling runs from noise (s = 1) to image (s = 0)
    dt = sigmas[i + 1].view(-1, 1, 1, 1) - s
    if sampler == "cps":
        # mean_i = (1 - s_{i+1}) x0_hat + sqrt(s_{i+1}^2 - std_i^2) x1_hat (CPS), with x0_hat = x_i - s_i v the
        # predicted image and x1_hat = x_i + (1 - s_i) v the predicted noise; the square root is s_{i+1} cos(a pi / 2)
        mean = (1 - s - dt) * (x - s * v) + (s + dt) * math.cos(noise_level * math.pi / 2) * (x + (1 - s) * v)
    else:
        # mean_i = x_i + [v + sigma_i^2 / (2 s_i) (x_i + (1 - s_i) v)] dt_i   (drift + score term; Flow-GRPO Eq. 9)
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


def ode_step(x: Tensor, v: Tensor, sigmas: Tensor, i, j=None) -> Tensor:
    """One Euler step of the probability-flow ODE from s_i to s_j, j = i + 1 unless given (a coarse branch finish
    jumps further); i and j are ints or LongTensor[B]."""
    x, v, sigmas = x.float(), v.float(), sigmas.to(x.device, torch.float32)
    i = torch.as_tensor(i, dtype=torch.long, device=x.device).expand(len(x))
    j = i + 1 if j is None else torch.as_tensor(j, dtype=torch.long, device=x.device).expand(len(x))
    # x_j = x_i + (s_j - s_i) v
    return x + (sigmas[j] - sigmas[i]).view(-1, 1, 1, 1) * v


class PromptEmbeds(NamedTuple):
    """The pipeline's encode_prompt output for P prompts; CFG needs the empty prompt's embeddings too."""
    embeds: Tensor      # [P, L, D]  CLIP-L, CLIP-G and T5 tokens
    pooled: Tensor      # [P, D_pooled]
    neg_embeds: Tensor  # [P, L, D]  the empty prompt
    neg_pooled: Tensor  # [P, D_pooled]

    def take(self, rows: Tensor) -> "PromptEmbeds":
        return PromptEmbeds(*(t[rows] for t in self))

    def to(self, device) -> "PromptEmbeds":
        return PromptEmbeds(*(t.to(device) for t in self))


def cfg_copies(guidance: float) -> int:
    """Latents the transformer sees per row: the empty prompt's and the prompt's under CFG (guidance > 1, as in
    the pipeline), the prompt's alone otherwise."""
    return 2 if guidance > 1 else 1


def rows_per_call(latents: int, guidance: float) -> int:
    """Rows (initial noises or transitions) in one transformer call of at most `latents` latents."""
    return max(1, latents // cfg_copies(guidance))


def cfg_velocity(transformer, x: Tensor, sigma: Tensor, prompts: PromptEmbeds, guidance: float, pad_to: int = 0
                 ) -> Tensor:
    """The policy's velocity with classifier-free guidance for latents x [N, C, H, W] at noise levels sigma [N];
    prompts holds N rows. One transformer call of cfg_copies(guidance) * max(N, pad_to) latents: with pad_to, the
    last row is repeated up to pad_to rows (a compiled transformer's one shape) and their velocities dropped."""
    n, copies = len(x), cfg_copies(guidance)
    if n < pad_to:
        pad = torch.arange(pad_to, device=x.device).clamp(max=n - 1)
        x, sigma, prompts = x[pad], sigma[pad], prompts.take(pad)
    # the empty prompt first, as in the pipeline ([-copies:] keeps the prompt alone without CFG);
    # the transformer's timestep is 1000 t (method 1)
    v = transformer(hidden_states=x.repeat(copies, 1, 1, 1).to(transformer.dtype),
                    encoder_hidden_states=torch.cat([prompts.neg_embeds, prompts.embeds][-copies:]),
                    pooled_projections=torch.cat([prompts.neg_pooled, prompts.pooled][-copies:]),
                    timestep=1000 * sigma.repeat(copies), return_dict=False)[0]
    if copies == 1:
        return v[:n]
    v_uncond, v_cond = v.chunk(2)
    # v = v_u + g (v_c - v_u)
    return (v_uncond + guidance * (v_cond - v_uncond))[:n]


# =====================================================================================================
# TempFlow pieces (method 3, 5): which steps branch and train, and how much each weighs
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


def noise_aware_weights(sigmas: Tensor, noise_level: float, steps, sampler: str = "sde") -> Tensor:
    """w_k for the trained steps k: proportional to the sampler's std of step k, mean exactly 1 over the steps."""
    std = transition_std(sigmas.double(), torch.as_tensor(steps, dtype=torch.long), noise_level, sampler)[1]
    # w_k = std_k / mean_{j in B} std_j   (TempFlow-GRPO's noise-aware weighting; a cancels, the grid decides)
    return (std / std.mean()).float()  # [len(steps)]


def finish_grid(k: int, steps: int, finish_steps: int = 0) -> list[int]:
    """The grid indices a branch born at step k visits on its way to s_T = 0: all of k+1..T, or with finish_steps
    F below the T - 1 - k steps left, F + 1 of them spread evenly over k+1..T (both ends kept, rounded)."""
    if not finish_steps or finish_steps >= steps - 1 - k:
        return list(range(k + 1, steps + 1))
    return torch.linspace(k + 1, steps, finish_steps + 1).round().long().tolist()


def finish_hops(steps: int, branch_steps: list[int], finish_steps: int = 0) -> Tensor:
    """hop[k, i]: the grid index to which a branch born at step k steps from s_i on its finish_grid; 0 off its path.
    LongTensor [T, T + 1]."""
    hop = torch.zeros(steps, steps + 1, dtype=torch.long)
    for k in branch_steps:
        path = finish_grid(k, steps, finish_steps)
        hop[k, path[:-1]] = torch.tensor(path[1:])
    return hop


# =====================================================================================================
# Rollouts (method 3, 7, 8): one wavefront loop for the three methods
# =====================================================================================================


def sd3_velocity(transformer, prompts: PromptEmbeds, guidance: float, max_batch: int = 1 << 30, pad: bool = False):
    """SD3's velocity_fn for rollout() and ode_rollout(): fn(x [n, C, H, W], sigma [n], rows [n]) -> v, the
    cfg_velocity of latent j under prompt rows[j], in chunks of at most max_batch latents per transformer call
    (with pad, each of exactly max_batch: a compiled transformer's one shape); each chunk gathers its own prompt
    rows (SD3.5's are 1.7 MB each in bf16). Another model's velocity with the same signature serves the rollouts
    unchanged."""
    per_call = rows_per_call(max_batch, guidance)

    def velocity_fn(x: Tensor, sigma: Tensor, rows: Tensor) -> Tensor:
        return torch.cat([cfg_velocity(transformer, x[j:j + per_call], sigma[j:j + per_call],
                                       prompts.take(rows[j:j + per_call]), guidance, per_call if pad else 0)
                          for j in range(0, len(x), per_call)])
    return velocity_fn


def ode_rollout(velocity_fn, x: Tensor, sigmas: Tensor, start: int = 0) -> Tensor:
    """Integrate the ODE from grid index start down to s_T = 0. x: [N, C, H, W], latent n under row n."""
    for i in range(start, len(sigmas) - 1):
        v = velocity_fn(x, sigmas[i].expand(len(x)).to(x.device), torch.arange(len(x), device=x.device))
        x = ode_step(x, v, sigmas, i)
    return x


class Rollout(NamedTuple):
    """What a rollout leaves for training. M final images, K recorded SDE transitions."""
    latents: Tensor       # [M, C, H, W] final latents at s_T = 0
    image_noise: Tensor   # [M] the initial noise each image grew from (its index in rollout's `noise`)
    image_step: Tensor    # [M] the branch step k that made it, -1 for an SDE rollout's images
    x: Tensor             # [K, C, H, W] x_k, the state the transition left
    y: Tensor             # [K, C, H, W] x_{k+1}, the SDE sample it reached
    log_prob: Tensor      # [K] log pi_old(y | x_k)
    step: Tensor          # [K] k
    image: Tensor         # [K] the image whose reward scores the transition (the first of `span`)
    span: Tensor          # [K] how many images from `image` on score it, by their mean: a BranchGRPO node's leaves


@torch.no_grad()
def rollout(velocity_fn, noise: Tensor, sigmas: Tensor, kind: str, branch_steps: list[int], noise_level: float,
            generator: torch.Generator, branches: int = 6, sampler: str = "sde", finish_steps: int = 0,
            split_steps: list[int] = (), split_factor: int = 2) -> Rollout:
    """Sample from N initial noises [N, C, H, W], recording every stochastic transition. velocity_fn(x, sigma,
    rows) -> v is the model's velocity of latents x [n, C, H, W] at noise levels sigma [n], latent j conditioned
    as initial noise rows[j] is (sd3_velocity for SD3: its prompt, with CFG).
    kind "branch", TempFlow-GRPO (method 3): each row is an ODE trunk; at each branch step k it forks `branches`
    children y_{k,g} ~ N(mean_k, std_k^2) by sde_step's sampler, each finished by the ODE over finish_grid(k, T,
    finish_steps). Trunks stop after the last branch step.
    kind "sde", Flow-GRPO (method 7): each row takes the stochastic step at the branch steps, the ODE elsewhere.
    kind "tree", BranchGRPO (method 8): as "sde", but at each of split_steps every row forks split_factor children,
    SDE samples from its one velocity; the rows are a tree's nodes, the last ones its leaves.
    All live rows sit at one grid index (a branch finishing coarsely skips the indices off its path), so the
    rollout is at most T calls of velocity_fn."""
    steps = len(sigmas) - 1
    # the trunks' states [N, C, H, W] and the initial noise each row grew from [N], its index in `noise`
    trunk, trunk_noise = noise.float(), torch.arange(len(noise), device=noise.device)
    # finished-by-ODE branches, the trunk each grew from and (on the CPU) the step k it was born at
    leaves, leaf_noise, leaf_born = trunk[:0], trunk_noise[:0], torch.zeros(0, dtype=torch.long)
    hop = finish_hops(steps, branch_steps, finish_steps)  # [T, T + 1]
    records, last, branching = [], max(branch_steps), kind == "branch"
    for i in range(steps):
        if branching and i > last:
            trunk, trunk_noise = trunk[:0], trunk_noise[:0]  # no branch left to spawn: the trunk's work is done
        to = hop[leaf_born, i]
        due = (to > 0).nonzero().flatten()  # the leaves whose path has a step from s_i
        x, rows = torch.cat([trunk, leaves[due]]), torch.cat([trunk_noise, leaf_noise[due]])
        if not len(x):
            continue
        v = velocity_fn(x, sigmas[i].expand(len(x)).to(x.device), rows)
        v_trunk, v_leaves = v[:len(trunk)], v[len(trunk):]
        leaves[due] = ode_step(leaves[due], v_leaves, sigmas, i, to[due])
        if i in branch_steps and branching:
            x_k = trunk.repeat_interleave(branches, 0)
            y, log_prob, _, _ = sde_step(x_k, v_trunk.repeat_interleave(branches, 0), sigmas, i, noise_level,
                                         generator=generator, sampler=sampler)
            records.append((x_k, y, log_prob, i, len(leaves) + torch.arange(len(y), device=y.device)))
            leaves = torch.cat([leaves, y])
            leaf_noise = torch.cat([leaf_noise, trunk_noise.repeat_interleave(branches)])
            leaf_born = torch.cat([leaf_born, torch.full((len(y),), i)])
            trunk = ode_step(trunk, v_trunk, sigmas, i)
        elif i in branch_steps:
            if kind == "tree" and i in split_steps:  # BranchGRPO: node n's f children, rows n f .. n f + f - 1
                trunk, v_trunk, trunk_noise = (t.repeat_interleave(split_factor, 0)
                                               for t in (trunk, v_trunk, trunk_noise))
            y, log_prob, _, _ = sde_step(trunk, v_trunk, sigmas, i, noise_level, generator=generator, sampler=sampler)
            records.append((trunk, y, log_prob, i, torch.arange(len(y), device=y.device)))  # the nodes y become
            trunk = y
        else:
            trunk = ode_step(trunk, v_trunk, sigmas, i)
    x_k, y, log_prob, step, image = zip(*records)
    step = torch.cat([torch.full_like(lp, k, dtype=torch.long) for lp, k in zip(log_prob, step)])
    if branching:
        latents, image_noise, image_step, span = leaves, leaf_noise, step, torch.ones_like(step)
    else:  # node n of a step with N nodes has the leaves n * L/N .. (n + 1) * L/N - 1 below it (L/N = 1 but in a tree)
        latents, image_noise, image_step = trunk, trunk_noise, torch.full_like(trunk_noise, -1)
        span = torch.cat([torch.full_like(nodes, len(trunk) // len(nodes)) for nodes in image])
        image = [nodes * (len(trunk) // len(nodes)) for nodes in image]
    return Rollout(latents, image_noise, image_step, torch.cat(x_k), torch.cat(y), torch.cat(log_prob), step,
                   torch.cat(image), span)


def rollout_nfe(rollout: str, steps: int, branch_steps: list[int], branches: int, guidance: float,
                finish_steps: int = 0, split_steps: list[int] = (), split_factor: int = 1) -> int:
    """Transformer evaluations of one latent per initial noise (method 3), CFG's halves counted."""
    halves = cfg_copies(guidance)
    if rollout == "sde":
        return halves * steps
    if rollout == "tree":  # the nodes alive before each step i: f ** (split steps before i)
        return halves * sum(split_factor ** sum(k < i for k in split_steps) for i in range(steps))
    # max(B) + 1 for the trunk, plus G min(F, T - 1 - k) for the branches of every k in B (F = 0: all T - 1 - k)
    finish = [len(finish_grid(k, steps, finish_steps)) - 1 for k in branch_steps]
    return halves * (max(branch_steps) + 1 + branches * sum(finish))


# =====================================================================================================
# Advantages and the loss (method 4, 6, 8)
# =====================================================================================================


def group_advantages(rewards: Tensor, groups: Tensor, clip: float = 5.0, global_std: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """Normalised advantages of M rewards; groups [M] are group ids. A group is the samples whose rewards compare:
    TempFlow-GRPO's G branches of one (prompt, initial noise, step k), Flow-GRPO's S*G samples of one prompt, or
    BranchGRPO's nodes of one depth of one tree. The mean is per group; the std per group, or with global_std
    over all the valid rewards (Flow-GRPO's global_std). A non-finite reward is left out of the
    statistics and gets A = 0. Returns advantages [M] and whether each sample's group had all-equal rewards."""
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, 0.0).double()
    n = torch.zeros(int(groups.max()) + 1, dtype=torch.double, device=groups.device).index_add_(0, groups, valid.double())
    mean = torch.zeros_like(n).index_add_(0, groups, r) / n.clamp(min=1)
    var = torch.zeros_like(n).index_add_(0, groups, torch.where(valid, (r - mean[groups]) ** 2, 0.0)) / n.clamp(min=1)
    std = r[valid].std(correction=0).expand(len(r)) if global_std else var[groups].sqrt()
    # A = (r - mean_group r) / (std + 1e-4), population std, clipped to [-5, 5]   (Flow-GRPO Eq. 4)
    advantages = ((r - mean[groups]) / (std + 1e-4)).clamp(-clip, clip)
    # float32 rewards sum exactly in float64, so a group of equal rewards has mean r, var 0 and A = 0 exactly
    return torch.where(valid, advantages, 0.0).float(), var[groups] == 0


def fused_rewards(rewards: Tensor, first: Tensor, span: Tensor) -> Tensor:
    """BranchGRPO's reward fusion (arXiv 2509.06040): node n's reward is the mean of the finite rewards of
    its leaves, first[n] .. first[n] + span[n] - 1 of rewards [M]; NaN if none is finite. Returns [K]."""
    valid = torch.isfinite(rewards)
    # prefix sums over leaves 0..j-1 (float32 rewards add exactly in float64) of the rewards and of their count
    total = torch.cat([torch.zeros(1, dtype=torch.double), torch.where(valid, rewards, 0).double().cumsum(0)])
    count = torch.cat([torch.zeros(1, dtype=torch.long), valid.long().cumsum(0)])
    # r_n = sum of leaf rewards / number of finite leaves, over leaves first[n] .. first[n] + span[n] - 1 (0 / 0: NaN)
    return ((total[first + span] - total[first]) / (count[first + span] - count[first])).float()


def width_pruned(rewards: Tensor, first: Tensor, span: Tensor, leaves: int, keep: int) -> Tensor:
    """BranchGRPO's width pruning: [K] True for the nodes on the paths to the `keep` best and `keep` worst leaves of
    each tree (rewards [M], trees of `leaves` leaves in a row); a non-finite leaf is neither."""
    by_tree = rewards.reshape(-1, leaves)
    best = by_tree.nan_to_num(-math.inf).topk(min(keep, leaves), dim=1).indices
    worst = by_tree.nan_to_num(math.inf).topk(min(keep, leaves), dim=1, largest=False).indices
    kept = torch.zeros_like(by_tree, dtype=torch.bool).scatter_(1, torch.cat([best, worst], 1), True).flatten()
    kept &= torch.isfinite(rewards)
    below = torch.cat([torch.zeros(1, dtype=torch.long), kept.long().cumsum(0)])  # kept leaves before each index
    return below[first + span] > below[first]


def trained_images(advantages: Tensor, image_noise: Tensor, valid: Tensor, zero_std: Tensor, drop_zero_std: bool
                   ) -> Tensor:
    """Which of M images train their transitions; image_noise [M] is the initial noise each grew from (an SDE
    sample has its own). The official rule (method 6) drops a trunk only when all of its advantages are 0, so the
    zero-advantage transitions of the trunks kept still count in the loss's mean and train the KL; drop_zero_std
    drops every group with equal rewards instead. An image with a non-finite reward never trains."""
    if drop_zero_std:
        return valid & ~zero_std
    signal = torch.zeros(int(image_noise.max()) + 1, device=image_noise.device).index_add_(
        0, image_noise, (advantages != 0).float())  # per initial noise: how many of its images have A != 0
    return valid & (signal[image_noise] > 0)


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, weights: Tensor, mean: Tensor,
              ref_mean: Tensor, std: Tensor, clip_range: float, beta: float) -> tuple[Tensor, dict]:
    """Clipped GRPO loss over B transitions, each term weighted by its step's w_k, plus beta times the exact KL
    to the base model. log_prob, old_log_prob, advantages, weights, std: [B]; mean, ref_mean: [B, C, H, W]."""
    # ratio = exp(log pi_theta(y | x_k) - log pi_old(y | x_k))
    ratio = torch.exp(log_prob - old_log_prob)
    # max(-w_k A ratio, -w_k A clip(ratio, 1 - eps, 1 + eps)) (Flow-GRPO Eq. 5); the weight scales this term only
    policy = torch.maximum(-weights * advantages * ratio,
                           -weights * advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    # KL_k = mean_CHW (mean_theta - mean_ref)^2 / (2 std_k^2), two Gaussians of one std (Flow-GRPO, after Eq. 9)
    kl = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    loss = (policy + beta * kl).mean()
    stats = dict(policy_loss=policy.mean(), kl=kl.mean(), ratio_mean=ratio.mean(),
                 clipfrac=((ratio - 1).abs() > clip_range).float().mean())
    return loss, {k: v.detach() for k, v in stats.items()}


# =====================================================================================================
# ---------------- the algorithm ends here; what follows is plumbing around diffusers ----------------
# =====================================================================================================


# T5 prompt tokens, as the official code encodes (the pipeline's default is 256); a tokenizer with a shorter
# model_max_length caps it.
T5_TOKENS = 128


def is_terminal() -> bool:
    """Whether both output streams are terminals, where a bar redraws in place. Elsewhere (`> train.log`, nohup, a
    job scheduler, `| tee`) every redraw would stay in the file as text."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """StableDiffusion3Pipeline from a hub id or a local folder, or one line saying how to provide it."""
    import diffusers
    import transformers

    if not is_terminal():  # in a log file their loading bars would be redraws
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SystemExit(f"error: cannot load --model {model!r}: {reason}") from None
    return pipe


def check_models(args: Args):
    """Look for every model the run loads (the pipeline, the rewards' models) before loading any, and name all that
    cannot be had in one line, each with how to get it."""
    needs = [("--model", args.model, "model_index.json", "--model /path/to/a/local/copy")]
    for flag, spec in (("--reward", args.reward), ("--eval-reward", args.eval_reward)):
        needs += [(f"{flag} {name}", model, file, f"{env}=/path/to/a/local/copy")
                  for name, model, env, file in (required_models(spec, flag) if spec else [])]
    missing = []
    for flag, model, file, local in {need[1]: need for need in needs}.values():  # each model once
        why = model_problem(model, file)
        missing += [f"{flag} needs {model!r}, {why} (or {local})"] if why else []
    check(not missing, f"{len(missing)} model(s) this run needs cannot be loaded: {'; '.join(missing)}")


def model_problem(model: str, file: str) -> str | None:
    """Why `model`, a local folder or a hub id, cannot be loaded, or None: a folder, a hub id whose `file` is in
    the local cache, or one the hub serves to this login."""
    import huggingface_hub as hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).is_dir():
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return "which is no folder"
    if isinstance(hub.try_to_load_from_cache(model, file), str):
        return None
    if hub.is_offline_mode():
        return f"which is not in the hub's cache (HF_HUB_OFFLINE is set): `hf download {model}` where online"
    try:
        hub.auth_check(model)
    except GatedRepoError:
        return f"which is gated: accept its license at https://huggingface.co/{model}, then `hf auth login`"
    except RepositoryNotFoundError:
        return "which is not on the hub (if it is private, `hf auth login`)"
    except Exception as err:  # the network: a DNS failure, a timeout, a proxy
        return f"which is not in the hub's cache, and the hub is unreachable ({type(err).__name__}): " \
               f"`hf download {model}` where online"
    return None


def t5_length(pipe) -> int:
    return min(T5_TOKENS, pipe.tokenizer_3.model_max_length)


@contextmanager
def logs_dropped(loggers: list[str], *phrases: str):
    """For the block, these loggers drop their records that contain any of the phrases."""
    def keep(record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in phrases)
    for name in loggers:
        logging.getLogger(name).addFilter(keep)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(keep)


def without_truncation_warnings(pipe):
    """The pipeline and the tokenizers warn at every encoding of a prompt longer than the text encoders take, with
    its cut text (every epoch, in a log file); prompt_cuts says it once, at the start."""
    return logs_dropped([type(pipe).encode_prompt.__module__, "transformers.tokenization_utils_base"],
                        "The following part of your input was truncated", "Token indices sequence length is longer")


def encode_prompts(pipe, prompts: list[str]) -> PromptEmbeds:
    """Embeddings of the prompts and of the empty prompt, computed by the pipeline's own encode_prompt wherever the
    text encoders are, and handed over on the transformer's device."""
    with torch.no_grad(), without_truncation_warnings(pipe):
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=pipe.text_encoder.device, do_classifier_free_guidance=True,
            max_sequence_length=t5_length(pipe))
    return PromptEmbeds(*(t.to(pipe.transformer.device) for t in (embeds, pooled, neg_embeds, neg_pooled)))


def prompt_cuts(pipe, numbered: list[tuple[int, str]], flag: str) -> str | None:
    """One line naming the prompts (line numbers) that are longer than CLIP's or T5's tokens, which the pipeline
    cuts there; None if none is."""
    if not numbered:
        return None
    parts = []
    with without_truncation_warnings(pipe):
        for name, tokenizer, limit in (("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
                                       ("T5", pipe.tokenizer_3, t5_length(pipe))):
            lengths = [len(ids) for ids in tokenizer([prompt for _, prompt in numbered]).input_ids]
            lines = [n for (n, _), length in zip(numbered, lengths) if length > limit]
            if lines:
                shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
                parts.append(f"{len(lines)} longer than {name}'s {limit} tokens (line {shown})")
    return (f"note: {flag}: {'; '.join(parts)}, of {len(numbered)} prompts; the text encoders see them cut there"
            if parts else None)


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


@contextmanager
def placed(modules: list[torch.nn.Module], device: torch.device, offload: bool):
    """With offload, the modules come to the device for the block and go back to the CPU after it; without, they
    stay where they are (on the device)."""
    for module in modules if offload else []:
        module.to(device)
    try:
        yield
    finally:
        for module in modules if offload else []:
            module.to("cpu")


def initial_noise(pipe, n: int, resolution: int, generator: torch.Generator) -> Tensor:
    """x at s_0 = 1: n latents of pure noise, drawn as the pipeline's prepare_latents draws them."""
    side = resolution // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    return torch.randn(n, channels, side, side, generator=generator, device=generator.device)  # [n, C, H, W]


def autocast(transformer):
    """Autocast to the transformer's dtype when it is below float32, on any device: a bf16 pipeline (CUDA's) runs
    its matmuls in bf16 (on CUDA its norms and softmax in float32), the LoRA stays float32 and the step math casts
    back to float32; a float32 pipeline (the CPU's default) runs as it is."""
    dtype = transformer.dtype
    return torch.autocast(transformer.device.type, dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def decode_latents(pipe, latents: Tensor) -> Tensor:
    """Latents [B, C, H, W] -> images [B, 3, H*f, W*f] in [0, 1], unscaled and post-processed as the pipeline does."""
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pt")


@torch.no_grad()
def ode_images(pipe, prompts: PromptEmbeds, noise: Tensor, steps: int, guidance: float, max_batch: int = 1 << 30,
               pad: bool = False) -> Tensor:
    """One ODE sample per prompt (embeddings of N prompts) from its initial noise [N, C, H, W], decoded: images
    [N, 3, H, W] in [0, 1]. pad: as sd3_velocity's."""
    device = pipe.transformer.device
    with autocast(pipe.transformer):
        latents = ode_rollout(sd3_velocity(pipe.transformer, prompts, guidance, max_batch, pad), noise.to(device),
                              sigma_grid(pipe.scheduler, steps))
        return torch.cat([decode_latents(pipe, z) for z in latents.split(max_batch)])


def read_prompts(path: str, flag: str = "--prompt-file") -> list[str]:
    """Non-blank lines of a UTF-8 text file, or one line saying what is wrong with it."""
    return [prompt for _, prompt in numbered_prompts(path, flag)]


def numbered_prompts(path: str, flag: str = "--prompt-file") -> list[tuple[int, str]]:
    """(line number, prompt) of each non-blank line, a line being what ends at "\n" (and only there: str.splitlines
    would also break at U+2028, form feed and more). A byte-order mark (Windows editors write one), the "\r" of
    "\r\n" and zero-width spaces at a line's ends are dropped: the tokenizers would read them as part of a word."""
    file = Path(path)
    if not path:
        raise SystemExit(f"error: {flag} is required")
    if file.is_dir():
        raise SystemExit(f"error: {flag} {path!r} is a folder; give the text file in it, a prompt per line")
    if not file.is_file():
        raise SystemExit(f"error: {flag} {path!r} does not exist")
    try:
        lines = file.read_bytes().decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: {flag} {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it "
                         f"as UTF-8") from None
    prompts = [(n, line.strip().strip("\ufeff\u200b").strip()) for n, line in enumerate(lines, start=1)]
    prompts = [(n, prompt) for n, prompt in prompts if prompt]
    if not prompts:
        raise SystemExit(f"error: {flag} {path!r} has no prompts (it is empty or only blank lines)")
    return prompts


# LoRA on the joint attention's projections of the image stream and of the context (text) stream. The
# "attn." prefix keeps out the second, image-only attention (attn2) of SD3.5-M's 13 dual-attention blocks, as the
# official targets do: 191 modules, 18.8 M parameters at rank 32 (the bare names would give 243 and 23.9 M).
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out"]


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


def compile_transformer(transformer, warm_up, backend: str = "inductor") -> float | None:
    """torch.compile each of the transformer's blocks in place (regional compilation: the blocks of one kind share
    their graphs, and the weights keep their names), then run warm_up(), the run's calls at each of their fixed
    shapes, so that all compiling happens here. Returns its seconds; None where compiling failed (a torch or peft
    that cannot): the blocks are eager again and one line names the error, for an optimisation never ends a run."""
    start = time.perf_counter()
    try:
        # a graph per kind of block (dual attention, plain, last), call shape and mode: more than dynamo's 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile(backend=backend, dynamic=False)
        warm_up()
    except torch.cuda.OutOfMemoryError:
        raise  # the run's own calls would not fit either: memory_advice's line, not a warning
    except Exception as err:
        eager(transformer)
        err = getattr(err, "inner_exception", None) or err  # what a backend raised, inside dynamo's wrapper
        print0(f"warning: --compile failed ({type(err).__name__}: {first_line(err)}); the run goes on eager")
        return None
    finally:
        transformer.zero_grad(set_to_none=True)  # the warm-up's backward leaves nothing behind
    return time.perf_counter() - start


def eager(transformer):
    """Undo compile_transformer: the blocks' calls are eager again."""
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None  # what nn.Module.compile set
    torch._dynamo.reset()


# diffusers' file name of a LoRA, which load_lora_weights(folder) looks for
LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(transformer, folder: Path):
    """The adapter in diffusers' format, alpha included: StableDiffusion3Pipeline.load_lora_weights(folder) loads it
    as trained."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    umask = os.umask(0)  # safetensors leaves its file 0600; the LoRA is shared as every other output is
    os.umask(umask)
    (folder / LORA_FILE).chmod(0o666 & ~umask)


# the official code's EMA of the LoRA weights: its largest decay and its interval in optimizer steps
EMA_DECAY, EMA_EVERY = 0.9, 8


def make_ema(params: list[torch.nn.Parameter], enabled: bool = True):
    """diffusers' EMAModel over the LoRA parameters (a float32 shadow copy), or None."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=EMA_DECAY) if enabled else None


def ema_update(ema, params: list[torch.nn.Parameter], n: int):
    """After optimizer step n (counted from 1, as the official global_step), every EMA_EVERY-th step."""
    if ema is not None and (n + 1) % EMA_EVERY == 0:
        ema.optimization_step = n  # EMAModel.step counts it to n + 1 and decays with its step - 1 = n:
        # decay_n = min((1 + n) / (10 + n), 0.9);  ema <- decay_n ema + (1 - decay_n) live
        ema.step(params)


@contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]):
    """The EMA weights in place of the live ones for a while (evaluation, export); the live ones without an EMA."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


# ---------------- several GPUs: torchrun's processes split the epoch's prompts and make one update ----------------


def init_distributed() -> torch.device:
    """This process's device; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) first the process group, NCCL on
    GPUs and gloo on CPUs. A peer that dies makes torchrun stop the others; one that hangs, the timeout."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*lines: str):
    """Lines on stdout from the first process only (under torchrun it speaks for all), beside any progress bar."""
    for line in lines if rank_and_world()[0] == 0 else ():
        tqdm.write(line)
    sys.stdout.flush()


@contextmanager
def said_once():
    """Under torchrun every process meets the same errors of settings, files and rewards; the first says each, the
    others exit quietly. They first give the first process time to say it: torchrun ends every process as soon as
    one fails, and a quiet one that failed first could end the first before it had spoken."""
    try:
        yield
    except SystemExit as err:
        if isinstance(err.code, str) and int(os.environ.get("RANK", 0)) > 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's ending is final, whatever the loop set
            time.sleep(30)
            raise SystemExit(1) from None
        raise


def _wire() -> torch.device:
    """Where collectives take their tensors: the GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(t: Tensor) -> Tensor:
    """Every process's t (one shape on all), concatenated in rank order, on the CPU; t itself in one process."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t, device=_wire()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(_wire()))
    return torch.cat(parts).cpu()


def all_sum(value: float) -> float:
    """value summed over processes."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=_wire())
    dist.all_reduce(total)
    return total.item()


def agree(failure: Exception | None):
    """Raise a reward server's failure in every process if any process met one, so that all stop at one point."""
    if all_sum(failure is not None):
        raise failure or RewardServerError("a reward server failed in another process")


def sum_gradients(params: list[torch.nn.Parameter]):
    """Each parameter's gradient summed over processes in one flat all-reduce; a process that trained nothing in
    this step adds zeros (and takes part, so nobody waits for it)."""
    if not dist.is_initialized():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)


# the statistics update() returns, averaged over processes in one all-reduce
TRAIN_STATS = ("policy_loss", "kl", "ratio_mean", "clipfrac", "loss", "skipped_updates", "grad_norm")


def mean_over_processes(stats: dict, weight: float) -> dict:
    """Each of TRAIN_STATS's means over the processes that have it, weighted by their transitions (plain where
    none has any)."""
    if not dist.is_initialized():
        return stats
    parts = [[stats[k] * weight, weight, stats[k], 1.0] if k in stats else [0.0] * 4 for k in TRAIN_STATS]
    sums = torch.tensor(parts, dtype=torch.float64, device=_wire())
    dist.all_reduce(sums)
    return {k: vw / w if w else v / n for k, (vw, w, v, n) in zip(TRAIN_STATS, sums.tolist()) if n}


def check_in_sync(params: list[torch.nn.Parameter]):
    """Every process holds the same LoRA (the reduced gradients keep it so); a bug that broke that would otherwise
    train N diverging models in silence."""
    if not dist.is_initialized():
        return
    mine = torch.cat([p.detach().flatten() for p in params]).to(_wire())
    first = mine.clone()
    dist.broadcast(first, 0)
    differs = torch.tensor(float(not torch.equal(mine, first)), device=_wire())
    dist.all_reduce(differs)
    if differs.item():
        raise RuntimeError(f"the LoRA weights of {int(differs.item())} process(es) differ from process 0's")


# =====================================================================================================
# The epoch: rollout -> rewards -> advantages -> optimizer steps
# =====================================================================================================


def tree_shape(args: Args) -> tuple[list[int], int]:
    """(split steps, split factor) of a BranchGRPO tree; ([], 1) for the other rollouts."""
    if args.rollout != "tree":
        return [], 1
    return parse_branch_steps(args.split_steps, args.steps), args.split_factor


def pruned_steps(args: Args) -> list[int]:
    """The steps --prune-depth leaves untrained (none when it is empty)."""
    return parse_branch_steps(args.prune_depth, args.steps) if args.prune_depth else []


def epoch_size(args: Args, branch_steps: list[int]) -> dict:
    """An epoch's size, derived once from the settings: trunks, images, transitions, transformer evaluations."""
    trunks = args.prompts_per_epoch * args.seeds_per_prompt * (args.branches if args.rollout == "sde" else 1)
    splits, factor = tree_shape(args)
    if args.rollout == "tree":  # a root's leaves; its nodes after each trained step (at most, with --prune-width)
        images = trunks * factor ** len(splits)
        transitions = trunks * sum(factor ** sum(k <= i for k in splits) for i in branch_steps
                                   if i not in pruned_steps(args))
    else:
        images = trunks * (len(branch_steps) * args.branches if args.rollout == "branch" else 1)
        transitions = images * (1 if args.rollout == "branch" else len(branch_steps))
    sampling = trunks * rollout_nfe(args.rollout, args.steps, branch_steps, args.branches, args.guidance,
                                    args.finish_steps, splits, factor)
    # training: the policy's forward and, with beta > 0, the base model's, CFG's halves counted
    per_transition = cfg_copies(args.guidance) * (2 if args.beta > 0 else 1)
    return dict(trunks=trunks, images=images, transitions=transitions,
                per_step=math.ceil(transitions / args.optimizer_steps), rollout_nfe=sampling,
                train_nfe=transitions * per_transition, per_transition=per_transition)


def step_weights(args: Args, sigmas: Tensor, branch_steps: list[int]) -> Tensor:
    """w_k by grid index k [T]: noise_aware_weights at the trained steps with --weighting noise, else 1."""
    step_weight = torch.ones(args.steps)
    if args.weighting == "noise":
        step_weight[branch_steps] = noise_aware_weights(sigmas.cpu(), args.noise_level, branch_steps, args.sampler)
    return step_weight


def describe_epoch(args: Args, branch_steps: list[int], world: int) -> str:
    """The derived sizes of an epoch, in one line."""
    size = epoch_size(args, branch_steps)
    return (f"epoch: {args.prompts_per_epoch} prompts x {size['trunks'] // args.prompts_per_epoch} noises"
            f"{f' over {world} processes' if world > 1 else ''}, {size['images']:,} images, "
            f"{size['transitions']:,} transitions ({size['per_step']:,} per optimizer step), "
            f"{size['rollout_nfe'] + size['train_nfe']:,} transformer evaluations (rollout "
            f"{size['rollout_nfe']:,}, training {size['train_nfe']:,})")


class Timer:
    """Seconds per phase of an epoch (`with timer("sample_s"):`), and on CUDA the epoch's peak memory."""
    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the GPU's work of this phase, not the launches alone
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict:
        peak = dict(peak_gb=torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else {}
        return {**{k: round(v, 2) for k, v in self.seconds.items()}, **peak}


class PlainLines:
    """A file for tqdm that turns each refresh ('\\r' + status + padding) into one line on stdout, beside the log
    lines; the blank refreshes of closing are dropped."""
    def write(self, text: str):
        text = text.strip("\r\n").rstrip()
        if text:
            sys.stdout.write(text + "\n")

    def flush(self):
        sys.stdout.flush()


def progress(iterable=None, every_s: float = 300, **kwargs) -> tqdm:
    """tqdm's bar on a terminal; elsewhere one plain line every every_s seconds, the first after every_s, so that a
    long epoch says where it is in a log file and a short one adds nothing to it."""
    kwargs.setdefault("disable", rank_and_world()[0] != 0)  # under torchrun the first process speaks for all
    if is_terminal():
        return tqdm(iterable, **kwargs)
    # position=0: a nested bar would move the cursor up and down with escape codes
    kwargs.update(file=PlainLines(), mininterval=every_s, delay=every_s, position=0,
                  bar_format="{desc}: {n_fmt}/{total_fmt} {unit}, {elapsed} elapsed, {remaining} left")
    return tqdm(iterable, **kwargs)


class Batch(NamedTuple):
    """One epoch's training transitions, after the rewards and advantages are known. K transitions."""
    x: Tensor          # [K, C, H, W]
    y: Tensor          # [K, C, H, W]
    log_prob: Tensor   # [K]
    step: Tensor       # [K]
    prompt: Tensor     # [K] row of the epoch's PromptEmbeds
    advantage: Tensor  # [K]


def sample_chunk(pipe, args: Args, noise: Tensor, prompts: PromptEmbeds, captions: list[str], reward_fn,
                 sigmas: Tensor, branch_steps: list[int], gen: torch.Generator, timer: "Timer", shown: Tensor
                 ) -> tuple[Rollout, dict, Tensor]:
    """Roll out N trunks (noise [N, C, H, W], prompts and captions: N rows), decode and score their images in
    chunks of --max-batch; returns the rollout on the CPU without its latents, the scores [M] and the images that
    `shown` [>= M] marks for the grid."""
    device = pipe.transformer.device
    with timer("sample_s"), autocast(pipe.transformer):
        velocity_fn = sd3_velocity(pipe.transformer, prompts, args.guidance, args.max_batch, args.compile == "on")
        out = rollout(velocity_fn, noise.to(device), sigmas, args.rollout, branch_steps, args.noise_level, gen,
                      args.branches, args.sampler, args.finish_steps, *tree_shape(args))
    image_captions = [captions[n] for n in out.image_noise.tolist()]
    broken = not_finite(out)  # [M]
    scores, kept = [], []
    with timer("score_s"), autocast(pipe.transformer), placed(reward_fn.models, device, args.offload_reward):
        for j in range(0, len(out.latents), args.max_batch):
            images = decode_latents(pipe, out.latents[j:j + args.max_batch])  # [<= max_batch, 3, H, W]
            bad = broken[j:j + len(images)].to(device) | ~images.isfinite().flatten(1).all(1)
            images = torch.where(bad.view(-1, 1, 1, 1), 0.0, images)  # no reward sees a NaN image...
            chunk = reward_fn(images, image_captions[j:j + args.max_batch])
            scores.append({k: v.masked_fill(bad.cpu(), math.nan) for k, v in chunk.items()})  # ...nor scores one
            kept.append(images[shown[j:j + len(images)].to(device)].cpu())
    out = Rollout(*(t.cpu() for t in out._replace(latents=out.latents[:0])))
    return out, {k: torch.cat([s[k] for s in scores]) for k in scores[0]}, torch.cat(kept)


def not_finite(out: Rollout) -> Tensor:
    """[M] the images that are not finite, or that score a transition whose y or old log-prob is not (a velocity
    that overflowed, as bf16 can): their rewards become NaN, so that trained_batch counts them invalid and drops
    their transitions, and the epoch trains on the rest."""
    bad = ~out.latents.isfinite().flatten(1).all(1)
    broken = ~(out.y.isfinite().flatten(1).all(1) & out.log_prob.isfinite())  # [K]
    # transition k is scored by images image[k] .. image[k] + span[k] - 1: mark each such range
    edges = torch.zeros(len(bad) + 1, device=bad.device)
    edges.index_add_(0, out.image[broken], torch.ones(int(broken.sum()), device=bad.device))
    edges.index_add_(0, (out.image + out.span)[broken], -torch.ones(int(broken.sum()), device=bad.device))
    return bad | (edges.cumsum(0)[:-1] > 0)


def trained_batch(out: Rollout, scores: dict, noise_prompt: Tensor, args: Args) -> tuple[Batch, dict]:
    """Rewards -> advantages over groups (method 4; under torchrun from every process's rewards, for the global std
    and the metrics) -> the transitions that train, and the epoch's reward metrics."""
    tree = args.rollout == "tree"
    if tree:  # BranchGRPO: advantages are the nodes', of their fused rewards, a group one depth of a tree
        reward, noise, step = fused_rewards(scores["reward"], out.image, out.span), out.image_noise[out.image], out.step
    else:  # advantages are the images'
        reward, noise, step = scores["reward"], out.image_noise, out.image_step
    # seed groups share (prompt, initial noise, k); prompt groups share (prompt, k)
    seed = noise if args.group == "seed" else torch.zeros_like(noise)
    keys = torch.stack([noise_prompt[noise], seed, step], dim=1)
    groups = torch.unique(keys, dim=0, return_inverse=True)[1]  # [M], ids below M
    rank, m = rank_and_world()[0], len(groups)
    everyone = {k: gather(v) for k, v in scores.items()}  # [world * M], rank by rank; groups stay apart:
    all_groups = gather(groups + rank * m)
    advantages, zero_std = group_advantages(gather(reward) if tree else everyone["reward"], all_groups,
                                            args.adv_clip, args.adv_std == "global")
    mine, valid = slice(rank * m, (rank + 1) * m), torch.isfinite(reward)
    if tree:
        keep, advantage = valid & ~(zero_std[mine] & args.drop_zero_std), advantages[mine]
        keep &= ~torch.isin(out.step, torch.tensor(pruned_steps(args), dtype=torch.long))
        if args.prune_width:
            splits, factor = tree_shape(args)
            keep &= width_pruned(scores["reward"], out.image, out.span, factor ** len(splits), args.prune_width)
    else:
        keep = trained_images(advantages[mine], out.image_noise, valid, zero_std[mine], args.drop_zero_std)[out.image]
        advantage = advantages[mine][out.image]
    batch = Batch(out.x[keep], out.y[keep], out.log_prob[keep], out.step[keep],
                  noise_prompt[out.image_noise[out.image]][keep], advantage[keep])  # [K] rows of each
    every_valid = torch.isfinite(everyone["reward"])
    rewards = everyone["reward"][every_valid]
    metrics = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
                   images=len(every_valid), invalid=int((~every_valid).sum()), transitions=int(all_sum(len(batch.x))),
                   zero_std_frac=all_groups[zero_std].unique().numel() / all_groups.unique().numel())
    metrics.update({f"reward_{k}": v[torch.isfinite(v)].mean().item() for k, v in everyone.items() if k != "reward"})
    return batch, metrics


def drawn_prompts(count: int, args: Args, epoch: int, gen: torch.Generator) -> list[int]:
    """This process's share of epoch's --prompts-per-epoch prompts, as indices of the `count` training prompts.
    "shared", the official draw (flow_grpo's DistributedKRepeatSampler): one permutation per epoch, the same in every
    process, whose first prompts the processes split in rank order, so an epoch's prompts are distinct (while the
    file has enough) and no two processes share one. "independent" (runs begun before it): each process draws with
    replacement from its own generator."""
    rank, world = rank_and_world()
    share = args.prompts_per_epoch // world
    if args.prompt_draw == "independent":
        return torch.randint(count, (share,), generator=gen, device=gen.device).tolist()
    # a seed of its own for each (seed, epoch), apart from every process's seed + rank (torch keeps 32 bits of one)
    shared = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"prompts {args.seed} {epoch}".encode())
                                                          .digest()[:4], "little"))
    order = torch.cat([torch.randperm(count, generator=shared) for _ in range(-(-args.prompts_per_epoch // count))])
    return order[rank * share:(rank + 1) * share].tolist()


def collect(pipe, args: Args, prompt_list: list[str], reward_fn, sigmas: Tensor, branch_steps: list[int],
            gen: torch.Generator, timer: "Timer", epoch: int = 0) -> tuple[Batch, PromptEmbeds, dict, tuple]:
    """Sample this process's share of epoch `epoch` (method 3, 7 or 8) in chunks of --rollout-prompts prompts, each
    decoded and scored as it finishes, so that GPU memory does not grow with the epoch; the recorded transitions wait
    on the CPU. Then the rewards become advantages (method 4). Also returns up to 32 images, with captions, for a grid.
    A reward server's failure in any process raises RewardServerError in every process."""
    world = rank_and_world()[1]
    prompts = [prompt_list[j] for j in drawn_prompts(len(prompt_list), args, epoch, gen)]
    device = pipe.transformer.device
    with timer("sample_s"), placed(text_encoders(pipe), device, args.offload_text_encoders):
        embeds = encode_prompts(pipe, prompts)
    size = epoch_size(args, branch_steps)
    per_prompt = size["trunks"] // args.prompts_per_epoch  # initial noises per prompt
    noise_prompt = torch.arange(len(prompts)).repeat_interleave(per_prompt)  # [N]
    noise = initial_noise(pipe, len(noise_prompt), args.resolution, gen)  # [N, C, H, W]
    images = size["images"] // world
    shown = torch.zeros(images, dtype=torch.bool)
    shown[torch.linspace(0, images - 1, min(32, images)).long()] = True  # the grid's images, spread over the epoch
    parts, before, failure = [], 0, None  # before: the epoch's images sampled before this chunk
    bar = progress(total=len(prompts), desc="sample", unit="prompt", leave=False)
    for trunks in torch.arange(len(noise)).split(args.rollout_prompts * per_prompt):
        rows = noise_prompt[trunks]
        try:
            out, scores, kept = sample_chunk(pipe, args, noise[trunks], embeds.take(rows.to(device)),
                                             [prompts[p] for p in rows.tolist()], reward_fn, sigmas, branch_steps,
                                             gen, timer, shown[before:])
        except RewardServerError as err:
            failure = err
            break
        # the chunk's trunk and image ids -> the epoch's
        parts.append((out._replace(image_noise=out.image_noise + trunks[0], image=out.image + before), scores, kept))
        before += len(out.image_noise)
        bar.update(len(trunks) // per_prompt)
    bar.close()
    agree(failure)
    out = Rollout(*map(torch.cat, zip(*(part[0] for part in parts))))  # latents: none, they are decoded
    scores = {k: torch.cat([part[1][k] for part in parts]) for k in parts[0][1]}
    batch, metrics = trained_batch(out, scores, noise_prompt, args)
    image_prompt = noise_prompt[out.image_noise[shown]]
    captions = [f"{prompts[p]} | {r:.3g}" for p, r in zip(image_prompt.tolist(), scores["reward"][shown].tolist())]
    return batch, embeds, metrics, (torch.cat([part[2] for part in parts]), captions)


def transition_loss(transformer, batch: Batch, rows: Tensor, embeds: PromptEmbeds, sigmas: Tensor,
                    step_weight: Tensor, args: Args) -> tuple[Tensor, dict]:
    """grpo_loss of some transitions: the policy's log-prob of the recorded y with gradients, the base model's
    mean without (skipped when beta = 0)."""
    device = transformer.device  # the transitions wait on the CPU; a micro-batch comes over to be trained
    x, y, k = batch.x[rows].to(device), batch.y[rows].to(device), batch.step[rows].to(device)
    prompts, sigma = embeds.take(batch.prompt[rows].to(device)), sigmas.to(device)[k]
    pad_to = rows_per_call(args.train_batch, args.guidance) if args.compile == "on" else 0  # a compiled shape
    with autocast(transformer):
        v = cfg_velocity(transformer, x, sigma, prompts, args.guidance, pad_to)
    _, log_prob, mean, std = sde_step(x, v, sigmas, k, args.noise_level, prev_sample=y, sampler=args.sampler)
    ref_mean = mean.detach()
    if args.beta > 0:
        with torch.no_grad(), lora_disabled(transformer), autocast(transformer):
            v_ref = cfg_velocity(transformer, x, sigma, prompts, args.guidance, pad_to)
        ref_mean = sde_step(x, v_ref, sigmas, k, args.noise_level, prev_sample=y, sampler=args.sampler)[2]
    return grpo_loss(log_prob, batch.log_prob[rows].to(device), batch.advantage[rows].to(device),
                     step_weight.to(device)[k], mean, ref_mean, std, args.clip_range, args.beta)


def update(transformer, params, optimizer, batch: Batch, embeds: PromptEmbeds, sigmas: Tensor,
           step_weight: Tensor, args: Args, gen: torch.Generator, ema=None, steps_before: int = 0) -> dict:
    """--optimizer-steps AdamW steps over a shuffled epoch, each accumulating gradients over micro-batches of at
    most --train-batch latents, so that its loss is the mean over its transitions: over every process's, under
    torchrun, however unevenly the zero-advantage rule left them. A step whose loss or gradient is not finite is
    skipped, counted and warned about: it never reaches the weights. After each step the EMA, if any, sees the
    run's optimizer step count (steps_before before this epoch). Returns the epoch's mean statistics."""
    per_call = rows_per_call(args.train_batch, args.guidance)
    order = torch.randperm(len(batch.x), generator=gen, device=gen.device).to(batch.x.device)
    totals = dict(skipped_updates=0)
    bar = progress(total=len(order), desc="train", unit="transition", leave=False)
    for n, part in enumerate(order.tensor_split(args.optimizer_steps), start=steps_before + 1):
        count = all_sum(len(part))  # the step's transitions, over every process
        if not count:
            ema_update(ema, params, n)
            continue  # every trunk of the epoch had equal rewards: nothing to learn from
        finite = True
        for rows in part.split(per_call) if len(part) else ():  # (an empty part splits into one empty piece)
            loss, stats = transition_loss(transformer, batch, rows, embeds, sigmas, step_weight, args)
            finite = finite and bool(torch.isfinite(loss))
            if finite:
                (loss * len(rows) / count).backward()
            for key, value in dict(stats, loss=loss.detach()).items():
                totals[key] = totals.get(key, 0.0) + value.item() * len(rows) / len(order)
            bar.update(len(rows))
        finite = all_sum(not finite) == 0  # one process's NaN skips the step for all
        sum_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
        else:
            totals["skipped_updates"] += 1
            print0(f"warning: skipped an update with a non-finite {'loss' if not finite else 'gradient'}")
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, params, n)
        totals["grad_norm"] = grad_norm.item()
    bar.close()
    return totals


# ---------------- evaluation, and what a run writes: metrics, grids, curves, a tracker ----------------


@torch.no_grad()
def evaluate(pipe, prompts: list[str], reward_fn, args: Args, grid: Path, shown: int = 64) -> dict:
    """Mean rewards of one ODE sample (--eval-steps) per prompt from noise fixed by --seed (drawn on the CPU, so
    the same on any device), so that evaluations of one run, and of runs with one seed, are comparable. The prompts
    are encoded once, then go in chunks of one transformer call; the first `shown` samples go to a PNG grid. A
    reward server's failure in any process raises RewardServerError in every process."""
    device, per_call = pipe.transformer.device, rows_per_call(args.max_batch, args.guidance)
    noise = initial_noise(pipe, len(prompts), args.resolution, torch.Generator().manual_seed(args.seed))
    chunks = [prompts[j:j + per_call] for j in range(0, len(prompts), per_call)]
    with placed(text_encoders(pipe), device, args.offload_text_encoders):  # all at once: the encoders come once
        embeds = [encode_prompts(pipe, chunk).to("cpu") for chunk in chunks]
    scores, images, failure = [], [], None
    for chunk, chunk_embeds, chunk_noise in zip(chunks, embeds, noise.split(per_call)):
        chunk_images = ode_images(pipe, chunk_embeds.to(device), chunk_noise, args.eval_steps, args.guidance,
                                  args.max_batch, args.compile == "on")
        try:
            with placed(reward_fn.models, device, args.offload_reward):
                scores.append(reward_fn(chunk_images, chunk))
        except RewardServerError as err:
            failure = err
            break
        images.append(chunk_images[:max(0, shown - len(images) * per_call)].cpu())
    agree(failure)
    scores = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    if rank_and_world()[0] == 0:  # under torchrun every process evaluates the same weights; the first writes
        save_grid(torch.cat(images), [f"{p} | {r:.3g}" for p, r in zip(prompts, scores["reward"][:shown].tolist())],
                  grid)
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


def log(row: dict, path: Path):
    """One fixed-format line per epoch, and the same numbers in metrics.jsonl."""
    evaluation = f" | base eval {row['base_eval_reward']:.3f}" if "base_eval_reward" in row else ""
    evaluation += f" | eval {row['eval_reward']:.3f}" if "eval_reward" in row else ""
    print0(f"epoch {row['epoch']} | reward {row['reward_mean']:.3f} +- {row['reward_std']:.3f}{evaluation} | "
           f"loss {row.get('loss', 0):.3g} | kl {row.get('kl', 0):.2e} | clipfrac {row.get('clipfrac', 0):.2f} | "
           f"zero-std {row['zero_std_frac']:.2f} | nfe {row['nfe']} | {row['wall_s']:.0f} s")
    # strict JSON has no NaN or Infinity: a non-finite number is written as null
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def keep_metrics_rows(path: Path, n: int):
    """Truncate metrics.jsonl to its first n rows: those of the epochs a resumed run keeps."""
    lines = path.read_text().splitlines(keepends=True)[:n] if path.exists() else []
    path.write_text("".join(lines))


def read_rows(path: Path) -> list[dict]:
    """The metrics rows of a run, one JSON object per line of metrics.jsonl; none if there is no file yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_series(ax, rows: list[dict], x_key: str, key: str, log: bool = False, **style):
    """One metric against x_key over the rows that have it (eval_* exists on evaluated epochs only); log scale when
    asked and every value is positive."""
    points = [(row[x_key], row[key]) for row in rows if row.get(key) is not None and x_key in row]
    if not points:
        return
    xs, ys = zip(*points)
    style.setdefault("marker", "." if len(points) == 1 else None)  # a line through one point is invisible
    ax.plot(xs, ys, **style)
    if log and all(y > 0 for y in ys if math.isfinite(y)):
        ax.set_yscale("log")


def plot_curves(rows: list[dict], path: Path):
    """A PNG of a run's curves: reward (training's as a line, evaluation's as markers, the base model's dashed), KL
    and clip fraction (columns) against epochs (top) and transformer evaluations (bottom, where runs of different
    cost per epoch compare). Returns the figure, for tests."""
    # Figure, not pyplot: no global backend switch and no figure left open in the caller's process
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(12, 6), dpi=100, layout="constrained")
    for ax_row, x_key, x_label in zip(fig.subplots(2, 3), ("epoch", "nfe"), ("epoch", "transformer evaluations (NFE)")):
        plot_series(ax_row[0], rows, x_key, "reward_mean", label="train")
        plot_series(ax_row[0], rows, x_key, "eval_reward", label="eval", marker="o", markersize=3)
        if rows and "base_eval_reward" in rows[0]:
            ax_row[0].axhline(rows[0]["base_eval_reward"], color="gray", linestyle="--", label="base")
        if ax_row[0].get_legend_handles_labels()[0]:  # a legend with nothing in it would only warn
            ax_row[0].legend()
        plot_series(ax_row[1], rows, x_key, "kl", log=True)
        plot_series(ax_row[2], rows, x_key, "clipfrac")
        for ax, title in zip(ax_row, ("reward", "KL to base", "clip fraction")):
            ax.set(title=title, xlabel=x_label)
            ax.xaxis.set_major_formatter(EngFormatter())  # 20k, 1.5M: NFE runs to millions
            ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


class Tracker:
    """No tracker (no --wandb, or a process but the first): every call does nothing."""
    def log(self, row: dict):
        pass

    def log_image(self, path: Path, key: str, epoch: int):
        pass

    def finish(self):
        pass


class WandbTracker(Tracker):
    """A wandb run: metrics rows and image grids at the step of their epoch."""
    def __init__(self, run, image: type):
        self.run, self.image = run, image  # image: wandb.Image

    def log(self, row: dict):
        self.run.log(row, step=row["epoch"])

    def log_image(self, path: Path, key: str, epoch: int):
        self.run.log({key: self.image(str(path))}, step=epoch)

    def finish(self):
        self.run.finish()


def open_tracker(project: str, config: dict, out: Path, resume: bool) -> WandbTracker:
    """One wandb run per --out, its files in out/wandb; its id is kept in out/wandb_id so that --resume continues the
    same run. WANDB_MODE=offline works without a login or network (`wandb sync out/wandb` later)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb needs the wandb package: pip install wandb") from None
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None  # None: wandb picks one
    run = wandb.init(project=project, config=config, dir=str(out), id=run_id, resume="allow")
    id_file.write_text(run.id)
    return WandbTracker(run, wandb.Image)


def summary(out: Path) -> str:
    """The run in one line, from its metrics rows, and where its results are."""
    rows = read_rows(out / "metrics.jsonl")
    value = lambda v: "nan" if v is None else f"{v:.3f}"  # noqa: E731  (metrics.jsonl writes NaN as null)
    evals = [row["eval_reward"] for row in rows if "eval_reward" in row]
    if evals and "base_eval_reward" in rows[0]:
        reward = f"eval reward {value(rows[0]['base_eval_reward'])} (base) -> {value(evals[-1])}"
    else:
        reward = f"reward {value(rows[0]['reward_mean'])} (epoch 0) -> {value(rows[-1]['reward_mean'])}"
    return (f"done: {rows[-1]['epoch'] + 1} epochs | {reward} | nfe {rows[-1]['nfe']:,} | "
            f"{rows[-1]['wall_s'] / 60:.1f} min | LoRA in {out / 'lora'}, curves {out / 'curves.png'}, grids in "
            f"{out / 'images'}")


# ---------------- long runs: the out folder, checkpoints, signals, failures ----------------


# A resume may change where the run is and what it logs, evaluates or saves...
RESUMABLE = {"out", "resume", "epochs", "save_every", "eval_every", "image_every", "eval_prompt_file", "eval_steps",
             "max_nfe", "wandb", "eval_reward", "reward_wait", "ran_with"}


# What runs begun before a setting existed ran with: a resume compares and continues with these
BEFORE_SETTING = {"compile": "off", "prompt_draw": "independent"}


# ... and the memory levers and --compile: they change the order of floating-point sums (compiled kernels round
# differently) and of the chunks' noise draws, not what training computes, so the run goes on, though not
# bit-identically to an uninterrupted one
MEMORY_LEVERS = {"max_batch", "train_batch", "rollout_prompts", "gradient_checkpointing", "offload_text_encoders",
                 "offload_reward", "reward_dtype", "compile"}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (an interrupted one, still .tmp, does not count), if any."""
    done = sorted(p for p in (out / "checkpoints").glob("epoch_*") if p.suffix != ".tmp")
    return done[-1] if done else None


def run_config(args: Args, prompts: list[str]) -> dict:
    """What config.json holds: every setting, a digest of the training prompts, so that a moved or re-saved prompt
    file is the same data and an edited one is not, and what ran it (the libraries' versions, this file's commit)."""
    import subprocess
    from importlib.metadata import version

    git = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                         text=True) if shutil.which("git") else None
    commit = git.stdout.strip() if git and git.returncode == 0 else None  # None: not a git checkout
    ran_with = {name: version(name) for name in ("torch", "diffusers", "transformers", "peft")}
    return dict(asdict(args), prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                ran_with=dict(ran_with, python=sys.version.split()[0], commit=commit))


def check_out(args: Args, config: dict) -> str | None:
    """Refuse an --out that holds another run, this run without --resume, a --resume with nothing to resume or by
    another number of processes; writes nothing. Returns a note when a resume changes a memory lever."""
    old = saved_config(args.out)
    if old is None:
        check(not args.resume, f"--resume: --out {args.out} holds no run to resume (no config.json); check the "
              f"path, or leave out --resume to start a new run")
        return None
    default = defaults() | BEFORE_SETTING
    # a setting that did not exist when the run began had its default, or BEFORE_SETTING's; runs older than the
    # digest compare paths
    before = {k: old.get(k, default.get(k)) for k in config}
    ignored = RESUMABLE | MEMORY_LEVERS | ({"prompt_file"} if "prompts_sha256" in old else {"prompts_sha256"})
    flag = lambda k: "the prompts" if k == "prompts_sha256" else "--" + k.replace("_", "-")  # noqa: E731
    changed = [f"{flag(k)} {before[k]!r} -> {config[k]!r}" for k in sorted(config) if k not in ignored
               and before[k] != config[k]]
    check(not changed, f"--out {args.out} holds a run with another configuration ({', '.join(changed[:3])}"
          f"{', ...' if len(changed) > 3 else ''}); choose another --out")
    check(args.resume, f"--out {args.out} already holds this run; pass --resume to continue it or choose another --out")
    last, world = last_checkpoint(Path(args.out)), int(os.environ.get("WORLD_SIZE", 1))
    processes = json.loads((last / "state.json").read_text()).get("processes", 1) if last else world
    check(processes == world, f"--resume: the run in --out {args.out} ran as {processes} process(es), this is {world}; "
          f"resume it with torchrun --nproc_per_node {processes} (its noise is per process)")
    levers = [f"{flag(k)} {before[k]!r} -> {config[k]!r}" for k in sorted(MEMORY_LEVERS) if before[k] != config[k]]
    return (f"note: --resume with {', '.join(levers)}: the same run, continued in another order of floating-point "
            f"sums and noise draws, so not bit-identical to an uninterrupted one") if levers else None


def check_writable(path: str):
    """--out is a folder this process can write in (or can create), or one line saying why not."""
    out = Path(path)
    existing = next(p for p in (out, *out.parents) if p.exists())
    check(existing.is_dir(), f"--out {path!r} is a file, not a folder" if existing == out else
          f"--out {path!r}: {str(existing)!r} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise SystemExit(f"error: --out {path!r}: cannot write in {str(existing)!r} ({err.strerror})") from None


def saved_config(out: str) -> dict | None:
    """The config.json of the run in --out; None if there is none, one line if it cannot be read."""
    path = Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --out {out}: its config.json cannot be read ({type(err).__name__}: "
                         f"{str(err)[:80]}); move the folder aside or choose another --out") from None


def write_config(out: Path, config: dict):
    """The first process creates --out and writes config.json atomically (a full disk leaves no half file), once
    every process has checked the folder."""
    if dist.is_initialized():
        dist.barrier()
    if rank_and_world()[0] == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json.tmp").write_text(json.dumps(config, indent=1))
            os.replace(out / "config.json.tmp", out / "config.json")
        except OSError as err:
            (out / "config.json.tmp").unlink(missing_ok=True)
            raise SystemExit(f"error: --out {out}: cannot write config.json ({err.strerror})") from None


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """About what a checkpoint and lora/ take on disk: the LoRA, its two AdamW moments, its EMA, the EMA's export."""
    return 5 * 4 * sum(p.numel() for p in params)


def check_free_space(out: Path, params: list[torch.nn.Parameter]):
    """Room in --out for two checkpoints (a new one is written before the last goes), or one line before epoch 0."""
    existing = next(p for p in (out, *out.parents) if p.exists())  # (under torchrun, out may not be made yet)
    need, free = 2 * checkpoint_bytes(params), shutil.disk_usage(existing).free
    check(free >= need, f"--out {out}: {free / 2**20:,.0f} MiB free, and a checkpoint needs {need / 2**20:,.0f} "
          f"MiB (two while one is written); free some space or choose another --out")


def save_checkpoint(out: Path, transformer, params, optimizer, ema, gen: torch.Generator, state: dict):
    """Write checkpoints/epoch_N atomically (a temporary folder renamed when complete), then drop older ones, and
    the EMA's LoRA in out/lora: both load with load_lora_weights, so that a run stopped anywhere has its adapter.
    Under torchrun the first process writes, with every process's generator state, after checking that all hold
    the same LoRA."""
    gens = [gen.get_state()]
    if dist.is_initialized():
        check_in_sync(params)
        gens = [None] * dist.get_world_size()
        dist.all_gather_object(gens, gen.get_state().cpu())
    if rank_and_world()[0] != 0:
        return
    root = out / "checkpoints"
    final, tmp = root / f"epoch_{state['epoch']:06d}", root / f"epoch_{state['epoch']:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_lora(transformer, tmp)  # the live weights, which training resumes from
        rng = dict(gens=gens, torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        torch.save(dict(optimizer=optimizer.state_dict(), rng=rng, ema=ema.state_dict() if ema else None),
                   tmp / "optimizer_rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        with ema_weights(ema, params):  # evaluation's and the export's weights
            save_lora(transformer, out / "lora.tmp")
    except BaseException as err:  # a full disk, or a second Ctrl-C: no partial folder stays to fill it
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out / "lora.tmp", ignore_errors=True)
        if isinstance(err, RuntimeError):  # torch.save's failed write ("PytorchStreamWriter failed writing ...")
            raise OSError(first_line(err)) from err
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out / "lora", ignore_errors=True)
    os.replace(out / "lora.tmp", out / "lora")


def load_checkpoint(out: Path, transformer, optimizer, ema, gen: torch.Generator) -> dict | None:
    """Restore the last complete checkpoint; None if there is none. A checkpoint is data, never code: it loads
    with weights_only."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    last = last_checkpoint(out)
    if last is None:
        return None
    if (last / "lora.safetensors").exists():  # a checkpoint from before diffusers' format: peft's keys
        lora = load_file(last / "lora.safetensors")
    else:
        lora = {k.removeprefix("transformer."): v for k, v in load_file(last / LORA_FILE).items()}
    set_peft_model_state_dict(transformer, lora)
    # on the CPU first: the first process saved it from its GPU, and the generator states must stay CPU tensors
    saved = torch.load(last / "optimizer_rng.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])  # (moves its state to each parameter's device)
    if ema is not None:
        ema.load_state_dict(saved["ema"])
        ema.to(transformer.device)
    gen.set_state(saved["rng"]["gens"][rank_and_world()[0]])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return json.loads((last / "state.json").read_text())


class StopOnSignal:
    """SIGINT or SIGTERM asks the loop to finish the current epoch, save a checkpoint and exit; a second one stops
    at once. Under torchrun a Ctrl-C reaches each process twice, from the terminal and relayed by torchrun's agent,
    so there a repeat changes nothing: the agent itself kills the processes after its --shutdown-timeout."""
    def __init__(self):
        self.signum, self.relayed = None, "RANK" in os.environ
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum is not None and not self.relayed:
            raise KeyboardInterrupt
        if self.signum is None:
            print0(f"{signal.Signals(signum).name}: finishing this epoch, then saving a checkpoint " + (
                "(torchrun kills the processes after its --shutdown-timeout, 30 s unless set longer)" if self.relayed
                else "(again to abort)"))
        self.signum = self.signum or signum


@contextmanager
def memory_advice(args: Args, where: str):
    """CUDA out of memory ends the run with one line naming the memory levers that a resume may change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"error: CUDA out of memory {where}: lower --max-batch (now {args.max_batch}) "
                         f"or --train-batch (now {args.train_batch}), or add --gradient-checkpointing, "
                         f"--offload-text-encoders, --offload-reward; then --resume") from None


def resume_command(args: Args, world: int) -> str:
    """The command line that continues this run: its settings that differ from their defaults, and --resume."""
    default = defaults(args.tiny) | METHODS[args.method] | {"compile": auto_compile()}
    words = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]
    words.append(os.path.relpath(__file__))
    for f in fields(Args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if f.name == "resume" or (value == default[f.name] and f.name not in ("prompt_file", "out")):
            continue
        words += ([flag] if value else ["--no-" + flag[2:]]) if f.type is bool else [flag, str(value)]
    return shlex.join(words + ["--resume"])


def server_down(err: RewardServerError, args: Args, where: str, evaluating: bool = False):
    """The one line that ends a run whose reward server failed, once its checkpoint is written."""
    flag = "--eval-reward" if evaluating and args.eval_reward else "--reward"
    with said_once():
        raise SystemExit(f"error: {flag} {err} {where}; once the server answers, the run continues from its last "
                         f"checkpoint with: {resume_command(args, rank_and_world()[1])}")


def reward_failure(metrics: dict, args: Args, where: str) -> str | None:
    """One line when no image of an epoch, or of an evaluation, had a finite reward (their mean over the finite ones
    is NaN): nothing can be learned from it or measured. It names the reward and its parts that gave nothing."""
    evaluation = ("--eval-reward", args.eval_reward) if args.eval_reward else ("--reward", args.reward)
    for key, prefix, (flag, spec) in (("reward_mean", "reward_", ("--reward", args.reward)),
                                      ("eval_reward", "eval_", evaluation)):
        if key in metrics and not math.isfinite(metrics[key]):
            empty = [name for name, _ in parse_spec(spec, flag) if not math.isfinite(metrics.get(prefix + name, 0))]
            return (f"{flag} {spec!r} gave no finite reward {where}: NaN or infinite for every image, from "
                    f"{', '.join(empty) or 'the sum'}; check that it suits the prompts (color and geneval_toy need a "
                    f"colour word) or fix the plug-in or server")
    return None


# =====================================================================================================
# The run: settings and models, then epoch after epoch
# =====================================================================================================


def prepare(args: Args) -> tuple[Args, dict, list, list, str | None]:
    """All that can fail before anything loads: the settings resolved and checked, the prompt files read, --out and
    every model looked at. Returns the settings, config.json's content, the (line, prompt) pairs of the training and
    evaluation files, and a note on what a resume changes."""
    args = finalize(args)
    saved = saved_config(args.out) if args.resume else None
    if saved:  # a run resumes with its own prompt draw
        args.prompt_draw = saved.get("prompt_draw", BEFORE_SETTING["prompt_draw"])
    prompts = numbered_prompts(args.prompt_file)
    eval_prompts = numbered_prompts(args.eval_prompt_file, "--eval-prompt-file") if args.eval_prompt_file else []
    check_writable(args.out)
    config = run_config(args, [prompt for _, prompt in prompts])
    note = check_out(args, config)
    check_models(args)
    for flag, spec in (("--reward", args.reward), ("--eval-reward", args.eval_reward)):
        if spec:
            check_rewards(spec, flag, prompts[0][1], args.reward_wait)
    return args, config, prompts, eval_prompts, note


def setup(args: Args, device: torch.device) -> tuple:
    """The pipeline, frozen but for a fresh LoRA on its transformer, the AdamW over that LoRA, its EMA, and the
    training and evaluation rewards."""
    place, dtype = "cpu" if args.offload_reward else device, getattr(torch, args.reward_dtype)
    # without torchvision, transformers falls back to its PIL image processors (fine here) and says so at every start
    with logs_dropped(["transformers.utils.import_utils"], "requires torchvision"):
        reward_fn = load_reward(args.reward, place, dtype=dtype, wait=args.reward_wait)
        eval_fn = reward_fn if not args.eval_reward else load_reward(args.eval_reward, place, dtype=dtype,
                                                                     wait=args.reward_wait)
        pipe = load_pipeline(args.model, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for module in [pipe.transformer, pipe.vae, *text_encoders(pipe)]:
        module.requires_grad_(False)
        module.to("cpu" if args.offload_text_encoders and module in text_encoders(pipe) else device)
    if device.type == "cuda":
        pipe.vae.enable_slicing()  # one 512 px image at a time: a batch's decoder activations would take GBs
    torch.manual_seed(args.seed)  # LoRA's initial A
    params = add_lora(pipe.transformer, args.lora_rank)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    return pipe, params, optimizer, make_ema(params, args.ema), reward_fn, eval_fn


def compiled(pipe, args: Args, prompt: str) -> tuple[Args, float | None]:
    """With --compile on: compile_transformer, warmed up at the run's three call shapes (a no-grad chunk of
    --max-batch latents, as the rollout and evaluation make; a training micro-batch of --train-batch, forward and
    backward; with beta > 0 its reference, adapter off), in every process or in none. Returns the settings
    (--compile off where compiling failed) and its seconds."""
    if args.compile != "on":
        return args, None
    transformer, device = pipe.transformer, pipe.transformer.device
    with placed(text_encoders(pipe), device, args.offload_text_encoders):
        embeds = encode_prompts(pipe, [prompt])
    gen = torch.Generator().manual_seed(0)  # its own: the run draws the same noise compiled or not

    def call(latents: int) -> Tensor:
        rows = rows_per_call(latents, args.guidance)
        x, sigma = initial_noise(pipe, rows, args.resolution, gen), torch.rand(rows, generator=gen)
        with autocast(transformer):
            return cfg_velocity(transformer, x.to(device), sigma.to(device),
                                embeds.take(torch.zeros(rows, dtype=torch.long, device=device)), args.guidance)

    def warm_up():
        with torch.no_grad():
            call(args.max_batch)
            if args.beta > 0:
                with lora_disabled(transformer):
                    call(args.train_batch)
        call(args.train_batch).float().mean().backward()

    print0(f"--compile: compiling the transformer's {len(transformer.transformer_blocks)} blocks for the run's "
           f"call shapes, once")
    seconds = compile_transformer(transformer, warm_up)
    if all_sum(seconds is None):  # one process that could not makes all eager: their numbers round alike
        eager(transformer)
        return replace(args, compile="off"), None
    print0(f"--compile: compiled in {seconds:.0f} s (not counted in the epochs' seconds)")
    return args, seconds


class Run(NamedTuple):
    """What every epoch of a run works with, set up once by start()."""
    pipe: object                 # the StableDiffusion3Pipeline, a LoRA on its transformer
    params: list                 # the LoRA's parameters, float32
    optimizer: torch.optim.Optimizer
    ema: object                  # diffusers' EMAModel, or None
    reward_fn: object            # training's reward (reward.py)
    eval_fn: object              # evaluation's
    sigmas: Tensor               # [T + 1] the grid
    branch_steps: list[int]      # B
    step_weight: Tensor          # [T] w_k by grid index
    gen: torch.Generator         # this process's prompts and noise
    out: Path
    tracker: Tracker
    prompts: list[str]           # the training prompts
    eval_prompts: list[str]      # the evaluation prompts (none: no evaluation)
    compile_s: float | None      # seconds of compiling the transformer (None: eager)


def resume_state(run: Run, args: Args) -> dict:
    """Where the run stands: with --resume the last checkpoint, restored into the LoRA, optimizer, EMA and
    generators, and metrics.jsonl cut back to its epochs; epoch 0 otherwise."""
    state = load_checkpoint(run.out, run.pipe.transformer, run.optimizer, run.ema, run.gen) if args.resume else None
    state = state or dict(epoch=0, metrics_rows=0, nfe=0, wall_s=0.0)
    if rank_and_world()[0] == 0:
        keep_metrics_rows(run.out / "metrics.jsonl", state["metrics_rows"])  # drop rows of epochs after the checkpoint
    return state


def start(args: Args) -> tuple[Run, Args, dict]:
    """Everything before the first epoch: the settings checked (prepare), the models loaded (setup), config.json
    written, the epoch described, and with --resume the last checkpoint restored; returns the Run, the resolved
    settings and where the run stands."""
    with said_once():
        args, config, prompts, eval_prompts, note = prepare(args)
        device = init_distributed()
        pipe, params, optimizer, ema, reward_fn, eval_fn = setup(args, device)
    (rank, world), out = rank_and_world(), Path(args.out)
    write_config(out, config)
    check_free_space(out, params)
    tracker = open_tracker(args.wandb, config, out, args.resume) if args.wandb and rank == 0 else Tracker()
    sigmas = sigma_grid(pipe.scheduler, args.steps, args.shift).to(device)
    branch_steps = parse_branch_steps(args.branch_steps, args.steps)
    cuts = [prompt_cuts(pipe, prompts, "--prompt-file"), prompt_cuts(pipe, eval_prompts, "--eval-prompt-file")]
    print0(*filter(None, [note, *cuts]), describe_epoch(args, branch_steps, world))
    with memory_advice(args, "in --compile's warm-up, at the run's largest calls"):
        args, compile_s = compiled(pipe, args, prompts[0][1])
    gen = torch.Generator(device).manual_seed(args.seed + rank)  # each process its own noise (--prompt-draw shared)
    run = Run(pipe, params, optimizer, ema, reward_fn, eval_fn, sigmas, branch_steps,
              step_weights(args, sigmas, branch_steps), gen, out, tracker, [p for _, p in prompts],
              [p for _, p in eval_prompts], compile_s)
    state = resume_state(run, args)
    if args.resume:
        print0(f"--resume: {args.out} continues at epoch {state['epoch']} of {args.epochs}")
    return run, args, state


def evaluated(run: Run, args: Args, name: str) -> dict:
    """evaluate() under the EMA weights, its grid in images/eval_{name}.png."""
    with ema_weights(run.ema, run.params):
        return evaluate(run.pipe, run.eval_prompts, run.eval_fn, args, run.out / "images" / f"eval_{name}.png")


def base_evaluation(run: Run, args: Args) -> dict:
    """The base model's evaluation, as the first row's base_eval_* (the LoRA starts with B = 0: its EMA is the
    base model); a reward that gives it nothing finite ends the run."""
    try:
        base = evaluated(run, args, "base")
    except RewardServerError as err:
        server_down(err, args, "in the base model's evaluation", evaluating=True)
    failure = reward_failure(base, args, "in the base model's evaluation")
    with said_once():
        check(not failure, failure)
    return {"base_" + k: v for k, v in base.items()}


def save_samples(run: Run, args: Args, epoch: int, samples: tuple | None, last: bool) -> Path | None:
    """The grid of the epoch's samples (images, captions) every --image-every epochs and at the end, from the first
    process; its path, or None when none is due."""
    path = run.out / "images" / f"{epoch:06d}.png"
    if samples is None or not ((epoch + 1) % args.image_every == 0 or last) or rank_and_world()[0] != 0:
        return None
    save_grid(*samples, path)
    return path


def publish(run: Run, args: Args, row: dict, samples: tuple | None, last: bool):
    """An epoch's outputs, from the first process: its log line and metrics row; its sample grid every
    --image-every epochs; the curves at each evaluation and at the end; the same rows and grids to the tracker."""
    if rank_and_world()[0] != 0:
        return
    epoch, grids = row["epoch"], {}
    log(row, run.out / "metrics.jsonl")
    if path := save_samples(run, args, epoch, samples, last):
        grids["samples"] = path
    if "base_eval_reward" in row:
        grids["eval_base"] = run.out / "images" / "eval_base.png"
    if "eval_reward" in row:
        grids["eval"] = run.out / "images" / f"eval_{epoch:06d}.png"
    if "eval_reward" in row or last:
        plot_curves(read_rows(run.out / "metrics.jsonl"), run.out / "curves.png")
    run.tracker.log(row)
    for key, path in grids.items():
        run.tracker.log_image(path, key, epoch)


def pending_row(run: Run, args: Args, state: dict) -> list[dict]:
    """The row of an epoch saved when its evaluation's reward server failed, completed by that evaluation (unless
    this resume leaves evaluation out) and published, counted into state; none otherwise."""
    if not state.get("pending"):
        return []
    row = state.pop("pending")
    try:
        row.update(evaluated(run, args, f"{row['epoch']:06d}") if run.eval_prompts else {})
    except RewardServerError as err:
        server_down(err, args, f"in epoch {row['epoch']}'s evaluation", evaluating=True)
    publish(run, args, row, None, row["epoch"] + 1 >= args.epochs or 0 < args.max_nfe <= state["nfe"])
    state["metrics_rows"] += 1
    return [row]


def checkpoint(run: Run, args: Args, state: dict):
    """save_checkpoint of the run where state says it stands (its epoch: the next to run). A write that fails (a
    full disk) ends the run with one line: why, that the last checkpoint is intact, and the command that resumes
    from it."""
    try:
        save_checkpoint(run.out, run.pipe.transformer, run.params, run.optimizer, run.ema, run.gen,
                        dict(state, processes=rank_and_world()[1]))
        if rank_and_world()[0] == 0:  # how to sample with it: the T5 length training used is not the pipeline's
            (run.out / "lora" / "README.md").write_text(textwrap.dedent(f"""\
                The EMA LoRA of {run.out} after {state['epoch']} epoch(s). To sample with it in diffusers:

                    pipe = StableDiffusion3Pipeline.from_pretrained({args.model!r}, dtype=torch.bfloat16)
                    pipe.to("cuda").load_lora_weights({str(run.out / 'lora')!r})
                    image = pipe(prompt, num_inference_steps={args.eval_steps}, guidance_scale={args.guidance},
                                 max_sequence_length={t5_length(run.pipe)}, height={args.resolution},
                                 width={args.resolution}).images[0]
                """))
    except OSError as err:
        full = shutil.disk_usage(run.out).free < checkpoint_bytes(run.params)
        last = last_checkpoint(run.out)
        raise SystemExit(f"error: checkpoint epoch_{state['epoch']:06d} could not be written in {run.out} ("
                         f"{'the disk is full' if full else str(err)[:100]}); "
                         f"{f'the last one, {last.name}, is intact' if last else 'no checkpoint was written yet'}; "
                         f"with room again: {resume_command(args, rank_and_world()[1])}") from None


def run_epoch(run: Run, args: Args, epoch: int, state: dict, once: dict) -> tuple[dict, tuple, Exception | None]:
    """One epoch: the rollout, rewards and advantages (collect), the optimizer steps (update), the evaluation when
    due. Returns its metrics row (with `once`, what the run's first row adds), its samples for a grid, and a reward
    server's failure in the evaluation; one in the rollout's scoring saves the epoch's start and ends the run."""
    timer, start_s = Timer(run.pipe.transformer.device), time.time()
    gen_state, rng_state = run.gen.get_state(), torch.get_rng_state()  # the epoch's start, for an outage
    with memory_advice(args, f"in epoch {epoch}"):
        try:
            batch, embeds, metrics, samples = collect(run.pipe, args, run.prompts, run.reward_fn, run.sigmas,
                                                      run.branch_steps, run.gen, timer, epoch)
        except RewardServerError as err:  # in every process at once: the epoch is dropped, its start saved
            run.gen.set_state(gen_state)
            torch.set_rng_state(rng_state)
            checkpoint(run, args, state)
            server_down(err, args, f"in epoch {epoch}")
        with timer("train_s"):
            stats = update(run.pipe.transformer, run.params, run.optimizer, batch, embeds, run.sigmas, run.step_weight,
                           args, run.gen, run.ema, epoch * args.optimizer_steps)
            metrics.update(mean_over_processes(stats, len(batch.x)))
        size = epoch_size(args, run.branch_steps)  # the rollout's evaluations, and those of the transitions trained
        nfe = state["nfe"] + size["rollout_nfe"] + metrics["transitions"] * size["per_transition"]
        outage = None
        if run.eval_prompts and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
                                 or 0 < args.max_nfe <= nfe):  # every process: none waits
            with timer("eval_s"):
                try:
                    metrics.update(evaluated(run, args, f"{epoch:06d}"))
                except RewardServerError as err:
                    outage = err
    # wall seconds of training: the evaluations' are not counted
    wall_s = state["wall_s"] + time.time() - start_s - timer.seconds.get("eval_s", 0.0)
    return dict(epoch=epoch, **metrics, **timer.metrics(), **once, nfe=nfe,
                wall_s=round(wall_s, 2)), samples, outage


def train(args: Args) -> list[dict]:
    """The whole run, resumable; returns the metrics rows of the epochs it ran. Under torchrun every process runs
    it on its share of each epoch's prompts, and the first writes everything. Every setting is checked, and every
    model looked for, before anything loads; --out is written only once everything has loaded."""
    run, args, state = start(args)
    stop = StopOnSignal()
    # the first row of this process: the base model's evaluation (a new run's) and the compile seconds
    once = base_evaluation(run, args) if run.eval_prompts and state["epoch"] == 0 else {}
    once |= {"compile_s": round(run.compile_s, 2)} if run.compile_s is not None else {}
    rows = pending_row(run, args, state)
    done = 0 < args.max_nfe <= state["nfe"]  # a resumed run that had already spent its --max-nfe
    bar = progress(range(state["epoch"], args.epochs if not done else state["epoch"]), desc="epochs", unit="epoch",
                   initial=state["epoch"], total=args.epochs)
    for epoch in bar:
        row, samples, outage = run_epoch(run, args, epoch, state, once)
        once = {}
        rows.append(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", refresh=False)
        last = epoch + 1 == args.epochs or 0 < args.max_nfe <= row["nfe"]
        state = dict(epoch=epoch + 1, metrics_rows=state["metrics_rows"] + 1, nfe=row["nfe"], wall_s=row["wall_s"])
        if outage:  # the epoch trained: it is saved with its row, which --resume completes with the evaluation
            save_samples(run, args, epoch, samples, last)
            checkpoint(run, args, dict(state, metrics_rows=state["metrics_rows"] - 1, pending=row))
            server_down(outage, args, f"in epoch {epoch}'s evaluation", evaluating=True)
        publish(run, args, row, samples, last)
        stopping = all_sum(bool(stop.signum)) > 0  # a signal to any process stops all after this epoch
        failure = reward_failure(row, args, f"in epoch {epoch}")
        if (epoch + 1) % args.save_every == 0 or last or stopping or failure:
            checkpoint(run, args, state)
        with said_once():
            check(not failure, f"{failure}; the epoch's checkpoint is saved")
        if stopping:
            print0(f"stopped after epoch {epoch}, checkpoint saved; to continue: "
                   f"{resume_command(args, rank_and_world()[1])}")
            raise SystemExit(128 + (stop.signum or signal.SIGTERM))
        if last:
            break
    print0(summary(run.out))  # the last epoch's checkpoint wrote lora/
    run.tracker.finish()
    return rows


# =====================================================================================================
# Entry point: tyro makes the command line from Args
# =====================================================================================================


TINY_WORLD = Path(__file__).parent / "tiny_world" / "pipeline"  # the tiny world's trained pipeline


METHODS = {"tempflow": dict(rollout="branch", weighting="noise", group="seed", adv_std="group"),
           "flow_grpo": dict(rollout="sde", weighting="uniform", group="prompt", adv_std="global"),
           "branch_grpo": dict(rollout="tree", weighting="uniform", group="seed", adv_std="group",
                               split_steps="0,2,4,6")}


TINY = dict(  # --tiny: the same loop on a CPU; bench/README.md gives the measurements behind each departure
    model=str(TINY_WORLD), reward="geneval_toy", resolution=64, max_batch=512, train_batch=512,
    eval_prompt_file=str(TINY_WORLD.parent / "prompts.txt"),
    beta=0.004,                      # the papers' value for GenEval-style rewards
    lr=1e-3, clip_range=0.02,        # at 3e-4 and 1e-4 the tiny model does not move; at lr 3e-3 it collapses
    branches=4, seeds_per_prompt=2,  # G = 6, S = 4 cost 3x the time for about the same gain per epoch
    prompts_per_epoch=4, epochs=40,  # 2 prompts learn less per NFE, and not from every seed; 48: an epoch 12x longer
    drop_zero_std=True,              # the official rule learns less here (bench/README.md)
    prompt_draw="independent")       # the official draw learned less here, over 2 seeds of 40 epochs (bench/README.md)


def defaults(tiny: bool = False) -> dict:
    """Each setting's default: Args', or with tiny TINY's where it has one."""
    return {f.name: f.default for f in fields(Args)} | (TINY if tiny else {})


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line: tyro makes it from Args, each field's docstring its --help; with --tiny, TINY's values are
    the defaults (and --help shows them)."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    default = Args(**TINY, tiny=True) if "--tiny" in argv else Args()
    return finalize(tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n\n")[0]))


def finalize(args: Args) -> Args:
    """A copy of args with the method's defaults filled in, every setting checked, each failure one line naming its
    flag. train() calls it, so Args(...) from Python and the command line resolve and fail alike."""
    args = replace(args)
    check(not args.tiny or args.model != Args.model, "tiny=True without the tiny settings: use "
          "Args(**TINY, tiny=True, ...), as --tiny on the command line does")
    check(args.method in METHODS, f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for key, value in METHODS[args.method].items():
        setattr(args, key, getattr(args, key) or value)
    for flag, value, choices in (("rollout", args.rollout, "branch sde tree"), ("group", args.group, "seed prompt"),
                                 ("weighting", args.weighting, "noise uniform"),
                                 ("adv_std", args.adv_std, "group global"), ("sampler", args.sampler, "sde cps"),
                                 ("prompt_draw", args.prompt_draw, "shared independent")):
        check(value in choices.split(), f"--{flag.replace('_', '-')} {value!r} is unknown; choose one of "
              f"{choices.replace(' ', ', ')}")
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
    check(args.group == "prompt" or args.rollout != "sde", "--group seed needs --rollout branch or tree: the "
          "samples of an SDE rollout share no initial noise; use --group prompt")
    group = args.branches * (args.seeds_per_prompt if args.group == "prompt" else 1)
    check(args.rollout == "tree" or args.branches >= 1 and group >= 2, f"--branches {args.branches} and "
          f"--seeds-per-prompt {args.seeds_per_prompt} make groups of {group}; advantages need at least 2 samples "
          f"per group")
    check_tree(args, steps)
    check_numbers(args)
    check(args.sampler == "sde" or args.noise_level <= 1, f"--noise-level {args.noise_level}: --sampler cps needs "
          f"0 < a <= 1 (its std is s_(k+1) sin(a pi / 2))")
    check(args.finish_steps >= 0, f"--finish-steps {args.finish_steps}: must be 0 (the whole remaining grid) or more")
    check(args.finish_steps == 0 or args.rollout == "branch", f"--finish-steps {args.finish_steps} needs "
          f"--rollout branch: it shortens how branches end, and an SDE rollout has none")
    factor = resolution_factor(args.model)
    check(args.resolution > 0 and args.resolution % factor == 0,
          f"--resolution {args.resolution}: must be a positive multiple of {factor} (VAE factor x patch size)")
    for flag in ("epochs", "prompts_per_epoch", "seeds_per_prompt", "lora_rank", "optimizer_steps", "save_every",
                 "eval_every", "eval_steps", "image_every", "rollout_prompts"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group comes later, with the model
    check(args.prompts_per_epoch % world == 0, f"--prompts-per-epoch {args.prompts_per_epoch} does not split into "
          f"whole prompts over {world} processes; choose a multiple of {world}")
    for flag in ("max_batch", "train_batch"):
        check(getattr(args, flag) >= 2, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 2 "
              f"(CFG's two halves)")
    check(args.reward_dtype in ("float32", "bfloat16"), f"--reward-dtype {args.reward_dtype!r} is unknown; choose "
          f"float32 or bfloat16")
    check(args.compile in ("auto", "on", "off"), f"--compile {args.compile!r} is unknown; choose auto, on or off")
    args.compile = auto_compile() if args.compile == "auto" else args.compile
    parse_spec(args.reward)
    if args.eval_reward:
        parse_spec(args.eval_reward, "--eval-reward")
    return args


# The real-valued settings: the least each may be, whether it must exceed it, and why (each must be a number; only
# the clips may be infinite, for no clipping). A value that means nothing useful fails: --max-grad-norm -1 mirrors
# every update (the run trains away from its reward), 0 learns nothing, --adv-clip -1 makes every advantage -1.
BOUNDS = {"lr": (0, True, ""), "clip_range": (0, True, ""), "beta": (0, False, "0: no KL"),
          "weight_decay": (0, False, "0: none"), "noise_level": (0, True, "the SDE needs noise"),
          "shift": (0, False, "0: the model's own"), "guidance": (1, False, "1: no CFG, as below 1 in the pipeline"),
          "reward_wait": (0, True, "seconds"), "max_grad_norm": (0, True, "inf: no clipping"),
          "adv_clip": (0, True, "inf: no clipping")}


def check_numbers(args: Args):
    """Each of BOUNDS's settings within its bound, and the integers that have no other check."""
    for name, (low, strict, note) in BOUNDS.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        finite = math.isfinite(value) or (name in ("max_grad_norm", "adv_clip") and value == math.inf)
        check(finite and (value > low if strict else value >= low), f"{flag} {value}: must be "
              f"{'more than' if strict else 'at least'} {low}{f' ({note})' if note else ''}")
    check(args.lr * args.weight_decay < 1, f"--weight-decay {args.weight_decay} with --lr {args.lr}: their product "
          f"must be below 1, or each step shrinks the LoRA past zero")
    check(args.max_nfe >= 0, f"--max-nfe {args.max_nfe}: must be 0 (no limit) or more")


def auto_compile() -> str:
    """--compile auto: on where the transformer goes to CUDA (init_distributed), off on the CPU."""
    return "on" if torch.cuda.is_available() else "off"


def check_tree(args: Args, branch_steps: list[int]):
    """BranchGRPO's flags: only with --rollout tree; splits among the stochastic (branch) steps, at least 2 children,
    something left to train."""
    for flag in ("split_steps", "prune_depth", "prune_width"):
        check(args.rollout == "tree" or not getattr(args, flag), f"--{flag.replace('_', '-')} needs --rollout tree "
              f"(--method branch_grpo)")
    if args.rollout != "tree":
        return
    steps = {}
    for flag in ("split_steps", "prune_depth"):
        try:
            steps[flag] = parse_branch_steps(getattr(args, flag), args.steps) if getattr(args, flag) else []
        except ValueError:
            raise SystemExit(f"error: --{flag.replace('_', '-')} {getattr(args, flag)!r} is not a list like 0,2,4 "
                             f"or a range like 0-8")
    check(steps["split_steps"] and set(steps["split_steps"]) <= set(branch_steps), f"--split-steps "
          f"{args.split_steps!r}: each split must be a stochastic step, one of --branch-steps {branch_steps}")
    check(args.split_factor >= 2, f"--split-factor {args.split_factor}: a split needs at least 2 children")
    check(args.prune_width >= 0, f"--prune-width {args.prune_width}: must be 0 (no pruning) or more")
    check(set(branch_steps) - set(steps["prune_depth"]), f"--prune-depth {args.prune_depth!r} prunes every "
          f"trained step")


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
    with said_once():
        args = parse_args(argv)
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
