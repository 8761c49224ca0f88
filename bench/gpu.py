"""One GPU, measured: SD3.5-medium's architecture and a PickScore-sized reward, random weights, through train().

    python bench/gpu.py               # on an H100 or H200, at most --budget (6 minutes) -> bench/results/gpu.md
    python bench/gpu.py --dry-run     # the same steps at a reduced size on the CPU, no time limit (the test runs this)

The steps, in order of priority, each in a fresh process under what is left of --budget (one that runs past it is
killed and recorded as not finished, and the steps after it are not run):
1-4. One epoch of the real loop, `tempflow_grpo.train` as the command line runs it (1 prompt x 4 seeds, T = 10,
   B = 0..8, G = 6, PickScore's size) under a memory cap (torch.cuda.set_per_process_memory_fraction) with the
   cap's flags: 80 GB eager (--compile off), 80 GB compiled (--compile on), then 48 and 24 GB compiled. Each row:
   the seconds spent sampling, decoding and scoring, and training, and compiling apart; the epoch's peak memory
   (torch.cuda.max_memory_allocated) beside bench/plan.py's prediction; the |log ratio| of the transitions trained
   before the first optimizer step (zero but for round-off: the rollout and training batch them differently), and
   for the 80 GB rows the SDPA kernels that one transformer call at the rollout's shape runs (torch.profiler).
5. `bench/rollout.py --arch sd35m --seeds 1 --repeats 1`: branch against SDE per transformer evaluation, and the
   wavefront-batched rollout against one branch at a time, with the evaluations counted against the formula.
Each step, as it ends, appends its result to a .jsonl beside --out and rewrites --out's tables, so that a run cut
short still leaves what it measured; from the rows also the compiled/eager speed-up of the epoch, the reference
epoch's time (48 prompts: the epoch grows linearly with its prompts) and a 1000-epoch run's GPU-hours.
Speed and memory depend on shapes, not weights, so the random models (bench/sd35m.py) measure the real ones'
cost; they are built on the GPU in seconds and handed to train() in place of --model. The dry run compiles with
the aot_eager backend (inductor on a CPU takes minutes; the suite tests it elsewhere).
"""
import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import tempflow_grpo as tg  # noqa: E402
from bench import sd35m  # noqa: E402

# Each cap's flags: the cheapest levers that bench/plan.py predicts to hold the reference epoch with 2 GiB to spare
CAPS = {
    80: ["--max-batch", "32", "--train-batch", "8"],
    48: ["--max-batch", "32", "--train-batch", "8", "--offload-text-encoders"],
    24: ["--max-batch", "8", "--train-batch", "4", "--offload-text-encoders", "--offload-reward", "--reward-dtype",
         "bfloat16"],
}
ROWS = [(80, "off"), (80, "on"), (48, "on"), (24, "on")]  # (cap in GB, --compile), in order of priority
PROMPT = "two red circles on the left of a blue square"
# --dry-run: the reduced models, small images and a short epoch, to check the script end to end in seconds
DRY_RUN = ["--resolution", "32", "--lora-rank", "4", "--steps", "4", "--branches", "2", "--seeds-per-prompt", "2"]
REFERENCE_PROMPTS, RUN_EPOCHS, CLIP = 48, 1000, 1e-4


def label(cap_gb: int, compile: str) -> str:
    return f"{cap_gb} GB {'compiled' if compile == 'on' else 'eager'}"


def cap_memory(cap_gb: float):
    """Cap this process's CUDA allocations at cap_gb GiB (the whole card at most), on the current device: torch
    wants the device's index (a torch.device("cuda") without one raises)."""
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), index)


def first_pass() -> list[torch.Tensor]:
    """Spy on training: the |log ratio| of each transition that grpo_loss sees before the first optimizer step."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen, stepped, grpo_loss = [], [], tg.grpo_loss

    def spied(log_prob, old_log_prob, *args):
        if not stepped:
            seen.append((log_prob - old_log_prob).detach().abs().float().cpu())
        return grpo_loss(log_prob, old_log_prob, *args)
    tg.grpo_loss = spied
    register_optimizer_step_pre_hook(lambda *_: stepped.append(True))
    return seen


def sdpa_kernels(pipe, args: tg.Args) -> list[str]:
    """The aten::_scaled_dot_product_* ops that one no-grad transformer call at the rollout's shape (a chunk of
    --max-batch latents) runs, traced by torch.profiler."""
    transformer, rows = pipe.transformer, tg.rows_per_call(args.max_batch, args.guidance)
    device = transformer.device
    with tg.offload_models(*tg.text_encoders(pipe), device=device, offload=args.offload_text_encoders):
        embeds = tg.encode_prompts(pipe, [PROMPT]).take(torch.zeros(rows, dtype=torch.long, device=device))
    x = tg.initial_noise(pipe, rows, args.resolution, torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), tg.autocast(transformer), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        tg.cfg_velocity(transformer, x, torch.full((rows,), 0.5, device=device), embeds, args.guidance)
    return sorted({event.name for event in profile.events() if event.name.startswith("aten::_scaled_dot_product")})


def worker(cap_gb: int, compile: str, folder: Path, dry_run: bool) -> dict:
    """One epoch of train() under a memory cap, in this process: its metrics row and first-pass numbers (and the
    SDPA kernels at 80 GB), or the error that ended it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        cap_memory(cap_gb)
    sd35m.pickscore_env(folder / "pickscore")
    pipe = sd35m.build_sd35m(device, torch.bfloat16 if device.type == "cuda" else torch.float32, dry_run)
    plumbing.load_pipeline = lambda model, dtype=None: pipe  # train() gets the random SD3.5-M in place of --model,
    plumbing.check_models = lambda args: None            # which it therefore need not look for
    if dry_run:
        tg.compile_transformer = functools.partial(tg.compile_transformer, backend="aot_eager")
    seen = first_pass()
    (folder / "prompts.txt").write_text(PROMPT + "\n")
    args = tg.parse_args(["--model", "random-sd35m", "--prompt-file", str(folder / "prompts.txt"), "--out",
                          str(folder / f"run{cap_gb}-{compile}"), "--reward", "pickscore", "--prompts-per-epoch", "1",
                          "--epochs", "1", "--save-every", "1", "--image-every", "1", "--compile", compile,
                          *(DRY_RUN if dry_run else []), *CAPS[cap_gb]])
    try:
        row = tg.train(args)[0]
    except SystemExit as err:  # out of memory ends train() with one line naming the flags
        return dict(error=str(err.code))
    ratios = torch.cat(seen) if seen else torch.tensor([float("nan")])  # (none trained: NaN)
    row |= dict(first_pass_n=sum(map(len, seen)), first_pass_max=ratios.max().item(),
                first_pass_median=ratios.median().item(),
                first_pass_clipfrac=((ratios.exp() - 1).abs() > CLIP).float().mean().item())  # as grpo_loss counts
    return row | (dict(sdpa=sdpa_kernels(pipe, args)) if cap_gb == 80 else {})


def run_logged(cmd: list[str], log: Path, timeout: float | None) -> str | None:
    """Run a command, its output to log: None if it succeeded, else why not (its last line, or the time limit)."""
    with open(log, "w") as out:
        try:
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"did not finish in {timeout:.0f} s"
    return (log.read_text().strip().splitlines() or ["?"])[-1][:300] if done.returncode else None


def cap_step(cap_gb: int, compile: str, folder: Path, dry_run: bool, timeout: float | None) -> dict:
    """worker() in a new Python process, so that each row starts from an empty GPU."""
    name = f"cap{cap_gb}-{compile}"
    result = folder / f"{name}.json"
    result.unlink(missing_ok=True)
    shutil.rmtree(folder / f"run{cap_gb}-{compile}", ignore_errors=True)  # train() does not overwrite a run
    cmd = [sys.executable, __file__, "--worker", str(cap_gb), "--compile", compile, "--folder", str(folder)]
    error = run_logged(cmd + (["--dry-run"] if dry_run else []), folder / f"{name}.log", timeout)
    return dict(error=error or "no result") if error or not result.exists() else json.loads(result.read_text())


def rollout_step(folder: Path, dry_run: bool, timeout: float | None) -> dict:
    """bench/rollout.py's comparison of one seed, its table in markdown."""
    out = folder / "rollout.md"
    cmd = [sys.executable, str(ROOT / "bench" / "rollout.py"), "--arch", "sd35m", "--seeds", "1", "--repeats", "1",
           "--out", str(out)] + (["--reduced", "--resolution", "32"] if dry_run else [])
    out.unlink(missing_ok=True)
    error = run_logged(cmd, folder / "rollout.log", timeout)
    return dict(error=error) if error else dict(markdown="\n".join(out.read_text().splitlines()[2:]))


def predicted_peak(cap_gb: int, dry_run: bool) -> float:
    """bench/plan.py's peak in GiB for the epoch a cap runs (its training phases: no evaluation runs here)."""
    from bench import plan

    args = plan.parse(["--prompts-per-epoch", "1", *(DRY_RUN if dry_run else []), *CAPS[cap_gb]])
    return plan.run_peak(plan.plan(args, reduced=dry_run), skip=("evaluate",))


def epoch_s(r: dict) -> float:
    return r.get("sample_s", 0) + r.get("score_s", 0) + r.get("train_s", 0)


def cap_rows(results: dict) -> list[str]:
    """The table: per row its flags, peak memory, seconds and first pass, and the reference epoch and run."""
    lines = ["| cap | compile | flags | peak GiB, measured / predicted (bench/plan.py) | sample s | decode + score s | "
             f"train s | compile s | reference epoch (48 prompts) | {RUN_EPOCHS} epochs | first pass: abs(log ratio) "
             f"max / median | clip fraction at {CLIP:g} |", "|" + " --- |" * 12]
    for cap, compile in ROWS:
        r, flags = results.get((cap, compile), dict(error="not run")), " ".join(CAPS[cap])
        if "error" in r:
            lines.append(f"| {cap} GB | {compile} | `{flags}` | {r['error']} |" + " |" * 8)
            continue
        reference = REFERENCE_PROMPTS * epoch_s(r)
        peak = (f"{r['peak_gb']:.2f}" if "peak_gb" in r else "n/a (CPU)") + f" / {r['predicted_gb']:.2f}"
        compiled = f"{r['compile_s']:.1f}" if "compile_s" in r else ("failed: ran eager" if compile == "on" else "")
        lines.append(f"| {cap} GB | {compile} | `{flags}` | {peak} | {r['sample_s']:.1f} | {r['score_s']:.1f} | "
                     f"{r['train_s']:.1f} | {compiled} | {reference / 60:.1f} min | "
                     f"{reference * RUN_EPOCHS / 3600:.0f} GPU-hours | {r['first_pass_max']:.2g} / "
                     f"{r['first_pass_median']:.2g} ({r['first_pass_n']} transitions) | "
                     f"{r['first_pass_clipfrac']:.2f} |")
    return lines


def findings(results: dict) -> list[str]:
    """The compiled/eager speed-up at 80 GB and the SDPA kernels, as lines."""
    eager, compiled = results.get((80, "off"), {}), results.get((80, "on"), {})
    if epoch_s(eager) and epoch_s(compiled) and "compile_s" in compiled:
        lines = [f"- The 80 GB epoch (sample + decode + score + train), eager / compiled: {epoch_s(eager):.1f} s / "
                 f"{epoch_s(compiled):.1f} s = **{epoch_s(eager) / epoch_s(compiled):.2f}x** (compiling, once per "
                 f"run and not in the epoch: {compiled['compile_s']:.0f} s)."]
    else:
        lines = ["- The 80 GB epoch, eager / compiled: not measured (the two rows did not both finish, compiled)."]
    for compile, r in (("off", eager), ("on", compiled)):
        kernels = ", ".join(f"`{name}`" for name in r.get("sdpa", [])) or ("none" if "sdpa" in r else "not measured")
        lines.append(f"- SDPA kernels of one no-grad transformer call at the rollout's shape, {label(80, compile)}: "
                     f"{kernels}.")
    return lines


def report(path: Path, results: dict, rollout: dict, dry_run: bool):
    import diffusers
    import peft

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    dry = " (DRY RUN: reduced size, CPU)" if dry_run else ""
    lines = [f"# One GPU: SD3.5-medium's architecture, random weights{dry}",
             "", f"Everything below was measured by `{' '.join(['python bench/gpu.py', *sys.argv[1:]])}` on {device}, "
             f"{time.strftime('%Y-%m-%d')}: torch {torch.__version__}, diffusers {diffusers.__version__}, peft "
             f"{peft.__version__}; the predicted peaks are bench/plan.py's.", "",
             "## One epoch of `train()`: 1 prompt x 4 seeds, T = 10, B = 0..8, G = 6, PickScore-sized reward", "",
             "Each row runs in a fresh process under `torch.cuda.set_per_process_memory_fraction` (the CUDA context "
             "comes on top). Peak is `torch.cuda.max_memory_allocated` over the epoch. Compiling is timed apart, not "
             "in the epoch. The reference epoch is 48 times this one (sampling, scoring and training all grow "
             "linearly with the prompts). The first pass is every transition trained before the first optimizer "
             f"step: its log ratio to the rollout's log-prob, and the fraction beyond the clip range {CLIP:g}.", "",
             *cap_rows(results), "", *findings(results), "", "## Rollout (`bench/rollout.py --arch sd35m`)", "",
             rollout.get("markdown") or rollout.get("error", "not run")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="reduced models, 32 px, a short epoch, on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.md",
                        help="the report; each step's result is also appended to the .jsonl beside it")
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tempflow_gpu",
                        help="scratch space for the reward model, the runs and each step's log")
    parser.add_argument("--budget", type=float, default=360,
                        help="seconds for all the steps on a GPU; a step past it is killed (no limit in a dry run)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compile", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.compile, args.folder, args.dry_run)
        (args.folder / f"cap{args.worker}-{args.compile}.json").write_text(json.dumps(result))
        return
    start = time.monotonic()
    if args.dry_run:  # the miniature's ops are tiny: one thread each, here and in the steps, spares a busy CPU
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    args.folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd35m.build_pickscore(args.folder / "pickscore", reduced=args.dry_run, device=device)
    torch.cuda.empty_cache() if device == "cuda" else None
    jsonl, results, rollout = args.out.with_suffix(".jsonl"), {}, {}
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    jsonl.write_text("")

    def timeout() -> float | None:  # what is left of the budget, if any; no limit in a dry run
        return None if args.dry_run else args.budget - (time.monotonic() - start)

    def done(step: str, result: dict):
        with open(jsonl, "a") as f:
            f.write(json.dumps(dict(step=step, **result)) + "\n")
        report(args.out, results, rollout, args.dry_run)

    spent = dict(error=f"not run: the budget of {args.budget:.0f} s was spent")
    with ThreadPoolExecutor(1) as pool:  # bench/plan.py's predictions on the CPU while the GPU measures
        predicted = {cap: pool.submit(predicted_peak, cap, args.dry_run) for cap in CAPS}
        for cap, compile in ROWS:
            left = timeout()
            r = cap_step(cap, compile, args.folder, args.dry_run, left) if left is None or left > 0 else spent
            results[cap, compile] = r if "error" in r else dict(r, predicted_gb=predicted[cap].result())
            done(label(cap, compile), results[cap, compile])
            print(cap_rows(results)[2 + ROWS.index((cap, compile))], flush=True)
        left = timeout()
        rollout.update(rollout_step(args.folder, args.dry_run, left) if left is None or left > 0 else spent)
        done("rollout", rollout)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
