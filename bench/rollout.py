"""The rollout against its limit, as ratios measured in one run.

    python bench/rollout.py                  # the tiny world on this machine's CPU -> bench/results/rollout.md
    python bench/rollout.py --arch sd35m     # SD3.5-medium's architecture, random weights, bf16, on a GPU
    python bench/rollout.py --arch sd35m --reduced --repeats 1   # its miniature: a dry run on a CPU

For the reference setting (T = 10, B = 0..8, G = 6, S = 4 seeds of one prompt) it reports:
  - transformer evaluations counted by a forward hook against the cost formula, for both rollouts;
  - wall time per sample-NFE of the branching rollout against the SDE rollout (target: within 1.1x);
  - the wavefront-batched branching rollout against a one-branch-at-a-time loop over the same work (target: 5x);
  - peak memory of each (CUDA: max allocated; CPU: peak resident memory of a fresh process per variant, the
    model and libraries included);
  - seconds per epoch: the branching rollout plus one epoch of training on its transitions (no decoding or reward).
Speed and memory depend on shapes, not weights, so sd35m builds SD3.5-medium's transformer with random weights
(bench/sd35m.py) and random prompt embeddings of the real shapes (77 CLIP + 128 T5 tokens).
"""
import argparse
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tempflow_grpo as tg  # noqa: E402
import tiny_world  # noqa: E402
from bench import sd35m  # noqa: E402


def setup(arch: str, resolution: int, n: int, reduced: bool = False):
    """(transformer, prompt embeddings for n rows, n initial noises [n, C, H, W], the T = 10 grid, device)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arch == "sd35m":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        config = sd35m.configs(reduced)["transformer"]
        with sd35m.building_on(device, dtype):
            transformer = SD3Transformer2DModel(**config).eval().requires_grad_(False)
        tokens, width, pooled = sd35m.CLIP_TOKENS + tg.T5_TOKENS, config["joint_attention_dim"], \
            config["pooled_projection_dim"]
        embeds = tg.PromptEmbeds(torch.randn(1, tokens, width), torch.randn(1, pooled), torch.randn(1, tokens, width),
                                 torch.randn(1, pooled))
        embeds = tg.PromptEmbeds(*(t.to(device, dtype) for t in embeds))
        scheduler, side, channels = FlowMatchEulerDiscreteScheduler(shift=3.0), resolution // 8, 16
    else:
        pipe = tiny_world.build_tiny_pipeline(pretrained=tiny_world.TINY_WORLD.exists()).to(device)
        transformer, embeds = pipe.transformer, tg.encode_prompts(pipe, ["two red circles"])
        scheduler, side, channels = pipe.scheduler, resolution // pipe.vae_scale_factor, 4
    noise = torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    sigmas = tg.sigma_grid(scheduler, 10).to(device)
    return transformer, embeds.take(torch.zeros(n, dtype=torch.long)), noise, sigmas, device


def one_branch_at_a_time(transformer, noise, prompts, sigmas, branch_steps, branches, gen):
    """The same work as the branching rollout, one latent per transformer call: each trunk alone, and each
    branch finished alone as soon as it is drawn."""
    for n in range(len(noise)):
        x, prompt = noise[n:n + 1], prompts.take([n])
        for i in range(max(branch_steps) + 1):
            v = tg.cfg_velocity(transformer, x, sigmas[i:i + 1], prompt, 4.5)
            for _ in range(branches if i in branch_steps else 0):
                y = tg.sde_step(x, v, sigmas, i, 0.7, generator=gen)[0]
                tg.ode_rollout(tg.sd3_velocity(transformer, prompt, 4.5), y, sigmas, start=i + 1)
            x = tg.ode_step(x, v, sigmas, i)


def run_variant(arch: str, resolution: int, variant: str, max_batch: int, repeats: int = 3, reduced: bool = False,
                seeds: int = 4) -> dict:
    """Time one variant (the fastest of `repeats`, after a warm-up call) and count its transformer evaluations."""
    # S seeds of one prompt; the SDE rollout draws S*G independent samples of it
    transformer, prompts, noise, sigmas, device = setup(arch, resolution, seeds * (6 if variant == "sde" else 1),
                                                        reduced)
    branch_steps, calls = list(range(9)), []  # latents per transformer call, CFG's halves counted
    transformer.register_forward_hook(lambda m, a, kw, out: calls.append(len(kw["hidden_states"])), with_kwargs=True)
    autocast = tg.autocast(transformer)
    with torch.no_grad(), autocast:
        tg.cfg_velocity(transformer, noise[:1], sigmas[:1], prompts.take([0]), 4.5)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for repeat in range(repeats):
        gen = torch.Generator(device).manual_seed(repeat)
        start = time.perf_counter()
        calls.clear()
        with torch.no_grad(), autocast:
            if variant == "one_at_a_time":
                one_branch_at_a_time(transformer, noise, prompts, sigmas, branch_steps, 6, gen)
            else:
                out = tg.rollout(tg.sd3_velocity(transformer, prompts, 4.5, max_batch), noise, sigmas,
                                 "sde" if variant == "sde" else "branch", branch_steps, 0.7, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = dict(variant=variant, seconds=min(times), nfe=sum(calls), peak_mb=(
        torch.cuda.max_memory_allocated() if device.type == "cuda" else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20)  # the rollout's, before any training
    if variant == "branch":
        result["transitions"] = len(out.x)
        result["train_seconds"] = train_seconds(transformer, out, prompts, sigmas, max_batch, device)
    return result


def train_seconds(transformer, out, prompts, sigmas, max_batch, device) -> float:
    """One epoch of training (2 optimizer steps, CFG and the KL reference forward) on the rollout's transitions."""
    params = tg.add_lora(transformer, 32)
    batch = tg.Batch(out.x, out.y, out.log_prob, out.step, out.image_noise[out.image],
                     torch.randn(len(out.x), device=device))
    args = tg.Args(max_batch=max_batch, train_batch=max_batch, gradient_checkpointing=device.type == "cuda")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    start = time.perf_counter()
    tg.update(transformer, params, optimizer, batch, prompts, sigmas, torch.ones(10), args,
              torch.Generator(device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def in_fresh_process(*args) -> dict:
    """Run a variant in a new process, so that its peak resident memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_variant, *args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["tiny", "sd35m"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny and --reduced), 512 (sd35m)")
    parser.add_argument("--max-batch", type=int, default=None, help="default: 512 (tiny), 48 (sd35m)")
    parser.add_argument("--reduced", action="store_true", help="sd35m's miniature (bench/sd35m.py): a dry run")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each variant (the fastest counts)")
    parser.add_argument("--seeds", type=int, default=4, help="S, initial noises of the one prompt (reference: 4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rollout.md")
    args = parser.parse_args()
    resolution = args.resolution or (512 if args.arch == "sd35m" and not args.reduced else 64)  # the miniature's
    # position embeddings reach 16 patches, 64 px
    max_batch = args.max_batch or (48 if args.arch == "sd35m" else 512)
    results = {v: in_fresh_process(args.arch, resolution, v, max_batch, args.repeats, args.reduced, args.seeds)
               for v in ("branch", "sde", "one_at_a_time")}
    formula = {v: args.seeds * tg.rollout_nfe(v, 10, list(range(9)), 6, 4.5) for v in ("branch", "sde")}
    formula["sde"] *= 6  # S*G independent samples
    per_nfe = {v: r["seconds"] / r["nfe"] for v, r in results.items()}
    threads = f"cpu, {torch.get_num_threads()} threads"
    device = f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else threads
    arch = args.arch + (" (reduced)" if args.reduced else "")
    command = " ".join(["python bench/rollout.py", *sys.argv[1:]])
    lines = [f"# Rollout benchmark: {arch}, {resolution} px, T = 10, B = 0..8, G = 6, S = {args.seeds}, one prompt",
             f"\nMeasured by `{command}` on {device}, torch {torch.__version__}.\n",
             "| rollout | NFE counted | formula | seconds | ms per NFE | peak memory (MB) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v, r in results.items():
        lines.append(f"| {v} | {r['nfe']} | {formula.get(v, formula['branch'])} | {r['seconds']:.2f} | "
                     f"{1000 * per_nfe[v]:.3f} | {r['peak_mb']:.0f} |")
    branch = results["branch"]
    speedup = results["one_at_a_time"]["seconds"] / branch["seconds"]
    lines += ["", f"- time per sample-NFE, branch / sde: **{per_nfe['branch'] / per_nfe['sde']:.2f}x** (target <= 1.1)",
              f"- wavefront speed-up over one branch at a time: **{speedup:.1f}x** (target >= 5)",
              f"- seconds per epoch (branching rollout + training on its {branch['transitions']} transitions, "
              f"no decode or reward): **{branch['seconds'] + branch['train_seconds']:.1f} s**"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
