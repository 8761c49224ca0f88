"""Base and fine-tuned samples of the tiny world for the same prompts and noise, side by side.

    python bench/samples.py runs/tiny      # a finished --tiny run -> bench/results/tiny_samples.png

Rows alternate base / fine-tuned (position captions, then counting captions) (the run's LoRA, loaded with diffusers' load_lora_weights); each image is an ODE
sample (--steps) from noise fixed by --seed, captioned with its geneval_toy reward.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plumbing  # noqa: E402
import tempflow_grpo as tg  # noqa: E402
import tiny_world  # noqa: E402
from reward import geneval_toy  # noqa: E402

PROMPTS = ["a blue square on the top", "a green circle on the right", "a red square on the left",
           "a yellow circle on the bottom", "a blue circle on the left", "a green square on the bottom",
           "a red circle on the top", "a yellow square on the right",
           "two blue squares", "three green circles", "one red square", "two yellow circles",
           "three blue circles", "one green square", "two red circles", "three yellow squares"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the --out folder of a finished --tiny run (its lora/ is used)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tiny_samples.png")
    args = parser.parse_args()
    pipe = tiny_world.build_tiny_pipeline(pretrained=True)
    noise = tg.initial_noise(pipe, len(PROMPTS), 64, torch.Generator().manual_seed(args.seed))
    embeds = tg.encode_prompts(pipe, PROMPTS)  # the LoRA is the transformer's: the text encoders stay as they are
    base = tg.ode_images(pipe, embeds, noise, args.steps, 4.5)
    pipe.load_lora_weights(args.run / "lora")
    tuned = tg.ode_images(pipe, embeds, noise, args.steps, 4.5)
    images, captions = [], []
    for half in (slice(0, 8), slice(8, 16)):
        for label, batch in (("base", base), ("tuned", tuned)):
            scores = geneval_toy(batch[half], PROMPTS[half]).tolist()
            images.append(batch[half])
            captions += [f"{label}: {p} | {r:.2f}" for p, r in zip(PROMPTS[half], scores)]
    plumbing.save_grid(torch.cat(images), captions, args.out, columns=8)
    for label, batch in (("base", base), ("fine-tuned", tuned)):
        print(f"{label}: mean geneval_toy {geneval_toy(batch, PROMPTS).mean():.3f}")


if __name__ == "__main__":
    main()
