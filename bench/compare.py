"""Equal-NFE studies on the tiny world: TempFlow-GRPO against Flow-GRPO, and the questions a user asks next.

    python bench/compare.py              # compare: the four variants on `color`               (23 min on 2 cores)
    python bench/compare.py geneval      # the four on geneval_toy, held-out captions          (22 min)
    python bench/compare.py schedules    # noise-aware weights or none on other sigma grids   (20 min)
    python bench/compare.py branching    # cheaper branch-step sets                            (24 min)
    python bench/compare.py batch        # prompts per epoch                                   (25 min)
    python bench/compare.py hacking      # train on `color`, judge by geneval_toy held out     (24 min)
    python bench/compare.py samplers     # {SDE, CPS} x branch finishes, on color and geneval_toy (2.4 hours)
    python bench/compare.py branching_methods  # the three methods on color and geneval_toy (20 min, given samplers')
    python bench/compare.py forward_process    # and DiffusionNFT (bench/nft.py), color and geneval_toy (30 min)

Each -> bench/results/<study>.md and <study>.png. Each run trains the tiny world (`--tiny`) until --budget latents
have gone through the transformer (rollouts and updates, CFG's halves counted; evaluation excluded), evaluated
every 5 epochs by 10-step ODE samples of the evaluation captions from noise fixed by the seed (the EMA weights).
A run is measured by its gain over the base model under that same noise. Curves are put on a common NFE grid by
linear interpolation, then averaged over seeds; a variant's final value is its curve's at the budget. Beside NFE,
every curve also runs against estimated GPU seconds at SD3.5-medium's shapes: each epoch's rollout forwards, other
no-grad forwards (the KL reference, DiffusionNFT's old policy), trained latents and images scored, counted from the
run's own rows, times unit costs from one epoch measured on an H200 (or --gpu-epoch's): an estimate. Runs live
in runs/bench/<setting>/<flags>-seed<n>, shared between studies (TempFlow-GRPO on `color` is trained once for
four of them); a run with a smaller budget than asked is resumed up to it, so `--budget` can extend a study.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import reward  # noqa: E402
import tempflow_grpo as tg  # noqa: E402

WORLD = ROOT / "tiny_world"
PROMPTS, TRAIN, HELDOUT = WORLD / "prompts.txt", WORLD / "prompts_train.txt", WORLD / "prompts_heldout.txt"
TEMPFLOW, FLOW_GRPO, BRANCH_GRPO = ["--method", "tempflow"], ["--method", "flow_grpo"], ["--method", "branch_grpo"]
UNIFORM = ["--weighting", "uniform"]
FOUR = {"Flow-GRPO": FLOW_GRPO, "TempFlow-GRPO": TEMPFLOW, "branching, no weighting": TEMPFLOW + UNIFORM,
        "weighting, no branching": FLOW_GRPO + ["--weighting", "noise"]}  # Flow-GRPO first: the reference
BRANCHING = {"Flow-GRPO": FLOW_GRPO, "TempFlow-GRPO": TEMPFLOW, "BranchGRPO": BRANCH_GRPO,
             "BranchGRPO, width-pruned (2 + 2 leaves)": BRANCH_GRPO + ["--prune-width", "2"]}
NFT = ["--nft"]  # bench/nft.py's DiffusionNFT in place of tempflow_grpo.py
FORWARD = {"Flow-GRPO": FLOW_GRPO, "TempFlow-GRPO": TEMPFLOW,  # the samplers study's best cheaper setting next
           "TempFlow-GRPO, steps 0-3, F = 2": TEMPFLOW + ["--branch-steps", "0-3", "--finish-steps", "2"],
           "BranchGRPO": BRANCH_GRPO, "DiffusionNFT": NFT}


@dataclass
class Study:
    """Panels of variants (name -> flags); each panel's first variant is the one the others are measured against."""
    question: str
    panels: dict[str, dict[str, list[str]]]
    reward: str = "color"
    prompts: Path = PROMPTS
    eval_prompts: Path = PROMPTS
    eval_reward: str = ""
    eval_samples: int = 1  # ODE samples per evaluation caption, each from its own noise
    budget: int = 60_000
    keys: tuple = ("eval_reward",)
    weights: bool = False  # draw each panel's noise-aware weights under it (their flags set the grid)
    transitions: bool = False  # also the transitions each variant trained on within the budget


def label(study: Study, key: str) -> str:
    """What a metrics key measures in this study."""
    spec = study.eval_reward or study.reward
    return {"eval_reward": f"eval {reward.parse_spec(spec)[0][0]}", "kl": "KL to the base (training)"}.get(
        key, key.replace("_", " "))


def sampler_panel(*extra: str) -> dict[str, list[str]]:
    """Flow-GRPO with the SDE (the reference) and with CPS, then TempFlow-GRPO with either sampler, each branch
    finished on the whole remaining grid or by at most 2 or 1 ODE steps, under the extra flags."""
    variants = {"Flow-GRPO, sde": FLOW_GRPO, "Flow-GRPO, cps": FLOW_GRPO + ["--sampler", "cps"]}
    for sampler in ("sde", "cps"):
        for finish in (0, 2, 1):
            name = f"TempFlow-GRPO, {sampler}, " + (f"F = {finish}" if finish else "full finish")
            variants[name] = TEMPFLOW + list(extra) + ["--sampler", "cps"] * (sampler == "cps") + \
                ["--finish-steps", str(finish)] * (finish > 0)
    return variants


def weighting_panel(*extra: str) -> dict[str, list[str]]:
    """TempFlow-GRPO with uniform weights (the reference) and with noise-aware ones, under the extra flags."""
    return {"uniform": TEMPFLOW + UNIFORM + list(extra), "noise-aware": TEMPFLOW + list(extra)}


STUDIES = {
    "compare": Study("TempFlow-GRPO, Flow-GRPO and each half of TempFlow at equal NFE, on `color`",
                     {"": FOUR}, budget=120_000),
    "geneval": Study("the four variants on the GenEval-style reward, trained on 40 captions and evaluated on 16 "
                     "held out (both categories in each)",
                     {"": FOUR}, reward="geneval_toy", prompts=TRAIN, eval_prompts=HELDOUT, eval_samples=4,
                     budget=120_000),
    "schedules": Study("TempFlow-GRPO with noise-aware weights or uniform ones, on other sigma grids",
                       {"shift 3, T = 10 (SD3.5's)": weighting_panel(), "shift 1": weighting_panel("--shift", "1"),
                        "shift 6": weighting_panel("--shift", "6"), "T = 6": weighting_panel("--steps", "6")},
                       weights=True),
    "branching": Study("which steps to branch, at equal NFE: all of 0..8, the early ones, every other one, the "
                       "first two",
                       {"all, 0-8": weighting_panel(), "early, 0-3": weighting_panel("--branch-steps", "0-3"),
                        "every other, 0,2,4,6,8": weighting_panel("--branch-steps", "0,2,4,6,8"),
                        "first two, 0-1": weighting_panel("--branch-steps", "0-1")},
                      weights=True),
    "batch": Study("prompts per epoch at equal NFE (TempFlow-GRPO; --tiny's default is 4, the reference 48)",
                   {"": {f"{p} prompts": TEMPFLOW + ["--prompts-per-epoch", str(p)] * (p != 4)
                         for p in (4, 2, 8, 32)}}, budget=120_000),
    "hacking": Study("training on `color`, which a model can satisfy by painting the named colour, judged by "
                     "geneval_toy on held-out captions",
                     {"": {"Flow-GRPO": FLOW_GRPO, "TempFlow-GRPO": TEMPFLOW}}, prompts=TRAIN, eval_prompts=HELDOUT,
                     eval_samples=4, eval_reward="geneval_toy,color:0", budget=120_000,
                     keys=("eval_reward", "eval_color", "kl")),
    "samplers": Study("CPS against the SDE, and branches finished by fewer ODE steps, at equal NFE, on `color`",
                      {"branch steps 0-8": sampler_panel(), "branch steps 0-3": sampler_panel("--branch-steps", "0-3")},
                      budget=60_000),
    "samplers_geneval": Study("CPS against the SDE, and branches finished by fewer ODE steps, at equal NFE, on the "
                              "GenEval-style reward, trained on 40 captions and evaluated on 16 held out",
                              {"branch steps 0-8": sampler_panel(),
                               "branch steps 0-3": sampler_panel("--branch-steps", "0-3")},
                              reward="geneval_toy", prompts=TRAIN, eval_prompts=HELDOUT, eval_samples=4,
                              budget=60_000),
    "branching_methods": Study("TempFlow-GRPO's one-step branches against BranchGRPO's tree (and Flow-GRPO), at "
                               "equal NFE, on `color`", {"": BRANCHING}, budget=60_000, transitions=True),
    "branching_methods_geneval": Study("the three methods at equal NFE on the GenEval-style reward, trained on 40 "
                                       "captions and evaluated on 16 held out", {"": BRANCHING},
                                       reward="geneval_toy", prompts=TRAIN, eval_prompts=HELDOUT, eval_samples=4,
                                       budget=60_000, transitions=True),
    "forward_process": Study("the branching methods against DiffusionNFT, which trains on the forward process from "
                             "clean samples, at equal NFE, on `color`", {"": FORWARD}, budget=60_000, transitions=True),
    "forward_process_geneval": Study("the same five at equal NFE on the GenEval-style reward, trained on 40 captions "
                                     "and evaluated on 16 held out", {"": FORWARD}, reward="geneval_toy",
                                     prompts=TRAIN, eval_prompts=HELDOUT, eval_samples=4, budget=60_000,
                                     transitions=True),
}
ALSO = {"samplers": ["samplers_geneval"], "branching_methods": ["branching_methods_geneval"],
        "forward_process": ["forward_process_geneval"]}  # twins, other reward


def heldout_split(per_category: int = 8, seed: int = 0):
    """tiny_world/prompts_{train,heldout}.txt: `per_category` captions of each category held out at random."""
    captions = PROMPTS.read_text().split("\n")[:-1]
    held = set()
    for category in ([c for c in captions if " on the " in c], [c for c in captions if " on the " not in c]):
        held.update(random.Random(seed).sample(category, per_category))
    TRAIN.write_text("".join(c + "\n" for c in captions if c not in held))
    HELDOUT.write_text("".join(c + "\n" for c in captions if c in held))


def eval_file(study: Study, root: Path, write: bool = False) -> Path:
    """The evaluation prompts, each caption written eval_samples times in a row (one noise per line)."""
    if study.eval_samples == 1:
        return study.eval_prompts
    path = root / f"{study.eval_prompts.stem}_x{study.eval_samples}.txt"
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        captions = plumbing.read_prompts(str(study.eval_prompts))
        path.write_text("".join((caption + "\n") * study.eval_samples for caption in captions))
    return path


def run_folder(study: Study, flags: list[str], seed: int, root: Path) -> Path:
    """One folder per (reward, prompts, evaluation, flags, seed): studies that need the same run share it."""
    setting = "_".join([study.reward, study.prompts.stem, eval_file(study, root).stem] +
                       ([f"eval-{study.eval_reward}"] if study.eval_reward else []))
    name = "_".join(flag.lstrip("-") for flag in flags) or "default"
    safe = lambda text: re.sub(r"[^\w.+-]", "+", text)  # noqa: E731
    return root / safe(setting) / f"{safe(name)}-seed{seed}"


def spent(out: Path) -> int:
    rows = plumbing.read_rows(out / "metrics.jsonl")
    return rows[-1]["nfe"] if rows else 0


def run(study: Study, flags: list[str], seed: int, args) -> Path:
    """One training run in its own process (one thread each, --jobs at a time), resumed if it has spent less."""
    out = run_folder(study, flags, seed, args.runs)
    if spent(out) >= args.budget:
        return out
    nft = flags[:1] == NFT  # DiffusionNFT's runs do not resume: a shorter one is run again
    if nft and out.exists():
        shutil.rmtree(out)
    script = ROOT / "bench" / "nft.py" if nft else ROOT / "tempflow_grpo.py"
    cmd = [sys.executable, str(script), "--tiny", "--reward", study.reward, "--prompt-file", str(study.prompts),
           "--eval-prompt-file", str(eval_file(study, args.runs)), "--eval-every", "5",
           "--eval-steps", "10", "--max-nfe", str(args.budget), "--epochs", "100000", "--seed", str(seed),
           "--save-every", "1000", "--image-every", "1000", "--out", str(out), *flags[nft:]]
    cmd += ["--resume"] if (out / "config.json").exists() else []
    cmd += ["--eval-reward", study.eval_reward] if study.eval_reward else []
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


# One epoch of tempflow_grpo.py at the reference settings, 1 prompt (4 seeds, T = 10, B = 0..8, G = 6, CFG, beta > 0),
# measured on one H200 at SD3.5-medium's shapes: bf16, 512 px, eager, random weights (bench/README.md, "One GPU")
H200_EPOCH = dict(nfe=3096, transitions=216, images=216, sample_s=26.22, score_s=8.79, train_s=24.36)


class Costs(NamedTuple):
    """Seconds per unit of work on the GPU an epoch row was measured on."""
    forward: float  # one latent through the transformer without gradients: rollout, KL reference, old policy
    trained: float  # one latent trained: its forward with gradients and its backward
    image: float  # one image decoded and scored


def forwards(row: dict, nfe_before: float, config: dict) -> tuple[float, float, float]:
    """An epoch row's transformer evaluations as (rollout, other no-grad, trained) latents. A trained transition
    is CFG's halves with gradients, plus as many without for the KL's reference (beta > 0) and for DiffusionNFT's
    old policy (bench/nft.py); the rest of the epoch's evaluations are the rollout's."""
    copies = tg.cfg_copies(config["guidance"])
    trained = row["transitions"] * copies
    frozen = trained * ((config["beta"] > 0) + ("nft" in config))
    return row["nfe"] - nfe_before - trained - frozen, frozen, trained


def unit_costs(row: dict) -> Costs:
    """Costs from one measured epoch at the reference settings: its sampling seconds per rollout forward, its
    decoding and scoring seconds per image, and its training seconds per transition less the reference forwards,
    taken to cost what a rollout forward costs (an assumption: their micro-batches differ)."""
    rollout, frozen, trained = forwards(row, 0, dict(guidance=tg.Args.guidance, beta=tg.Args.beta))
    forward = row["sample_s"] / rollout
    return Costs(forward, (row["train_s"] - frozen * forward) / trained, row["score_s"] / row["images"])


def gpu_seconds(rows: list[dict], config: dict, costs: Costs) -> np.ndarray:
    """Each epoch's end as estimated GPU seconds since the start: its forwards, trained latents and images at
    `costs` (evaluation, outside the NFE budget, left out as well)."""
    seconds, nfe = [], 0
    for row in rows:
        rollout, frozen, trained = forwards(row, nfe, config)
        seconds.append((rollout + frozen) * costs.forward + trained * costs.trained + row["images"] * costs.image)
        nfe = row["nfe"]
    return np.cumsum(seconds)


def measured_costs(path: Path | None, step: str = "") -> tuple[Costs, str]:
    """Unit costs and where they come from: the H200's epoch without a path, else the first epoch row of a .jsonl
    (bench/gpu.py's rows, each named by its step) whose step is `step`, if given. ValueError if there is none."""
    if path is None:
        return unit_costs(H200_EPOCH), "one eager epoch on an H200 (bench/README.md)"
    try:
        rows = [row for row in plumbing.read_rows(path) if "sample_s" in row and step in ("", row.get("step"))]
    except (OSError, ValueError):  # a folder, unreadable, not JSON lines
        rows = []
    if not rows:
        raise ValueError(f"--gpu-epoch {path}: no epoch row (a train() metrics row with sample_s)"
                         + f" whose step is {step!r} (--gpu-step)" * bool(step))
    return unit_costs(rows[0]), f"the epoch measured in {path}" + f" (step {step!r})" * bool(step)


def curve(out: Path, key: str, costs: Costs) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(nfe, wall_s, estimated GPU s at `costs`, value of key): the base model's at 0 (a KL of 0), then at every
    epoch that logged it."""
    rows = plumbing.read_rows(out / "metrics.jsonl")
    gpu_s = gpu_seconds(rows, json.loads((out / "config.json").read_text()), costs)
    points = [(0.0, 0.0, 0.0, rows[0].get("base_" + key, 0.0))] + [
        (r["nfe"], r["wall_s"], s, r[key]) for r, s in zip(rows, gpu_s) if key in r]
    return tuple(np.array(column, dtype=float) for column in zip(*points))


def trained(out: Path, budget: int) -> int:
    """The transitions a run trained on in its epochs up to the one that spent `budget` evaluations."""
    total = 0
    for row in plumbing.read_rows(out / "metrics.jsonl"):
        total += row["transitions"]
        if row["nfe"] >= budget:
            break
    return total


def first_reach(grid: np.ndarray, mean: np.ndarray, target: float) -> float | None:
    hit = np.nonzero(mean >= target)[0]
    return float(grid[hit[0]]) if len(hit) else None


def panel_weights(flags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(s_k, w_k) of a run's trained steps under its flags, as the run computes them."""
    args = tg.parse_args(["--tiny", "--prompt-file", str(PROMPTS), *flags])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.model, subfolder="scheduler")
    sigmas = tg.sigma_grid(scheduler, args.steps, args.shift)
    steps = plumbing.parse_steps(args.branch_steps, args.steps)
    return sigmas[steps].numpy(), tg.noise_aware_weights(sigmas, args.noise_level, steps, args.sampler).numpy()


def train_and_heldout(study: Study, args) -> list[str]:
    """Each variant's final LoRA (the EMA weights it exported) evaluated on the training captions and on the
    held-out ones alike, as gains over the base model under the same noise: generalisation against memorisation."""
    import torch

    from reward import load_reward

    pipe, reward_fn = plumbing.load_pipeline(str(tg.TINY_WORLD)), load_reward(study.eval_reward or study.reward)
    train = eval_file(replace(study, eval_prompts=study.prompts), args.runs, write=True)
    files = {study.prompts.stem: train, study.eval_prompts.stem: eval_file(study, args.runs)}
    lines = [f"Final gain in {label(study, 'eval_reward')} on the training and the held-out captions, the same "
             f"{study.eval_samples} samples per caption, each variant's exported LoRA (mean +- std over seeds):", "",
             "| variant | " + " | ".join(files) + " |", "| --- |" + " --- |" * len(files)]
    prompts, grid = {stem: plumbing.read_prompts(str(f)) for stem, f in files.items()}, args.runs / "scratch.png"
    gains = {}  # (variant, stem) -> [seeds]
    with torch.no_grad():
        for seed in range(args.seeds):
            bases = {}  # guidance -> the base model's score per caption file
            runs = {(f"{panel}: " * bool(panel) + variant): flags for panel, variants in study.panels.items()
                    for variant, flags in variants.items()}  # one name per run, the panel's in front
            for variant, flags in runs.items():
                out = run_folder(study, flags, seed, args.runs)  # evaluated at the guidance it trained with
                guidance = json.loads((out / "config.json").read_text())["guidance"]
                run_args = tg.parse_args(["--tiny", "--prompt-file", str(train), "--seed", str(seed), "--eval-steps",
                                          "10", "--guidance", str(guidance)])
                if run_args.guidance not in bases:
                    bases[run_args.guidance] = {stem: tg.evaluate(pipe, ps, reward_fn, run_args, grid)["eval_reward"]
                                                for stem, ps in prompts.items()}
                pipe.load_lora_weights(out / "lora")
                for stem, ps in prompts.items():
                    score = tg.evaluate(pipe, ps, reward_fn, run_args, grid)["eval_reward"]
                    gains.setdefault((variant, stem), []).append(score - bases[run_args.guidance][stem])
                pipe.unload_lora_weights()
    for variant in runs:
        lines.append(f"| {variant} | " + " | ".join(f"{np.mean(gains[variant, stem]):+.4f} +- "
                                                    f"{np.std(gains[variant, stem]):.4f}" for stem in files) + " |")
    return lines + [""]


def summarise(name: str, study: Study, args) -> list[str]:
    """Train what is missing, then the study's table (as markdown lines) and figure."""
    eval_file(study, args.runs, write=True)
    jobs = {run_folder(study, flags, seed, args.runs): (flags, seed)  # a variant in two panels runs once
            for seed in range(args.seeds) for panel in study.panels.values() for flags in panel.values()}
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: run(study, *job, args), jobs.values()))
    grid = np.linspace(0, args.budget, 101)
    curves, bases = {}, {}  # (panel, variant, key) -> gain over the base [seeds, len(grid)]; key -> base [seeds]
    samples = f"{study.eval_samples} 10-step ODE samples" if study.eval_samples > 1 else "one 10-step ODE sample"
    lines = [f"# {name}: {study.question}", "",
             f"`python bench/compare.py {name}{'' if args.budget == study.budget else f' --budget {args.budget}'}`"
             f" ({args.seeds} seed{'s' * (args.seeds > 1)}; reward `{study.reward}` on {study.prompts.name}; "
             f"evaluated with `{study.eval_reward or study.reward}` on {study.eval_prompts.name}, {samples} per "
             f"caption, the EMA weights). Every run stops after {args.budget:,} transformer evaluations. A seed fixes "
             f"the evaluation noise too, so each run is measured by its gain over the base model under the same "
             f"noise; a difference is called within seed noise when the variants' min..max ranges of that gain "
             f"overlap.", ""]
    c = args.costs
    lines += [f"Time is estimated, not measured: each run's epochs put at the seconds one GPU would spend on them at "
              f"SD3.5-medium's shapes, from the run's own counts (rollout forwards; the KL reference's and "
              f"DiffusionNFT's old policy's forwards; trained latents, forward and backward; images decoded and "
              f"scored) times unit costs from {args.costs_source}: {c.forward * 1e3:.1f} ms a forward, "
              f"{c.trained * 1e3:.1f} ms a trained latent, {c.image * 1e3:.1f} ms an image (evaluation left out, "
              f"as from the NFE). An evaluation counts a forward pass once, whatever backward pass follows it, so a "
              f"method heavy in training costs more per NFE. Equal time is read where the panel's shortest run "
              f"ended, a time every run reached. Wall seconds are this machine's (2 CPU cores, two runs at a "
              f"time): rough.", ""]
    seconds = {}  # (panel, variant) -> estimated GPU s [seeds, len(grid)]
    for panel, variants in study.panels.items():
        first, outs, walls = next(iter(variants)), {}, {}
        for variant, flags in variants.items():
            outs[variant] = [run_folder(study, flags, seed, args.runs) for seed in range(args.seeds)]
            for key in study.keys:
                runs = [curve(out, key, args.costs) for out in outs[variant]]
                bases.setdefault(key, {})[variant] = np.array([r[3][0] for r in runs])
                curves[panel, variant, key] = np.stack([np.interp(grid, r[0], r[3] - r[3][0]) for r in runs])
            runs = [curve(out, study.keys[0], args.costs) for out in outs[variant]]  # time at the gains' epochs
            seconds[panel, variant] = np.stack([np.interp(grid, nfe, gpu_s) for nfe, _, gpu_s, _ in runs])
            walls[variant] = np.mean([np.interp(args.budget, nfe, wall_s) for nfe, wall_s, _, _ in runs])
        common = min(seconds[panel, v][:, -1].min() for v in variants)  # equal time: every run got this far
        header = ["variant"] + [f"final {'gain in ' * k.startswith('eval')}{label(study, k)} (mean +- std)"
                                for k in study.keys]
        header += ["min .. max", f"NFE to reach {first}'s final", f"vs {first}", "est. GPU min per run",
                   f"est. GPU min to reach {first}'s final", f"gain at {common / 60:.1f} est. GPU min",
                   "wall s per run"]
        header += ["transitions trained per run"] if study.transitions else []
        lines += [f"## {panel}", ""] if panel else []
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for variant in variants:
            gain, ref = (curves[panel, v, study.keys[0]] for v in (variant, first))
            secs, ref_end = seconds[panel, variant], seconds[panel, first][:, -1].mean()
            final, ref_final = gain[:, -1], ref[:, -1]
            reach = first_reach(grid, gain.mean(0), ref_final.mean())
            reach_s = first_reach(secs.mean(0), gain.mean(0), ref_final.mean())
            at_time = [np.interp(common, s, g) for s, g in zip(secs, gain)]
            apart = final.min() > ref_final.max() or final.max() < ref_final.min()
            cells = [variant] + [f"{curves[panel, variant, k][:, -1].mean():+.4f} +- "
                                 f"{curves[panel, variant, k][:, -1].std():.4f}" for k in study.keys]
            cells += [f"{final.min():+.4f} .. {final.max():+.4f}",
                      f"{reach:,.0f} ({reach / args.budget:.0%})" if reach is not None else "not reached",
                      "" if variant == first else f"{final.mean() - ref_final.mean():+.4f}, "
                      f"{'apart' if apart else 'within seed noise'}", f"{secs[:, -1].mean() / 60:.1f}",
                      f"{reach_s / 60:.1f} ({reach_s / ref_end:.0%})" if reach_s is not None else "not reached",
                      f"{np.mean(at_time):+.4f} +- {np.std(at_time):.4f}", f"{walls[variant]:.0f}"]
            cells += [f"{np.mean([trained(out, args.budget) for out in outs[variant]]):,.0f}"] \
                if study.transitions else []
            lines.append("| " + " | ".join(cells) + " |")
        if study.weights:
            s, w = panel_weights(variants[first])
            lines += ["", "Noise-aware weights w_k at s_k: " + ", ".join(f"{a:.3f}: {b:.2f}" for a, b in zip(s, w))]
        lines.append("")
    keys = [k for k in study.keys if k.startswith("eval")]
    described = lambda variant: ", ".join(  # noqa: E731
        f"{label(study, k)} {bases[k][variant].mean():.4f} ({bases[k][variant].min():.4f} .. "
        f"{bases[k][variant].max():.4f})" for k in keys)
    reference = next(iter(bases[keys[0]]))
    other = [v for v in bases[keys[0]] if not np.array_equal(bases[keys[0]][v], bases[keys[0]][reference])]
    lines.append("Base model, mean over the seeds' evaluation noises: " + described(reference) + "".join(
        f"; {v}'s, evaluated at its own guidance: {described(v)}" for v in other) + ".")
    if study.eval_prompts != study.prompts:
        lines += [""] + train_and_heldout(study, args)
    plot(study, curves, seconds, grid, args.results / f"{name}.png")
    return lines


def branch_images(path: Path, prompts=("a red circle on the left", "two blue squares"), steps=(0, 3, 6),
                  branches: int = 3) -> list[str]:
    """The trained tiny world's branches of the same prompts, initial noises and SDE/CPS draws under each sampler
    and finish: one row per (sampler, finish, prompt), the G branches of each branch step k side by side."""
    import torch

    from reward import geneval_toy

    pipe = plumbing.load_pipeline(str(tg.TINY_WORLD))
    embeds, sigmas = tg.encode_prompts(pipe, list(prompts)), tg.sigma_grid(pipe.scheduler, 10)
    noise = tg.initial_noise(pipe, len(prompts), 64, torch.Generator().manual_seed(0))
    images, captions, lines = [], [], []
    for sampler in ("sde", "cps"):
        for finish in (0, 2, 1):
            out = tg.rollout(tg.sd3_velocity(pipe.transformer, embeds, 4.5, 1024), noise, sigmas, "branch",
                             list(steps), 0.7, torch.Generator().manual_seed(1), branches, sampler, finish)
            rewards = geneval_toy(tg.decode_latents(pipe, out.latents), [prompts[n] for n in out.image_noise])
            # leaves come step by step, each trunk's branches together: order them prompt by prompt
            order = torch.argsort(out.image_noise * 100 + out.image_step, stable=True)
            images.append(tg.decode_latents(pipe, out.latents[order]))
            name = f"{sampler}, " + (f"F = {finish}" if finish else "full")
            captions += [f"{name}, k = {k}: {r:.2f}" for k, r in zip(out.image_step[order].tolist(),
                                                                         rewards[order].tolist())]
            lines.append(f"| {name} | {rewards.mean():.3f} |")
    plumbing.save_grid(torch.cat(images), captions, path, columns=len(steps) * branches, side=96)
    return ["", f"![branch images]({path.name}): rows {', '.join(repr(p) for p in prompts)} under each sampler "
            f"and finish (the trained tiny world, the same initial noise and the same draws), each row the "
            f"{branches} branches of steps k = {', '.join(map(str, steps))}, captioned with geneval_toy.", "",
            "| sampler, finish | mean geneval_toy of these branches |", "| --- | --- |", *lines, ""]


def plot(study: Study, curves: dict, seconds: dict, grid: np.ndarray, path: Path):
    """The gains against NFE (top row) and against estimated GPU minutes (below), then any panel's weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 + study.weights  # the panels side by side, or the keys of a one-panel study
    cols = len(study.panels) if len(study.keys) == 1 else len(study.keys)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.2 * cols, 6.4), 3.6 * rows), squeeze=False)
    for c, (panel, variants) in enumerate(study.panels.items()):
        for k, key in enumerate(study.keys):
            column = c if len(study.keys) == 1 else k
            ylabel = f"gain in {label(study, key)} over the base" if key.startswith("eval") else label(study, key)
            for r, xlabel in enumerate(("transformer evaluations (NFE)", "estimated GPU minutes (SD3.5-M shapes)")):
                ax = axes[r, column]
                for variant in variants:
                    ys = curves[panel, variant, key]
                    x = grid if r == 0 else seconds[panel, variant].mean(0) / 60
                    ax.plot(x, ys.mean(0), label=variant)
                    ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2)
                ax.set(title=panel or None, xlabel=xlabel, ylabel=ylabel)
                if r == 0:
                    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        if study.weights:
            s, w = panel_weights(variants[next(iter(variants))])
            axes[-1, c].plot(s, w, "o-", color="C1")
            axes[-1, c].axhline(1, color="C0", label="uniform")
            axes[-1, c].set(xlabel="noise level s_k of the trained step", ylabel="noise-aware weight w_k",
                            xlim=(1.02, -0.02), ylim=(0, 2.4))
            axes[-1, c].grid(alpha=0.3)
    fig.suptitle("mean and min-max band over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", default=["compare"], help=f"any of {', '.join(STUDIES)}, or all")
    parser.add_argument("--budget", type=int, default=0, help="transformer evaluations per run (0: the study's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--gpu-epoch", type=Path, help="unit costs from an epoch row in this .jsonl: one epoch of "
                        "tempflow_grpo.py at the reference settings with 1 prompt, measured on a GPU, as bench/gpu.py "
                        "writes them to bench/results/gpu.jsonl (default: the H200's eager epoch in bench/README.md)")
    parser.add_argument("--gpu-step", default="", help="--gpu-epoch's row whose step is this (bench/gpu.py's "
                        "'80 GB compiled', say); default: its first epoch row")
    args = parser.parse_args()
    try:
        args.costs, args.costs_source = measured_costs(args.gpu_epoch, args.gpu_step)
    except ValueError as err:
        parser.error(str(err))
    names = list(STUDIES) if args.studies == ["all"] else list(dict.fromkeys(
        n for name in args.studies for n in [name, *ALSO.get(name, [])]))
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        parser.error(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}, or all")
    if not HELDOUT.exists():
        heldout_split()
    args.results.mkdir(parents=True, exist_ok=True)
    budget = args.budget
    for name in names:
        args.budget = budget or STUDIES[name].budget
        lines = summarise(name, STUDIES[name], args)
        if name == "samplers":
            lines += branch_images(args.results / "samplers_branches.png")
        (args.results / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
