"""DiffusionNFT (Zheng et al., arXiv 2509.16117; code NVlabs/DiffusionNFT), the forward-process baseline that
bench/README.md sets against the branching methods: no log-probabilities and no CFG in training, only clean samples
of the sampling policy, their rewards, and a flow-matching loss on the forward process.

    python bench/nft.py --tiny --prompt-file tiny_world/prompts.txt --out runs/nft          # the tiny world, CPU

Every tempflow_grpo.py flag means here what it means there where the method has it: the model, rewards and prompt
files, --seeds-per-prompt x --branches samples per prompt (a prompt's group; the official 24), --prompts-per-epoch,
--steps of the ODE rollout, --lr, --beta (the KL weight), --adv-clip, the LoRA, --optimizer-steps, evaluation,
--max-nfe, --out, --seed. --guidance defaults to 1 (CFG-free: sampling, training and evaluation) and --beta to
0.0001, as officially.
Its own: --nft-beta (beta, the step between the old and the trained policy), --decay-type (the old policy's
schedule), --timestep-fraction. A run neither resumes nor runs under torchrun.

Notation: x0 [B, C, H, W] a clean latent the sampling ("old") policy made, t in (0, 1] a noise level, x_t =
(1 - t) x0 + t eps the forward process at t; v, v_old, v_ref the trained policy's, the sampling policy's and the
base model's velocities at x_t; A a sample's advantage (tempflow_grpo.group_advantages over a prompt's samples,
with the epoch's std, as officially).
"""
import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
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


def old_decay(step: int, decay_type: int) -> float:
    """The old (sampling) policy's decay after `step` optimizer steps: old <- d old + (1 - d) live after each epoch;
    type 0 keeps it on-policy (d = 0), 1 grows d by 0.001 a step up to 0.5, 2 by 0.0075 after 75 steps up to 0.999
    (the official schedules)."""
    flat, rate, most = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, most)


@contextmanager
def weights(params: list, values: list):
    """`values` in place of the LoRA's parameters for a while (the old policy's forward), then the live ones."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, values):
            p.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, live):
                p.copy_(value)


def parse(argv: list[str]) -> tuple:
    """DiffusionNFT's own flags, then tempflow_grpo.py's (finalized) for the rest."""
    import tempflow_grpo as tg

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nft-beta", type=float, default=1.0, help="beta of the implicit policies (official: 1)")
    parser.add_argument("--decay-type", type=int, default=1, choices=(0, 1, 2), help="the old policy's schedule")
    parser.add_argument("--timestep-fraction", type=float, default=0.99,
                        help="the share of the T noise levels each sample trains at (official: 0.99)")
    nft, rest = parser.parse_known_args(argv)
    for flag, official in (("--guidance", "1"), ("--beta", "0.0001")):  # CFG-free; the official KL weight
        rest += [] if flag in rest else [flag, official]
    args = tg.parse_args(rest)
    if args.resume or "RANK" in os.environ:
        raise SystemExit("error: bench/nft.py runs in one process and from scratch: no --resume, no torchrun")
    if not (0 < nft.nft_beta and 0 < nft.timestep_fraction <= 1):
        raise SystemExit("error: --nft-beta must be above 0 and --timestep-fraction in (0, 1]")
    return nft, args


def train(argv: list[str] | None = None) -> list[dict]:
    """The DiffusionNFT run: per epoch, ODE samples of the old policy, their rewards and advantages, then
    --optimizer-steps AdamW steps of nft_loss over (sample, noise level) pairs, then the old policy's decay; metrics
    rows, evaluation and lora/ as tempflow_grpo.py writes them. Returns the rows."""
    import plumbing
    import tempflow_grpo as tg

    nft, args = parse(sys.argv[1:] if argv is None else argv)
    args, config, prompts, eval_prompts, _ = plumbing.preflight(args)
    pipe, params, optimizer, ema, reward_fn, eval_fn = tg.setup(args, plumbing.init_distributed())
    out, transformer = Path(args.out), pipe.transformer
    plumbing.write_config(out, dict(config, nft=vars(nft)))
    prompts, eval_prompts = [p for _, p in prompts], [p for _, p in eval_prompts]
    sigmas = tg.sigma_grid(pipe.scheduler, args.steps, args.shift)  # s_0 = 1 > ... > s_T = 0
    gen = torch.Generator().manual_seed(args.seed)
    old = [p.detach().clone() for p in params]  # the sampling policy, on-policy at first
    copies, per_prompt = tg.cfg_copies(args.guidance), args.seeds_per_prompt * args.branches
    trained_steps = max(1, int(args.steps * nft.timestep_fraction))
    grid = lambda name: out / "images" / f"eval_{name}.png"  # noqa: E731
    with tg.ema_weights(ema, params):
        base = tg.evaluate(pipe, eval_prompts, eval_fn, args, grid("base")) if eval_prompts else {}
    rows, nfe, wall_s, steps_done = [], 0, 0.0, 0
    for epoch in range(args.epochs):
        start = time.time()
        chosen = [prompts[j] for j in tg.drawn_prompts(len(prompts), args, epoch, gen)]
        embeds = tg.encode_prompts(pipe, chosen)
        rows_of = torch.arange(len(chosen)).repeat_interleave(per_prompt)  # [N] each sample's prompt
        noise = tg.initial_noise(pipe, len(rows_of), args.resolution, gen)
        with torch.no_grad(), weights(params, old), tg.autocast(transformer):
            velocity_fn = tg.sd3_velocity(transformer, embeds.take(rows_of.to(transformer.device)), args.guidance,
                                          args.max_batch)
            x0 = tg.ode_rollout(velocity_fn, noise, sigmas)  # [N, C, H, W] clean latents of the old policy
            images = torch.cat([tg.decode_latents(pipe, z) for z in x0.split(args.max_batch)])
        scores = reward_fn(images, [chosen[r] for r in rows_of.tolist()])
        advantages, zero_std = tg.group_advantages(scores["reward"], rows_of, args.adv_clip, global_std=True)
        r = optimality(advantages, args.adv_clip)
        # each sample's trained noise levels: the first of a random order of s_0 .. s_{T-1}
        levels = torch.stack([torch.randperm(args.steps, generator=gen)[:trained_steps] for _ in range(len(x0))])
        pairs = torch.stack([torch.arange(len(x0)).repeat_interleave(trained_steps), levels.flatten()], 1)
        pairs = pairs[torch.randperm(len(pairs), generator=gen)]
        per_call, totals = tg.rows_per_call(args.train_batch, args.guidance), {}
        for part in pairs.tensor_split(args.optimizer_steps):
            for chunk in part.split(per_call):
                n, t = chunk[:, 0], sigmas[chunk[:, 1]]
                eps = torch.randn(x0[n].shape, generator=gen, device=gen.device).to(x0.device)
                # x_t = (1 - t) x0 + t eps, the forward process (Sec. 3)
                x_t = (1 - t.view(-1, 1, 1, 1)) * x0[n] + t.view(-1, 1, 1, 1) * eps
                prompt = embeds.take(rows_of[n].to(transformer.device))
                with tg.autocast(transformer):
                    with torch.no_grad():
                        with weights(params, old):
                            v_old = tg.cfg_velocity(transformer, x_t, t, prompt, args.guidance)
                        with tg.lora_disabled(transformer):
                            v_ref = tg.cfg_velocity(transformer, x_t, t, prompt, args.guidance)
                    v = tg.cfg_velocity(transformer, x_t, t, prompt, args.guidance)
                loss, stats = nft_loss(v.float(), v_old.float(), v_ref.float(), x0[n], x_t, t, r[n], nft.nft_beta,
                                       args.beta, args.adv_clip)
                (loss * len(chunk) / len(part)).backward()
                for key, value in dict(stats, loss=loss.detach()).items():
                    totals[key] = totals.get(key, 0.0) + value.item() * len(chunk) / len(pairs)
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_done += 1
            if ema is not None:
                ema.step(params)  # every step, as the official EMA (decay 0.9)
        decay = old_decay(steps_done, nft.decay_type)
        with torch.no_grad():
            for o, p in zip(old, params):
                o.copy_(decay * o + (1 - decay) * p.detach())
        # rollout: T velocities per sample; training: v, v_old and (beta > 0) v_ref per (sample, noise level)
        nfe += copies * (len(x0) * args.steps + len(pairs) * (3 if args.beta > 0 else 2))
        wall_s += time.time() - start
        row = dict(epoch=epoch, **plumbing.reward_metrics(scores, rows_of, zero_std, len(pairs)), **totals,
                   old_decay=decay, nfe=nfe, wall_s=round(wall_s, 2))
        row |= {"base_" + k: v for k, v in base.items()} if epoch == 0 else {}
        last = epoch + 1 == args.epochs or 0 < args.max_nfe <= nfe
        if eval_prompts and ((epoch + 1) % args.eval_every == 0 or last):
            with tg.ema_weights(ema, params):
                row |= tg.evaluate(pipe, eval_prompts, eval_fn, args, grid(f"{epoch:06d}"))
        plumbing.log(row, out / "metrics.jsonl")
        rows.append(row)
        if last:
            break
    with tg.ema_weights(ema, params):
        (out / "lora").mkdir(parents=True, exist_ok=True)
        plumbing.save_lora(transformer, out / "lora")
    plumbing.plot_curves(rows, out / "curves.png")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    train()
