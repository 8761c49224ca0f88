"""Several processes against one: the same global batch, seconds per epoch, as a ratio measured in one run.

    python bench/scaling.py                  # 1 and 2 CPU processes, one thread each -> bench/results/scaling.md
    python bench/scaling.py --processes 8    # on a node of 8 GPUs: 1 and 8 processes, one GPU each

Each run is `tempflow_grpo.py --tiny` (or the flags after --) with the same --prompts-per-epoch, once as a plain
process and once under `torchrun --nproc_per_node N`, which splits each epoch's prompts over the processes and
makes one update from all of them. The figure is the median epoch's wall time (the first epoch, which warms up,
left out) of one process over that of N: ideally N.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def epoch_seconds(out: Path) -> float:
    """The median wall time of an epoch after the first, from the run's metrics rows (evaluation excluded)."""
    walls = [json.loads(line)["wall_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return float(np.median(np.diff(walls)))


def run(processes: int, flags: list[str], out: Path) -> float:
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    subprocess.run([*launcher, "tempflow_grpo.py", *flags, "--out", str(out)], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return epoch_seconds(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--prompts-per-epoch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.md")
    parser.add_argument("flags", nargs="*", help="tempflow_grpo.py's flags (default: the tiny world, no evaluation)")
    args = parser.parse_args()
    flags = args.flags or ["--tiny", "--prompt-file", "tiny_world/prompts.txt", "--eval-prompt-file", ""]
    flags += ["--epochs", str(args.epochs), "--prompts-per-epoch", str(args.prompts_per_epoch)]
    with tempfile.TemporaryDirectory() as scratch:
        seconds = {n: run(n, flags, Path(scratch) / f"p{n}") for n in (1, args.processes)}
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, one thread per process"
    ratio = seconds[1] / seconds[args.processes]
    lines = [f"# Scaling: 1 and {args.processes} processes, the same global batch", "",
             f"Measured by `{shlex.join(['python', 'bench/scaling.py', *sys.argv[1:]])}` on {device}, torch "
             f"{torch.__version__}: `tempflow_grpo.py {shlex.join(flags)}`.", "",
             "| processes | seconds per epoch (median after the first) |", "| --- | --- |",
             *[f"| {n} | {s:.2f} |" for n, s in seconds.items()], "",
             f"- speed-up with {args.processes} processes: **{ratio:.2f}x** (ideal {args.processes}x)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
