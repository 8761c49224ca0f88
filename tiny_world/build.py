"""The tiny world: coloured shapes with captions, and a tiny SD3 pipeline trained on them from scratch.

    python -m tiny_world.build                 # writes tiny_world/pipeline; see tiny_world/README.md for timings

Captions come from a small grammar with two categories, as in GenEval:
    position   `a {color} {shape} on the {left|right|top|bottom}`   one shape, wholly in that half
    counting   `{one|two|three} {color} {shape}[s]`                 that many shapes, anywhere, not touching
The pipeline is build_tiny_pipeline's random one, trained in two stages: the VAE as an autoencoder on the images
(its latent shift and scale measured and stored in its config), then the transformer with the flow-matching
objective (x_t = (1 - t) x_0 + t x_1, target x_1 - x_0) on captions encoded by the pipeline's own encode_prompt,
the empty caption for a tenth of each batch so that guidance works. The text encoders stay as initialised.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import tempflow_grpo as tg
import tiny_world
from reward import BACKGROUND, COLORS, POSITIONS, SHAPES, WORLD_COLORS, geneval_checks

SIZE = 64
COUNT_WORDS = ("one", "two", "three")


# ---------------------------------------------------------------- the captioned image set

def layout(rng: np.random.Generator) -> tuple[str, list[tuple]]:
    """A caption and its objects (shape, colour, centre x, centre y, radius), half position, half counting."""
    color, shape = rng.choice(WORLD_COLORS), rng.choice(SHAPES)
    if rng.random() < 0.5:
        position, r = rng.choice(POSITIONS), rng.uniform(6, 10)
        near, far = r + 2, SIZE / 2 - r - 2  # wholly inside its half, off the border
        x, y = rng.uniform(near, SIZE - near, size=2)
        if position in ("left", "right"):
            x = rng.uniform(near, far) if position == "left" else SIZE - rng.uniform(near, far)
        else:
            y = rng.uniform(near, far) if position == "top" else SIZE - rng.uniform(near, far)
        return f"a {color} {shape} on the {position}", [(shape, color, x, y, r)]
    n = int(rng.integers(1, 4))
    objects = []
    while len(objects) < n:  # rejection sampling of non-touching places; three small shapes always fit
        r = rng.uniform(5, 8)
        x, y = rng.uniform(r + 2, SIZE - r - 2, size=2)
        if all(math.hypot(x - ox, y - oy) > 1.25 * (r + orr) + 3 for _, _, ox, oy, orr in objects):
            objects.append((shape, color, x, y, r))
    return f"{COUNT_WORDS[n - 1]} {color} {shape}{'s' if n > 1 else ''}", objects


def draw(objects: list[tuple], size: int = SIZE, supersample: int = 4) -> np.ndarray:
    """Anti-aliased [size, size, 3] image in [0, 1]; a square has the area of the circle of the same radius."""
    grid = (np.arange(size * supersample) + 0.5) / supersample
    x, y = np.meshgrid(grid, grid)
    image = np.broadcast_to(np.array(BACKGROUND), (size * supersample, size * supersample, 3)).copy()
    for shape, color, cx, cy, r in objects:
        half = r * math.sqrt(math.pi) / 2
        inside = (np.hypot(x - cx, y - cy) <= r) if shape == "circle" else (
            (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half))
        image[inside] = COLORS[color]
    return image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n images [n, 3, 64, 64] in [0, 1] and their captions, the same for the same seed."""
    rng = np.random.default_rng(seed)
    captions, images = [], []
    for _ in range(n):
        caption, objects = layout(rng)
        captions.append(caption)
        images.append(draw(objects))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float(), captions


def all_captions() -> dict[str, list[str]]:
    """Every caption of the grammar, by category."""
    position = [f"a {c} {s} on the {p}" for c in WORLD_COLORS for s in SHAPES for p in POSITIONS]
    counting = [f"{w} {c} {s}{'s' if n > 1 else ''}" for n, w in enumerate(COUNT_WORDS, 1)
                for c in WORLD_COLORS for s in SHAPES]
    return dict(position=position, counting=counting)


# ---------------------------------------------------------------- training

def schedule(step: int, steps: int, warmup: int = 100) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator):
    """Autoencoder training: reconstruction MSE plus a small KL to keep the latent Gaussian-like."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"vae step {step} | loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled latent means of the images [n, C, h, w]."""
    return torch.cat([vae.encode(images[i:i + batch] * 2 - 1).latent_dist.mode() for i in range(0, len(images), batch)])


def train_transformer(pipe, latents: torch.Tensor, captions: list[str], steps: int, batch: int, lr: float,
                      gen: torch.Generator):
    """Flow matching on scaled latents x_0: x_t = (1 - t) x_0 + t x_1, predict x_1 - x_0, t on the sampler's shift."""
    unique = sorted(set(captions))
    embeds = tg.encode_prompts(pipe, unique)
    caption_index = torch.tensor([unique.index(c) for c in captions])
    shift = pipe.scheduler.config.shift
    model = pipe.transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        rows = torch.randint(len(latents), (batch,), generator=gen)
        x0, x1 = latents[rows], torch.randn(latents[rows].shape, generator=gen)
        u = torch.rand(batch, generator=gen)
        t = shift * u / (1 + (shift - 1) * u)  # where the shifted sampling grid spends its steps
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * x1
        prompts = embeds.take(caption_index[rows])
        drop = (torch.rand(batch, generator=gen) < 0.1).view(-1, 1, 1)  # the empty caption, for guidance
        v = model(hidden_states=xt, encoder_hidden_states=torch.where(drop, prompts.neg_embeds, prompts.embeds),
                  pooled_projections=torch.where(drop[:, 0], prompts.neg_pooled, prompts.pooled),
                  timestep=1000 * t, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, x1 - x0)
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"transformer step {step} | loss {loss.item():.4f}", flush=True)
    model.eval().requires_grad_(False)


# ---------------------------------------------------------------- how well the world follows its captions

@torch.no_grad()
def evaluate(pipe, seeds: int, steps: int = 10, guidance: float = 4.5) -> dict:
    """Per category, the fraction of ODE samples (every caption x seeds) passing each GenEval-style check, and all."""
    report = {}
    for category, captions in all_captions().items():
        prompts = [c for c in captions for _ in range(seeds)]
        noise = tg.initial_noise(pipe, len(prompts), SIZE, torch.Generator().manual_seed(0))
        images = tg.ode_images(pipe, tg.encode_prompts(pipe, prompts), noise, steps, guidance)
        images = images.permute(0, 2, 3, 1).numpy()
        checks = [geneval_checks(image, prompt) for image, prompt in zip(images, prompts)]
        report[category] = {k: float(np.mean([c[k] for c in checks])) for k in checks[0]}
        report[category]["all"] = float(np.mean([all(c.values()) for c in checks]))
    return report


def build(out: Path, seed: int, images: int, vae_steps: int, steps: int, batch: int, lr: float, eval_seeds: int):
    start = time.time()
    pipe = tiny_world.build_tiny_pipeline(seed)
    gen = torch.Generator().manual_seed(seed)
    data, captions = make_dataset(images, seed)
    train_vae(pipe.vae, data, vae_steps, batch=32, lr=1e-3, gen=gen)
    latents = encode_images(pipe.vae, data)
    shift, scale = latents.mean().item(), 1 / latents.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    print(f"latent shift {shift:.4f} scale {scale:.4f} | {time.time() - start:.0f} s", flush=True)
    train_transformer(pipe, (latents - shift) * scale, captions, steps, batch, lr, gen)
    pipe.save_pretrained(out)
    report = dict(seconds=round(time.time() - start), evaluation=evaluate(pipe, eval_seeds) if eval_seeds else {})
    (out / "build.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return pipe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "pipeline", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial weights and training")
    parser.add_argument("--images", type=int, default=20000, help="size of the captioned image set")
    parser.add_argument("--vae-steps", type=int, default=1000, help="autoencoder steps (batch 32)")
    parser.add_argument("--steps", type=int, default=3000, help="flow-matching steps of the transformer")
    parser.add_argument("--batch", type=int, default=128, help="flow-matching batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="flow-matching peak learning rate")
    parser.add_argument("--eval-seeds", type=int, default=8, help="ODE samples per caption in the final report")
    args = parser.parse_args(argv)
    return build(args.out, args.seed, args.images, args.vae_steps, args.steps, args.batch, args.lr, args.eval_seeds)


if __name__ == "__main__":
    main()
