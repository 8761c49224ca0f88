"""TempFlow-GRPO against Flow-GRPO and the two halves of TempFlow, at an equal budget of transformer evaluations.

    python bench/compare.py          # about 35 minutes on 2 CPU cores -> bench/results/compare.md and compare.png

Each variant trains the tiny world (`--tiny`) from 3 seeds until --budget latents have gone through the
transformer (rollouts and updates, CFG's halves counted; evaluation excluded), evaluated every --eval-every epochs
by one ODE sample per evaluation prompt from fixed noise. Curves are put on a common NFE grid by linear
interpolation, then averaged over seeds.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "TempFlow-GRPO": ["--method", "tempflow"],
    "Flow-GRPO": ["--method", "flow_grpo"],
    "branching, no weighting": ["--method", "tempflow", "--weighting", "uniform"],
    "weighting, no branching": ["--method", "flow_grpo", "--weighting", "noise"],
}


def run(variant: str, seed: int, args) -> Path:
    """One training run in its own process (one thread each, --jobs at a time); its folder is reused if complete."""
    out = args.runs / f"{variant.replace(' ', '_').replace(',', '')}-seed{seed}"
    if (out / "lora").exists():
        return out
    cmd = [sys.executable, str(ROOT / "tempflow_grpo.py"), "--tiny", "--reward", args.reward, "--prompt-file",
           str(args.prompts), "--eval-prompt-file", str(args.eval_prompts), "--eval-every", str(args.eval_every),
           "--eval-steps", "10", "--max-nfe", str(args.budget), "--epochs", "100000", "--seed", str(seed),
           "--save-every", "1000", "--image-every", "1000", "--out", str(out), "--resume", *VARIANTS[variant]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def curve(out: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nfe, wall_s, eval reward): the base model's at 0, then at every evaluated epoch."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    points = [(0.0, 0.0, rows[0]["base_" + key])] + [(r["nfe"], r["wall_s"], r[key]) for r in rows if key in r]
    return tuple(np.array(column, dtype=float) for column in zip(*points))


def on_grid(xs: list[np.ndarray], ys: list[np.ndarray], grid: np.ndarray) -> np.ndarray:
    """[runs, len(grid)]: each run's curve interpolated on the grid, starting from its first evaluation."""
    return np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])


def first_reach(grid: np.ndarray, mean: np.ndarray, target: float) -> float | None:
    hit = np.nonzero(mean >= target)[0]
    return float(grid[hit[0]]) if len(hit) else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="color")
    parser.add_argument("--prompts", type=Path, default=ROOT / "tiny_world" / "prompts.txt")
    parser.add_argument("--eval-prompts", type=Path, default=ROOT / "tiny_world" / "prompts.txt")
    parser.add_argument("--budget", type=int, default=120_000, help="transformer evaluations per run")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    jobs = [(v, s) for s in range(args.seeds) for v in VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = dict(zip(jobs, pool.map(lambda job: run(*job, args), jobs)))
    key = "eval_reward"
    grid = np.linspace(0, args.budget, 101)
    table, curves = [], {}
    for variant in VARIANTS:
        runs = [curve(outs[variant, s], key) for s in range(args.seeds)]
        nfe_curves = on_grid([r[0] for r in runs], [r[2] for r in runs], grid)
        wall = np.linspace(0, min(r[1][-1] for r in runs), 101)
        wall_curves = on_grid([r[1] for r in runs], [r[2] for r in runs], wall)
        finals = np.array([r[2][-1] for r in runs])
        curves[variant] = (nfe_curves, wall, wall_curves)
        table.append((variant, finals, float(np.mean([r[1][-1] for r in runs])), nfe_curves.mean(0)))
    target = next(row[1].mean() for row in table if row[0] == "Flow-GRPO")
    lines = [f"# Equal-NFE comparison on the tiny world ({args.reward} reward, {args.seeds} seeds)", "",
             f"`python bench/compare.py --budget {args.budget} --eval-every {args.eval_every}`: each run stops after "
             f"{args.budget:,} transformer evaluations (rollout and training; CFG halves counted). Eval reward: "
             f"one ODE sample (10 steps) per prompt of {args.eval_prompts.name}, fixed noise.", "",
             "| variant | final eval reward (mean +- std over seeds) | min .. max | NFE to reach Flow-GRPO's final | "
             "wall s per run |", "| --- | --- | --- | --- | --- |"]
    for variant, finals, wall_s, mean in table:
        reach = first_reach(grid, mean, target)
        lines.append(f"| {variant} | {finals.mean():.4f} +- {finals.std():.4f} | {finals.min():.4f} .. "
                     f"{finals.max():.4f} | {f'{reach:,.0f} ({reach / args.budget:.0%})' if reach else 'not reached'}"
                     f" | {wall_s:.0f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(curves, grid, args.results / "compare.png", key)


def plot(curves: dict, grid: np.ndarray, path: Path, key: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, (nfe_curves, wall, wall_curves) in curves.items():
        for ax, x, ys in ((axes[0], grid, nfe_curves), (axes[1], wall, wall_curves)):
            ax.plot(x, ys.mean(0), label=variant)
            ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.2)
    axes[0].set_xlabel("transformer evaluations (NFE)")
    axes[1].set_xlabel("wall time of one run (s, 1 CPU thread)")
    for ax in axes:
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("mean and min-max band over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
