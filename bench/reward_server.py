"""What a reward server costs: seconds per request of 32 images against the same reward in process, measured in
one run, on 127.0.0.1.

    python bench/reward_server.py      # -> bench/results/reward_server.md

For each image side, 32 images go to `python reward.py serve color` as one request, either uniform noise (PNG's
worst case: it does not compress) or smooth images (noise of 32 x 32 pixels, upsampled bilinearly), nearer to what
a model draws: the client encodes them as 8-bit PNGs in base64, the server decodes and scores them,
the answer comes back as JSON. The same images are scored by `color` in process. The difference is the protocol's
cost; a real reward model's own time comes on top of both.
"""
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import reward  # noqa: E402


def seconds(fn, repeats: int = 5) -> float:
    """The median of `repeats` timed calls, after one untimed."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    port, prompts = 18765, ["a red circle"] * 32
    server = subprocess.Popen([sys.executable, "reward.py", "serve", "color", "--port", str(port), "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        served, local = reward.load_reward(f"http://127.0.0.1:{port}/", wait=60), reward.load_reward("color")
        rows = []
        for kind, side in [(kind, side) for kind in ("noise", "smooth") for side in (64, 256, 512, 1024)]:
            images = torch.rand(32, 3, side, side, generator=torch.Generator().manual_seed(0)) if kind == "noise" \
                else torch.nn.functional.interpolate(torch.rand(32, 3, 32, 32), size=side, mode="bilinear")
            request_mb = sum(map(len, reward.png_base64(images))) / 2**20
            encode = seconds(lambda: reward.png_base64(images))
            there, here = seconds(lambda: served(images, prompts)), seconds(lambda: local(images, prompts))
            rows.append(f"| {kind} | {side} | {request_mb:.1f} | {encode:.3f} | {there:.3f} | {here:.3f} | "
                        f"{(there - here) / 32 * 1000:.1f} |")
    finally:
        server.kill()
    table = "\n".join(["| images | side (px) | request (MB) | client's PNG encoding (s) | served (s) | "
                       "in process (s) | protocol's cost per image (ms) |", "|" + " --- |" * 7, *rows])
    text = (f"# A reward server's cost: 32 images per request, `color`, 127.0.0.1\n\n"
            f"`python bench/reward_server.py`; the median of 5 requests after one untimed, on "
            f"{torch.get_num_threads()} threads.\n\n{table}\n")
    (ROOT / "bench" / "results" / "reward_server.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
