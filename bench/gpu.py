"""One GPU, measured: SD3.5-medium's architecture and a PickScore-sized reward, random weights, through train().

    python bench/gpu.py               # on an H100 or H200, about 6 minutes -> bench/results/gpu.md
    python bench/gpu.py --dry-run     # the same steps at a reduced size on the CPU (the test runs this)

1. `bench/rollout.py --arch sd35m`: branch against SDE per transformer evaluation, and the wavefront-batched
   rollout against one branch at a time.
2. One epoch of the real loop, `tempflow_grpo.train` as the command line runs it (1 prompt x 4 seeds, T = 10,
   B = 0..8, G = 6, PickScore's size), under three memory caps set with torch.cuda.set_per_process_memory_fraction,
   each with its own flags and in a fresh process: the seconds spent sampling, decoding and scoring, and training,
   and the epoch's peak memory (torch.cuda.max_memory_allocated) beside bench/plan.py's prediction of it.
3. From those, the reference epoch's time (48 prompts: the epoch grows linearly with its prompts) and a 1000-epoch
   run's GPU-hours, all written to bench/results/gpu.md (rewritten after every step, so a run cut short still
   leaves what it measured).
Speed and memory depend on shapes, not weights, so the random models (bench/sd35m.py) measure the real
ones' cost; the models are built on the GPU in seconds and handed to train() in place of --model.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tempflow_grpo as tg  # noqa: E402
from bench import sd35m  # noqa: E402

# Each cap's flags: the cheapest levers that bench/plan.py predicts to hold the reference epoch with 2 GiB to spare
CAPS = {
    80: ["--max-batch", "32", "--train-batch", "8"],
    48: ["--max-batch", "32", "--train-batch", "8", "--offload-text-encoders"],
    24: ["--max-batch", "8", "--train-batch", "4", "--offload-text-encoders", "--offload-reward", "--reward-dtype",
         "bfloat16"],
}
PROMPT = "two red circles on the left of a blue square"
# --dry-run: the reduced models, small images and a short epoch, to check the script end to end in seconds
DRY_RUN = ["--resolution", "32", "--lora-rank", "4", "--steps", "4", "--branches", "2", "--seeds-per-prompt", "2"]
REFERENCE_PROMPTS, RUN_EPOCHS = 48, 1000


def worker(cap_gb: int, flags: list[str], folder: Path, dry_run: bool) -> dict:
    """One epoch of train() under a memory cap, in this process: its metrics row, or the error that ended it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)
    sd35m.pickscore_env(folder / "pickscore")
    pipe = sd35m.build_sd35m(device, torch.bfloat16 if device.type == "cuda" else torch.float32, dry_run)
    tg.load_pipeline = lambda model, dtype=None: pipe  # train() gets the random SD3.5-M in place of --model,
    tg.check_models = lambda args: None                  # which it therefore need not look for
    (folder / "prompts.txt").write_text(PROMPT + "\n")
    argv = ["--model", "random-sd35m", "--prompt-file", str(folder / "prompts.txt"), "--out",
            str(folder / f"run{cap_gb}"), "--reward", "pickscore", "--prompts-per-epoch", "1", "--epochs", "1",
            "--save-every", "1", "--image-every", "1", *(DRY_RUN if dry_run else []), *flags]
    start = time.perf_counter()
    try:
        row = tg.train(tg.parse_args(argv))[0]
    except SystemExit as err:  # out of memory ends train() with one line naming the flags
        return dict(cap_gb=cap_gb, flags=flags, error=str(err.code))
    return dict(cap_gb=cap_gb, flags=flags, seconds=time.perf_counter() - start, **row)


def in_fresh_process(cap_gb: int, folder: Path, dry_run: bool, timeout: float) -> dict:
    """worker() in a new Python process, so that each cap starts from an empty GPU."""
    result = folder / f"cap{cap_gb}.json"
    cmd = [sys.executable, __file__, "--worker", str(cap_gb), "--folder", str(folder)] + (["--dry-run"] if dry_run else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(cap_gb=cap_gb, flags=CAPS[cap_gb], error=f"did not finish in {timeout:.0f} s")
    if done.returncode or not result.exists():
        return dict(cap_gb=cap_gb, flags=CAPS[cap_gb], error=(done.stderr.strip().splitlines() or ["?"])[-1][:300])
    return json.loads(result.read_text())


def predicted_peak(cap_gb: int, dry_run: bool) -> float:
    """bench/plan.py's peak in GiB for the epoch a cap runs (its training phases: no evaluation runs here)."""
    from bench import plan

    args = plan.parse(["--prompts-per-epoch", "1", *(DRY_RUN if dry_run else []), *CAPS[cap_gb]])
    return plan.run_peak(plan.plan(args, reduced=dry_run), skip=("evaluate",))


def cap_rows(results: list[dict]) -> list[str]:
    """The table: per cap its flags, peak memory and seconds, and the reference epoch and run they imply."""
    lines = ["| cap | flags | peak GiB, measured / predicted (bench/plan.py) | sample s | decode + score s | train s | "
             f"reference epoch (48 prompts) | {RUN_EPOCHS} epochs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        flags = " ".join(r["flags"])
        if "error" in r:
            lines.append(f"| {r['cap_gb']} GB | `{flags}` | did not fit or failed: {r['error']} | | | | | |")
            continue
        epoch_s = r.get("sample_s", 0) + r.get("score_s", 0) + r.get("train_s", 0)
        reference = REFERENCE_PROMPTS * epoch_s
        peak = (f"{r['peak_gb']:.2f}" if "peak_gb" in r else "n/a (CPU)") + f" / {r.get('predicted_gb', 0):.2f}"
        lines.append(f"| {r['cap_gb']} GB | `{flags}` | {peak} | {r.get('sample_s', 0):.1f} | {r.get('score_s', 0):.1f} "
                     f"| {r.get('train_s', 0):.1f} | {reference / 60:.1f} min | "
                     f"{reference * RUN_EPOCHS / 3600:.0f} GPU-hours |")
    return lines


def report(path: Path, rollout_md: str, results: list[dict], dry_run: bool):
    import diffusers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"# One GPU: SD3.5-medium's architecture, random weights{' (DRY RUN: reduced size, CPU)' if dry_run else ''}",
             "", f"Measured by `python bench/gpu.py{' --dry-run' if dry_run else ''}` on {device}, torch "
             f"{torch.__version__}, diffusers {diffusers.__version__}.", "",
             "## One epoch of `train()`: 1 prompt x 4 seeds, T = 10, B = 0..8, G = 6, PickScore-sized reward", "",
             "Each cap is `torch.cuda.set_per_process_memory_fraction` in a fresh process (the CUDA context comes on "
             "top). Peak is `torch.cuda.max_memory_allocated` over the epoch. The reference epoch is 48 times this "
             "one (sampling, scoring and training all grow linearly with the prompts).", "",
             *cap_rows(results), "", "## Rollout (`bench/rollout.py --arch sd35m`)", "", rollout_md or "(not run)"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="reduced models, 32 px, a short epoch, on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.md")
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tempflow_gpu",
                        help="scratch space for the reward model and the runs")
    parser.add_argument("--caps", default="80,48,24", help="memory caps in GB, comma-separated")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per step before it counts as failed")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, CAPS[args.worker], args.folder, args.dry_run)
        (args.folder / f"cap{args.worker}.json").write_text(json.dumps(result))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd35m.build_pickscore(args.folder / "pickscore", reduced=args.dry_run, device=device)
    torch.cuda.empty_cache() if device == "cuda" else None
    rollout_md, results = "", []
    rollout_out = args.folder / "rollout.md"
    rollout = [sys.executable, str(ROOT / "bench" / "rollout.py"), "--arch", "sd35m", "--repeats", "1",
               "--out", str(rollout_out)] + (["--reduced", "--resolution", "32", "--seeds", "1"] if args.dry_run else [])
    try:
        subprocess.run(rollout, check=True, capture_output=True, timeout=args.timeout)
        rollout_md = "\n".join(rollout_out.read_text().splitlines()[2:])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        rollout_md = f"failed: {type(err).__name__}"
    report(args.out, rollout_md, results, args.dry_run)
    for cap in map(int, args.caps.split(",")):
        results.append(in_fresh_process(cap, args.folder, args.dry_run, args.timeout))
        results[-1]["predicted_gb"] = predicted_peak(cap, args.dry_run)
        report(args.out, rollout_md, results, args.dry_run)
        print(cap_rows(results)[-1], flush=True)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
