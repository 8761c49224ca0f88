"""DiffusionNFT (Zheng et al., arXiv 2509.16117; code NVlabs/DiffusionNFT), the forward-process baseline that
bench/README.md sets against the branching methods: no log-probabilities and no CFG in training, only clean samples
of the sampling policy, their rewards, and a flow-matching loss on the forward process.

Notation: x0 [B, C, H, W] a clean latent the sampling ("old") policy made, t in (0, 1] a noise level, x_t =
(1 - t) x0 + t eps the forward process at t; v, v_old, v_ref the trained policy's, the sampling policy's and the
base model's velocities at x_t; A a sample's group-normalised advantage (tempflow_grpo.group_advantages).

This file holds the loss (Sec. 3 of the paper, as the official code computes it); the loop that trains the tiny
world with it, and the equal-NFE study, come next.
"""
from torch import Tensor


def optimality(advantages: Tensor, adv_clip: float = 5.0) -> Tensor:
    """r in [0, 1], the probability that a sample is "optimal", from its advantage [B]: A clipped to [-c, c] and
    mapped linearly onto [0, 1], so A = 0 gives 1/2 (the official code's mapping)."""
    # r = (clip(A, -c, c) / c + 1) / 2
    return ((advantages.clamp(-adv_clip, adv_clip) / adv_clip + 1) / 2).clamp(0, 1)


def nft_loss(v: Tensor, v_old: Tensor, v_ref: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, r: Tensor,
             beta: float = 1.0, kl_beta: float = 1e-4, adv_clip: float = 5.0) -> tuple[Tensor, dict]:
    """DiffusionNFT's negative-aware flow-matching loss of B samples; v, v_old, v_ref, x0, x_t: [B, C, H, W];
    t, r: [B]. The implicit positive policy v+ = beta v + (1 - beta) v_old and the implicit negative one
    v- = (1 + beta) v_old - beta v are each fitted to x0 through their clean-latent prediction x_t - t v+-, weighted
    by r and 1 - r: a sample with r = 1 pulls v toward the velocity that made it, one with r = 0 pushes v away
    (v- moves opposite to v). Each squared error is divided by its own mean absolute error, held constant (the
    official code's adaptive weighting), and the policy term is scaled by adv_clip / beta as officially; plus
    kl_beta times v's mean squared distance from the base model's. Returns the loss and its two terms' means."""
    t, v_old, v_ref = t.view(-1, 1, 1, 1), v_old.detach(), v_ref.detach()
    # v+ = beta v + (1 - beta) v_old,  v- = (1 + beta) v_old - beta v
    fitted = []
    for v_implicit in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        # e = x_t - t v+- - x0, the error of the clean latent the policy predicts; L+- = mean_CHW e^2 / sg(mean_CHW |e|)
        error = x_t - t * v_implicit - x0
        scale = error.detach().abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        fitted.append((error**2 / scale).mean(dim=(1, 2, 3)))  # [B]
    # L = mean_B [adv_clip / beta (r L+ + (1 - r) L-) + kl_beta mean_CHW (v - v_ref)^2]
    policy = adv_clip / beta * (r * fitted[0] + (1 - r) * fitted[1])
    kl = ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
    return (policy + kl_beta * kl).mean(), dict(policy_loss=policy.mean().detach(), kl=kl.mean().detach())
