"""TempFlow-GRPO (arXiv 2508.04324): GRPO fine-tuning of a flow-matching text-to-image model (Stable Diffusion
3.5-medium) with trajectory branching and noise-aware weighting, and Flow-GRPO and BranchGRPO behind a flag.

    python tempflow_grpo.py --tiny --prompt-file tiny_world/prompts.txt --out runs/tiny   # CPU, minutes
    python tempflow_grpo.py --prompt-file prompts.txt --out runs/sd35m                    # one GPU, SD3.5-M + PickScore
    torchrun --nproc_per_node 8 tempflow_grpo.py --prompt-file prompts.txt ...           # the epoch over 8 GPUs
    python tempflow_grpo.py --method flow_grpo ...                                       # the baseline

An epoch: from each of S initial noises per prompt, an ODE trunk; at each branch step k, G SDE branches leave the
trunk's x_k and the ODE finishes them, so a branch's reward is the process reward of step k, normalised over the G
branches of one (prompt, seed, k). The clipped GRPO loss (Flow-GRPO, arXiv 2505.05470, Eq. 5) of each transition
x_k -> y is weighted by w_k, step k's std over its mean, plus beta times the exact KL to the base model (LoRA off).
README.md, "The method, formula by formula", gives each formula and its source, cited here as (method n). This file
holds every line that decides a number a run produces; plumbing.py moves, checks, shows and keeps the run.

Notation (code -> paper):
    sigmas[i]         s_i, noise level of grid index i; s_0 = 1 (noise) > ... > s_T = 0 (image)
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

Departures from the paper or the official code, cited as (departure n); README.md, "Departures", gives each in full:
  1. log pi is averaged, not summed, over a latent's C*H*W elements (the official convention).
  2. w_k is computed from the grid, not from a hard-coded 2.25.
  3. A trunk stops after the last branch step.
  4. A sample with a non-finite reward, image, y or old log-prob leaves its group, counted as invalid.
  5. The Flow-GRPO rollout takes the SDE at the trained steps and the ODE at the last.
  6. Latents and step math are float32; a bf16 pipeline runs under bf16 autocast.
  7. Rewards enter the advantages unscaled.
  8. The reference epoch's 48 prompts are accumulated on one GPU, drawn as the official sampler draws them.
  9. --sampler cps scores a transition by its Gaussian density.
 10. The KL divides by 2 std_k^2 under every method.
 11. BranchGRPO fuses a node's rewards by the plain mean of its leaves and trains every node unless pruned.
 12. --tiny changes the model, reward, resolution and the optimisation settings in TINY, each by a measurement.
"""
import copy
import hashlib
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers.training_utils import EMAModel, cast_training_params, offload_models
from torch import Tensor

# The run's plumbing: none of these changes a number of a one-process run; gather, all_sum, agree, sum_gradients and
# mean_over_processes make torchrun's N processes compute the one-process step.
from plumbing import (agree, all_sum, captioned, check, check_settings, close_processes, compile_transformer,
                      describe_epoch, ema_weights, gather, grid_picks, init_distributed, load_models,
                      mean_over_processes, memory_advice, parse_steps, preflight, print0, progress, prompt_cuts,
                      rank_and_world, resume_command, reward_metrics, RunFolder, said_once, scored, sum_gradients,
                      Timer, without_truncation_warnings)
from reward import RewardServerError, reward_failure


# ======== Settings: each with its default (the papers' recipe where it has one); its docstring is its --help


@dataclass
class Args:
    # ---- what to run
    prompt_file: str = ""
    """training prompts, one per line (required)"""
    out: str = "runs/tempflow"
    """output folder: config.json, metrics.jsonl, checkpoints/, the final LoRA in lora/"""
    tiny: bool = False
    """the CPU demo: tiny_world/pipeline, geneval_toy, 64 px, TINY's defaults (Python: Args(**TINY, tiny=True))"""
    model: str = "stabilityai/stable-diffusion-3.5-medium"
    """diffusers StableDiffusion3Pipeline: a hub id or a local folder"""
    reward: str = "pickscore"
    """reward spec: name[:weight],..., path/to/file.py:function or a server's http://host:port/path; reward.py"""
    reward_wait: float = 300.0
    """seconds a reward server may take, retries included; then the run saves its last epoch and stops (--resume)"""
    seed: int = 0
    """seed of prompt order, initial noise and SDE noise"""
    epochs: int = 1000
    """epochs, each a rollout then --optimizer-steps updates (paper: 1000 for PickScore)"""

    # ---- method: --method sets the next four; each can be overridden alone for the paper's ablations
    method: str = "tempflow"
    """tempflow (branch, noise, seed, group std), flow_grpo (sde, uniform, prompt, global std) or BranchGRPO's
    branch_grpo (tree, uniform, seed: a group is one depth of one tree, group std; arXiv 2509.06040)"""
    rollout: str = ""
    """branch: ODE trunk with G SDE branches per branch step (method 3); sde: SDE at every branch step (method 7);
    tree: sde whose rows fork at the --split-steps, BranchGRPO's tree; empty: --method's"""
    weighting: str = ""
    """noise: w_k = std_k / mean_j std_j (method 5); uniform: w_k = 1; empty: --method's"""
    group: str = ""
    """seed: advantages over the G branches of a (prompt, seed, k); prompt: over (prompt, k)'s S*G; empty: --method's"""
    adv_std: str = ""
    """group: A divides by its group's std; global: by the epoch's std (Flow-GRPO, method 7); empty: --method's"""

    # ---- sampling
    steps: int = 10
    """T, sampling steps of the rollout (paper: 10)"""
    shift: float = 0.0
    """the grid's time shift in rollout and training (0: the scheduler's own, 3 for SD3.5); evaluation keeps its own"""
    branch_steps: str = ""
    """B, the trained steps: comma list or range like 0-8 (default: all 0..T-2; the last step is never trained)"""
    branches: int = 6
    """G, SDE branches per (prompt, seed, branch step) (paper: 6); --rollout sde draws S*G samples per prompt"""
    seeds_per_prompt: int = 4
    """S, initial noises per prompt (paper: 4); Flow-GRPO's group is S*G = 24 samples"""
    prompts_per_epoch: int = 48
    """P, prompts per epoch (paper: 48, one per GPU of the official run; accumulated here, departure 8)"""
    prompt_draw: str = "shared"
    """shared: one permutation of the file per epoch, split over processes (official); independent: with replacement"""
    noise_level: float = 0.7
    """a, the noise level of the stochastic steps (paper: 0.7; with --sampler cps it must lie in (0, 1])"""
    sampler: str = "sde"
    """the stochastic step: sde, Flow-GRPO's reverse SDE (the paper's); cps, coefficients-preserving sampling (arXiv
    2509.05952): std_k = s_{k+1} sin(a pi / 2), a in (0, 1]; log-probs, KL and weights follow it"""
    finish_steps: int = 0
    """F: a branch is finished by at most F ODE steps over its remaining grid (0: every step left, the paper's)"""
    split_steps: str = ""
    """BranchGRPO: the branch steps (list or range) at which each node forks --split-factor children (0,2,4,6)"""
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
    """evaluate and export an EMA of the LoRA, updated every 8th optimizer step (paper: on); training uses the live"""
    drop_zero_std: bool = False
    """drop every group whose rewards are all equal, not only trunks with no signal at all (the official rule)"""

    # ---- memory levers: where and how much sits on the GPU at once
    max_batch: int = 32
    """most latents in one no-grad transformer call (rollout, evaluation) and one VAE decode, CFG's halves counted"""
    train_batch: int = 8
    """most latents in one training forward and backward, CFG's halves counted (8: 37.6 GiB measured on an H200)"""
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
    """on: torch.compile the transformer's blocks, every call padded to --max-batch or --train-batch latents, so that
    all compiling happens once, at the start; off: eager; auto: on where the transformer is on CUDA"""

    # ---- long runs: checkpoints, evaluation, images
    resume: bool = False
    """continue the run in --out from its last checkpoint; it may change bookkeeping and memory levers (README.md)"""
    save_every: int = 1
    """epochs between checkpoints in --out/checkpoints (also written on SIGINT/SIGTERM and at the end)"""
    eval_prompt_file: str = ""
    """evaluation prompts, one image each from fixed noise with the ODE; empty: no evaluation"""
    eval_reward: str = ""
    """reward spec of evaluation, when it differs from training's (reward hacking shows as a gap); empty: --reward"""
    eval_every: int = 10
    """epochs between evaluations (and after the last epoch)"""
    eval_steps: int = 40
    """ODE steps of evaluation (paper: 40)"""
    image_every: int = 10
    """epochs between PNG grids of the epoch's samples, with their prompts and rewards, in --out/images"""
    max_nfe: int = 0
    """stop once this many latents went through the transformer, for compute-matched comparisons (0: no limit)"""
    wandb: str = ""
    """Weights & Biases project for metrics, config and grids (empty: none; WANDB_MODE=offline needs no login)"""


# ======== Flow-matching math (method 1-2). Pure functions of tensors: torch only, float32 inside. ====================


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


def sde_step(x: Tensor, v: Tensor, sigmas: Tensor, i, noise_level: float, y: Tensor | None = None,
             generator: torch.Generator | None = None, sampler: str = "sde") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step from s_i to s_{i+1}, and the policy's log-density of its result (departure 9). sampler
    "sde": Flow-GRPO's reverse SDE (Euler-Maruyama), the paper's; "cps": coefficients-preserving sampling (arXiv
    2509.05952), whose noise coefficients add in quadrature to s_{i+1}, so that exact predictions land on the flow's
    marginal (its std is 0 at s_T = 0: the ODE's step). x, v: [B, C, H, W] (the math runs in float32); i: int or
    LongTensor[B]. With y (x_{i+1}) given, y is only scored. Returns y [B, C, H, W], log_prob [B] (averaged over
    C*H*W), mean [B, C, H, W], std [B]."""
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
    if y is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device)
        # x_{i+1} = mean_i + std_i eps, eps ~ N(0, I)
        y = mean + std * eps
    # log pi(x_{i+1} | x_i) = -|x_{i+1} - mean_i|^2 / (2 std_i^2) - log std_i - log sqrt(2 pi), mean over C*H*W
    # (averaged, not summed as a density would be, to keep the ratio in range: departure 1)
    log_prob = -((y.float() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    log_prob = log_prob.mean(dim=(1, 2, 3))  # [B]
    return y, log_prob, mean, std.flatten()


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
    """Latents the transformer sees per row: the empty prompt's and the prompt's under CFG (guidance > 1), else one."""
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


# ======== TempFlow pieces (method 3, 5): how much each trained step weighs, and how a branch finishes ================


def noise_aware_weights(sigmas: Tensor, noise_level: float, branch_steps: list[int], sampler: str = "sde") -> Tensor:
    """w_k for the trained steps k: proportional to the sampler's std of step k, mean exactly 1 over them."""
    std = transition_std(sigmas.double(), torch.as_tensor(branch_steps, dtype=torch.long), noise_level, sampler)[1]
    # w_k = std_k / mean_{j in B} std_j   (noise-aware weighting; a cancels, the grid decides: departure 2)
    return (std / std.mean()).float()  # [len(branch_steps)]


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


# ======== Rollouts (method 3, 7, 8): one wavefront loop for the three methods ========================================


def sd3_velocity(transformer, prompts: PromptEmbeds, guidance: float, max_batch: int = 1 << 30, pad: bool = False):
    """SD3's velocity_fn for rollout() and ode_rollout(): fn(x [n, C, H, W], sigma [n], rows [n]) -> v, the
    cfg_velocity of latent j under prompt rows[j], at most max_batch latents per transformer call (with pad, exactly:
    a compiled transformer's one shape). Another model's velocity_fn serves the rollouts unchanged."""
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
            trunk, trunk_noise = trunk[:0], trunk_noise[:0]  # no branch left to spawn (departure 3)
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
        elif i in branch_steps:  # the SDE at the trained steps, the ODE at the last (departure 5)
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
        latents, image_noise, image_step, span = leaves, leaf_noise, leaf_born.to(step.device), torch.ones_like(step)
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


# ======== Advantages and the loss (method 4, 6, 8) ===================================================================


def group_advantages(rewards: Tensor, groups: Tensor, clip: float = 5.0, global_std: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """Normalised advantages of M rewards; groups [M] are group ids. A group is the samples whose rewards compare:
    TempFlow-GRPO's G branches of one (prompt, initial noise, step k), Flow-GRPO's S*G samples of one prompt, or
    BranchGRPO's nodes of one depth of one tree. The mean is per group; the std per group, or with global_std
    over all the valid rewards (Flow-GRPO's global_std). Rewards enter as they are (departure 7); a non-finite one
    is left out of the statistics and gets A = 0 (departure 4). Returns advantages [M] and whether each sample's
    group had all-equal rewards."""
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, 0.0).double()
    n = rewards.new_zeros(int(groups.max()) + 1, dtype=torch.double).index_add_(0, groups, valid.double())
    mean = torch.zeros_like(n).index_add_(0, groups, r) / n.clamp(min=1)
    var = torch.zeros_like(n).index_add_(0, groups, torch.where(valid, (r - mean[groups]) ** 2, 0.0)) / n.clamp(min=1)
    std = r[valid].std(correction=0).expand(len(r)) if global_std else var[groups].sqrt()
    # A = (r - mean_group r) / (std + 1e-4), population std, clipped to [-5, 5]   (Flow-GRPO Eq. 4)
    advantages = ((r - mean[groups]) / (std + 1e-4)).clamp(-clip, clip)
    # float32 rewards sum exactly in float64, so a group of equal rewards has mean r, var 0 and A = 0 exactly
    return torch.where(valid, advantages, 0.0).float(), var[groups] == 0


def fused_rewards(rewards: Tensor, first: Tensor, span: Tensor) -> Tensor:
    """BranchGRPO's reward fusion (arXiv 2509.06040, departure 11): node n's reward is the mean of the finite rewards of
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
    """Which of M images train their transitions; image_noise [M]: the initial noise each grew from. The official
    rule (method 6) drops a trunk only when all of its advantages are 0 (the zero advantages of the trunks kept stay
    in the loss's mean and train the KL); drop_zero_std drops every group with equal rewards. A NaN reward never
    trains."""
    if drop_zero_std:
        return valid & ~zero_std
    nonzero = torch.zeros(int(image_noise.max()) + 1, device=image_noise.device).index_add_(
        0, image_noise, (advantages != 0).float())  # per initial noise: how many of its images have A != 0
    return valid & (nonzero[image_noise] > 0)


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, weights: Tensor, mean: Tensor,
              ref_mean: Tensor, std: Tensor, clip_range: float, beta: float) -> tuple[Tensor, dict]:
    """Clipped GRPO loss over B transitions, each term weighted by its step's w_k, plus beta times the exact KL
    to the base model. log_prob, old_log_prob, advantages, weights, std: [B]; mean, ref_mean: [B, C, H, W]."""
    # ratio = exp(log pi_theta(y | x_k) - log pi_old(y | x_k))
    ratio = torch.exp(log_prob - old_log_prob)
    # max(-w_k A ratio, -w_k A clip(ratio, 1 - eps, 1 + eps)) (Flow-GRPO Eq. 5); the weight scales this term only
    policy = torch.maximum(-weights * advantages * ratio,
                           -weights * advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    # KL_k = mean_CHW (mean_theta - mean_ref)^2 / (2 std_k^2), two Gaussians of one std (Flow-GRPO, after Eq. 9;
    # departure 10)
    kl = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    loss = (policy + beta * kl).mean()
    # approx_kl = mean (log ratio)^2 / 2, the policy's drift from the rollout's (logged, as Flow-GRPO and CleanRL do)
    stats = dict(policy_loss=policy.mean(), kl=kl.mean(), ratio_mean=ratio.mean(),
                 approx_kl=((log_prob - old_log_prob) ** 2).mean() / 2,
                 clipfrac=((ratio - 1).abs() > clip_range).float().mean())
    return loss, {k: v.detach() for k, v in stats.items()}


# ======== SD3 calls: prompts, noise, decoding; the LoRA and its EMA (diffusers and peft do the work) =================


T5_TOKENS = 128  # prompt tokens, as the official code encodes (the pipeline's: 256); a shorter tokenizer caps it


def t5_length(pipe) -> int:
    return min(T5_TOKENS, pipe.tokenizer_3.model_max_length)


def encode_prompts(pipe, prompts: list[str]) -> PromptEmbeds:
    """Embeddings of the prompts and of the empty prompt, computed by the pipeline's own encode_prompt wherever the
    text encoders are, and handed over on the transformer's device."""
    with torch.no_grad(), without_truncation_warnings(pipe):
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompts, None, None, device=pipe.text_encoder.device, do_classifier_free_guidance=True,
            max_sequence_length=t5_length(pipe))
    return PromptEmbeds(*(t.to(pipe.transformer.device) for t in (embeds, pooled, neg_embeds, neg_pooled)))


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def initial_noise(pipe, n: int, resolution: int, generator: torch.Generator) -> Tensor:
    """x at s_0 = 1: n latents of pure noise, drawn as the pipeline's prepare_latents draws them."""
    side = resolution // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    return torch.randn(n, channels, side, side, generator=generator, device=generator.device)  # [n, C, H, W]


def autocast(transformer):
    """Autocast to the transformer's dtype when it is below float32, on any device: a bf16 pipeline (CUDA's) runs
    its matmuls in bf16 (on CUDA its norms and softmax in float32), the LoRA stays float32 and the step math casts
    back to float32; a float32 pipeline (the CPU's default) runs as it is (departure 6)."""
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
    cast_training_params(transformer)  # the LoRA's parameters to float32, the idiom of diffusers' LoRA scripts
    return [p for p in transformer.parameters() if p.requires_grad]


@contextmanager
def lora_disabled(transformer):
    """The base model, for the KL reference: the adapter switched off, not a second copy of the transformer."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


# the official code's EMA of the LoRA weights: its largest decay and its interval in optimizer steps
EMA_DECAY, EMA_EVERY = 0.9, 8


def ema_update(ema, params: list[torch.nn.Parameter], n: int):
    """After optimizer step n (counted from 1, as the official global_step), every EMA_EVERY-th step."""
    if ema is not None and (n + 1) % EMA_EVERY == 0:
        ema.optimization_step = n  # EMAModel.step counts it to n + 1 and decays with its step - 1 = n:
        # decay_n = min((1 + n) / (10 + n), 0.9);  ema <- decay_n ema + (1 - decay_n) live
        ema.step(params)


# ======== The epoch: rollout -> rewards -> advantages -> optimizer steps =============================================


def tree_shape(args: Args) -> tuple[list[int], int]:
    """(split steps, split factor) of a BranchGRPO tree; ([], 1) for the other rollouts."""
    if args.rollout != "tree":
        return [], 1
    return parse_steps(args.split_steps, args.steps, "--split-steps"), args.split_factor


def pruned_steps(args: Args) -> list[int]:
    """The steps --prune-depth leaves untrained (none when it is empty)."""
    return parse_steps(args.prune_depth, args.steps, "--prune-depth") if args.prune_depth else []


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
    """Roll out N trunks (noise [N, C, H, W], prompts and captions: N rows), decode and score their images by
    --max-batch; returns the rollout on the CPU without its latents, the scores [M] and the images `shown` marks."""
    device = pipe.transformer.device
    with timer("sample_s"), autocast(pipe.transformer):
        velocity_fn = sd3_velocity(pipe.transformer, prompts, args.guidance, args.max_batch, args.compile == "on")
        out = rollout(velocity_fn, noise.to(device), sigmas, args.rollout, branch_steps, args.noise_level, gen,
                      args.branches, args.sampler, args.finish_steps, *tree_shape(args))
    image_captions = [captions[n] for n in out.image_noise.tolist()]
    broken = not_finite(out)  # [M]
    scores, kept = [], []
    with timer("score_s"), autocast(pipe.transformer), offload_models(*reward_fn.models, device=device,
                                                                      offload=args.offload_reward):
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
    their transitions, and the epoch trains on the rest (departure 4)."""
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
    return batch, reward_metrics(everyone, all_groups, zero_std, int(all_sum(len(batch.x))))


def drawn_prompts(count: int, args: Args, epoch: int, gen: torch.Generator) -> list[int]:
    """This process's share of the epoch's prompts, as indices of the `count` training prompts. "shared", the
    official draw (flow_grpo's DistributedKRepeatSampler; departure 8): the first of one permutation per epoch, split
    in rank order, so distinct while the file has enough. "independent": each process draws with replacement."""
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
    """Sample this process's share of epoch `epoch` (method 3, 7 or 8), --rollout-prompts prompts at a time, each
    chunk decoded and scored as it ends, then the rewards become advantages (method 4); also a grid's images and
    captions. A reward server's failure in any process raises RewardServerError in every process."""
    prompts = [prompt_list[j] for j in drawn_prompts(len(prompt_list), args, epoch, gen)]
    device = pipe.transformer.device
    with timer("sample_s"), offload_models(*text_encoders(pipe), device=device, offload=args.offload_text_encoders):
        embeds = encode_prompts(pipe, prompts)
    size = epoch_size(args, branch_steps)
    per_prompt = size["trunks"] // args.prompts_per_epoch  # initial noises per prompt
    noise_prompt = torch.arange(len(prompts)).repeat_interleave(per_prompt)  # [N]
    noise = initial_noise(pipe, len(noise_prompt), args.resolution, gen)  # [N, C, H, W]
    shown = grid_picks(size["images"] // rank_and_world()[1])  # [this process's images] those its grid shows
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
    shown_prompts = [prompts[p] for p in noise_prompt[out.image_noise[shown]].tolist()]
    return batch, embeds, metrics, (torch.cat([part[2] for part in parts]),
                                    captioned(shown_prompts, scores["reward"][shown]))


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
    _, log_prob, mean, std = sde_step(x, v, sigmas, k, args.noise_level, y=y, sampler=args.sampler)
    ref_mean = mean.detach()
    if args.beta > 0:
        with torch.no_grad(), lora_disabled(transformer), autocast(transformer):
            v_ref = cfg_velocity(transformer, x, sigma, prompts, args.guidance, pad_to)
        ref_mean = sde_step(x, v_ref, sigmas, k, args.noise_level, y=y, sampler=args.sampler)[2]
    return grpo_loss(log_prob, batch.log_prob[rows].to(device), batch.advantage[rows].to(device),
                     step_weight.to(device)[k], mean, ref_mean, std, args.clip_range, args.beta)


def update(transformer, params, optimizer, batch: Batch, embeds: PromptEmbeds, sigmas: Tensor,
           step_weight: Tensor, args: Args, gen: torch.Generator, ema=None, steps_before: int = 0) -> dict:
    """--optimizer-steps AdamW steps over a shuffled epoch, each the mean loss of its transitions (under torchrun, of
    every process's) in micro-batches of --train-batch latents; one with a non-finite loss or gradient is skipped.
    The EMA counts the run's steps (steps_before before this epoch). Returns the epoch's mean statistics."""
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


def evaluate(pipe, prompts: list[str], reward_fn, args: Args, grid: Path) -> dict:
    """Mean rewards (eval_*) of one ODE sample (--eval-steps) per prompt from noise fixed by --seed (drawn on the
    CPU, so the same on any device): the evaluations of a run, and of runs with one seed, compare. The prompts are
    encoded once, then sampled a transformer call at a time as plumbing's scored() scores them and writes the grid."""
    device, per_call = pipe.transformer.device, rows_per_call(args.max_batch, args.guidance)
    noise = initial_noise(pipe, len(prompts), args.resolution, torch.Generator().manual_seed(args.seed))
    chunks = [prompts[j:j + per_call] for j in range(0, len(prompts), per_call)]
    with offload_models(*text_encoders(pipe), device=device, offload=args.offload_text_encoders):  # once for all
        embeds = [encode_prompts(pipe, chunk).to("cpu") for chunk in chunks]
    images = (ode_images(pipe, e.to(device), z, args.eval_steps, args.guidance, args.max_batch, args.compile == "on")
              for e, z in zip(embeds, noise.split(per_call)))
    return scored(zip(chunks, images), reward_fn, device, args.offload_reward, grid)


# ======== The run: settings and models, then epoch after epoch =======================================================


def setup(args: Args, device: torch.device) -> tuple:
    """The pipeline (bf16 on CUDA, float32 elsewhere: departure 6), frozen but for a fresh LoRA on its transformer,
    the AdamW over that LoRA, its EMA, and the training and evaluation rewards."""
    pipe, reward_fn, eval_fn = load_models(args, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)  # LoRA's initial A
    params = add_lora(pipe.transformer, args.lora_rank)
    if args.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    ema = EMAModel(params, decay=EMA_DECAY) if args.ema else None  # a float32 shadow of the LoRA
    return pipe, params, optimizer, ema, reward_fn, eval_fn


def compiled(pipe, args: Args, prompt: str) -> tuple[Args, float | None]:
    """With --compile on: compile_transformer, warmed up at the run's call shapes (--max-batch latents without
    gradients; --train-batch forward and backward, and its KL reference). Returns the settings (--compile off where
    compiling failed) and its seconds."""
    if args.compile != "on":
        return args, None
    transformer, device = pipe.transformer, pipe.transformer.device
    with offload_models(*text_encoders(pipe), device=device, offload=args.offload_text_encoders):
        embeds = encode_prompts(pipe, [prompt])
    x = initial_noise(pipe, 1, args.resolution, torch.Generator().manual_seed(0)).to(device)  # not the run's noise
    sigma, row = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.long, device=device)

    def call(latents: int) -> Tensor:  # x, padded by sd3_velocity to one call of `latents` latents
        with autocast(transformer):
            return sd3_velocity(transformer, embeds, args.guidance, latents, pad=True)(x, sigma, row)

    def warm_up():  # as the run calls: rollout and evaluation, the KL's reference, training forward and backward
        with torch.no_grad():
            call(args.max_batch)
            if args.beta > 0:
                with lora_disabled(transformer):
                    call(args.train_batch)
        call(args.train_batch).float().mean().backward()
    seconds = compile_transformer(transformer, warm_up)
    return (args, seconds) if seconds is not None else (replace(args, compile="off"), None)


class Run(NamedTuple):
    """What every epoch of a run works with, set up once by train()."""
    pipe: object                 # the StableDiffusion3Pipeline, a LoRA on its transformer
    params: list                 # the LoRA's parameters, float32
    optimizer: torch.optim.Optimizer
    ema: object                  # diffusers' EMAModel, or None
    reward_fn: object            # training's reward (reward.py)
    eval_fn: object              # evaluation's
    sigmas: Tensor               # [T + 1] the grid
    branch_steps: list[int]      # B
    step_weight: Tensor          # [T] w_k by grid index
    gen: torch.Generator         # this process's noise (and its prompts with --prompt-draw independent)
    folder: RunFolder            # --out: metrics, grids, checkpoints, lora/; how the run stops
    prompts: list[str]           # the training prompts
    eval_prompts: list[str]      # the evaluation prompts (none: no evaluation)

    def evaluation(self, args: Args, grid: Path) -> dict:
        """evaluate() with the EMA weights, the model that lora/ exports; its grid at `grid`."""
        with ema_weights(self.ema, self.params):
            return evaluate(self.pipe, self.eval_prompts, self.eval_fn, args, grid)


def run_epoch(run: Run, args: Args, epoch: int, state: dict, once: dict) -> tuple[dict, tuple, Exception | None]:
    """One epoch: collect, update, and the evaluation when due. Returns its metrics row (with `once`, what the
    run's first row adds), its samples for a grid, and a reward server's failure in the evaluation, if any."""
    timer, start_s, start = Timer(run.pipe.transformer.device), time.time(), run.folder.epoch_start()
    with memory_advice(args, f"in epoch {epoch}"):
        try:
            batch, embeds, metrics, samples = collect(run.pipe, args, run.prompts, run.reward_fn, run.sigmas,
                                                      run.branch_steps, run.gen, timer, epoch)
        except RewardServerError as err:  # in every process at once: the epoch is dropped, its start saved
            run.folder.drop_epoch(start, state, err, epoch)
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
                    metrics.update(run.evaluation(args, run.folder.eval_grid(f"{epoch:06d}")))
                except RewardServerError as err:
                    outage = err
    # wall seconds of training: the evaluations' are not counted
    wall_s = state["wall_s"] + time.time() - start_s - timer.seconds.get("eval_s", 0.0)
    return dict(epoch=epoch, **metrics, **timer.metrics(), **once, nfe=nfe,
                wall_s=round(wall_s, 2)), samples, outage


def train(args: Args) -> list[dict]:
    """The whole run, resumable; returns the metrics rows of the epochs it ran. Under torchrun every process runs
    it on its share of each epoch's prompts, and the first writes everything."""
    with said_once():  # every setting, file, model and server checked before anything loads
        args, config, prompts, eval_prompts, note = preflight(finalize(args))
        device = init_distributed()
        pipe, params, optimizer, ema, reward_fn, eval_fn = setup(args, device)
    rank, world = rank_and_world()
    sigmas = sigma_grid(pipe.scheduler, args.steps, args.shift).to(device)  # s_0 = 1 > ... > s_T = 0
    branch_steps = parse_steps(args.branch_steps, args.steps)  # B
    cuts = [prompt_cuts(pipe, numbered, flag, t5_length(pipe))
            for numbered, flag in ((prompts, "--prompt-file"), (eval_prompts, "--eval-prompt-file"))]
    print0(*filter(None, [note, *cuts]), describe_epoch(epoch_size(args, branch_steps), args.prompts_per_epoch, world))
    with memory_advice(args, "in --compile's warm-up, at the run's largest calls"):
        args, compile_s = compiled(pipe, args, prompts[0][1])
    gen = torch.Generator(device).manual_seed(args.seed + rank)  # each process its own noise
    default = defaults(args.tiny) | METHODS[args.method] | {"compile": AUTO_COMPILE}
    folder = RunFolder(args, config, resume_command(args, world, default, __file__), pipe.transformer, params,
                       optimizer, ema, gen, t5_length(pipe))
    state = folder.restore()  # epoch 0, or where --resume's last checkpoint stands
    run = Run(pipe, params, optimizer, ema, reward_fn, eval_fn, sigmas, branch_steps,
              step_weights(args, sigmas, branch_steps), gen, folder, [p for _, p in prompts],
              [p for _, p in eval_prompts])
    evaluate_now = partial(run.evaluation, args) if run.eval_prompts else None
    # the first row this process writes: the base model's evaluation (a new run's) and the compile seconds
    once = folder.base(evaluate_now) if evaluate_now and state["epoch"] == 0 else {}
    once |= {"compile_s": round(compile_s, 2)} if compile_s is not None else {}
    rows = folder.pending(state, evaluate_now)  # an epoch saved while its evaluation's server was down
    spent = 0 < args.max_nfe <= state["nfe"]  # a resumed run that had already spent its --max-nfe
    bar = progress(range(state["epoch"], state["epoch"] if spent else args.epochs), desc="epochs", unit="epoch",
                   initial=state["epoch"], total=args.epochs)
    for epoch in bar:
        row, samples, outage = run_epoch(run, args, epoch, state, once)  # collect, update, evaluate when due
        rows.append(row)
        once = {}
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", refresh=False)
        last = epoch + 1 == args.epochs or 0 < args.max_nfe <= row["nfe"]
        state = dict(epoch=epoch + 1, metrics_rows=state["metrics_rows"] + 1, nfe=row["nfe"], wall_s=row["wall_s"])
        if outage:  # trained, not evaluated: saved with its row, which --resume completes; the run ends
            folder.keep_pending(row, samples, state, last, outage)
        folder.publish(row, samples, last)  # the log line, metrics.jsonl, grids, curves, the tracker
        stopping, failure = folder.stopping(), reward_failure(row, args.reward, args.eval_reward, f"in epoch {epoch}")
        if (epoch + 1) % args.save_every == 0 or last or stopping or failure:
            folder.save(state)
        folder.end_if(stopping, failure, epoch)  # a signal, or a reward that gave nothing: saved, then stopped
        if last:
            break
    folder.finish()
    return rows


# ======== Entry point: tyro makes the command line from Args =========================================================


TINY_WORLD = Path(__file__).parent / "tiny_world" / "pipeline"  # the tiny world's trained pipeline
AUTO_COMPILE = "on" if torch.cuda.is_available() else "off"  # --compile auto: on where the transformer is on CUDA


METHODS = {"tempflow": dict(rollout="branch", weighting="noise", group="seed", adv_std="group"),
           "flow_grpo": dict(rollout="sde", weighting="uniform", group="prompt", adv_std="global"),
           "branch_grpo": dict(rollout="tree", weighting="uniform", group="seed", adv_std="group",
                               split_steps="0,2,4,6")}


TINY = dict(  # --tiny (departure 12): the same loop on a CPU; bench/README.md gives the measurements behind each
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
    """The command line: tyro makes it from Args, docstrings and all; with --tiny, TINY's values are the defaults."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    default = Args(**TINY, tiny=True) if "--tiny" in argv else Args()
    return finalize(tyro.cli(Args, args=argv, default=default, description=__doc__.split("\n\n")[0]))


def finalize(args: Args) -> Args:
    """A copy of args with the method's presets and --compile auto resolved, every setting checked (one line naming
    the flag). train() calls it, so Args(...) from Python and the command line resolve and fail alike."""
    args = replace(args)
    check(not args.tiny or args.model != Args.model, "tiny=True without the tiny settings: use "
          "Args(**TINY, tiny=True, ...), as --tiny on the command line does")
    check(args.method in METHODS, f"--method {args.method!r} is unknown; choose one of {', '.join(METHODS)}")
    for key, value in METHODS[args.method].items():
        setattr(args, key, getattr(args, key) or value)
    check_settings(args)
    args.compile = AUTO_COMPILE if args.compile == "auto" else args.compile
    return args


def main(argv: list[str] | None = None):
    with said_once():
        args = parse_args(argv)
    try:
        train(args)
    finally:
        close_processes()


if __name__ == "__main__":
    main()
