"""Reward functions for tempflow_grpo.py, all behind one interface.

A reward is `fn(images, prompts) -> Tensor[B]`, images a float tensor [B, 3, H, W] in [0, 1], prompts B strings.
`load_reward(spec, device)` builds a comma list of them once, `name[:weight]` or `path/to/file.py:function[:weight]`:

    pickscore                 PickScore (exp(logit_scale) * cosine, about 21 to 24 for SD3.5-M); the GPU default
    clipscore                 CLIP ViT-L/14 image-text cosine
    jpeg_compressibility      minus the JPEG size in kB (DDPO); jpeg_incompressibility is the size
    color                     offline: how close the pixels are to the colour the prompt names
    geneval_toy               offline: GenEval-style checks of colour, count, shape, position; the --tiny default

    http://HOST:PORT/PATH     a reward server (https too), speaking the JSON protocol below

and returns a function giving {"reward": the weighted sum, each component's name: its score}, all Tensor[B].
A model that is not on disk is looked up on the hub (MODELS names the ids); offline, point at local copies with
the environment variables PICKSCORE_MODEL, PICKSCORE_PROCESSOR and CLIPSCORE_MODEL, and set HF_HUB_OFFLINE=1 too,
or the hub client retries for a minute before giving up.

`python reward.py serve REWARD --port P` serves any of these rewards over HTTP, so that a reward model can run in
another environment, on another GPU or on another machine; --reward and --eval-reward of tempflow_grpo.py take
its URL, alone or weighted in a spec (http://gpu2:8001/geneval:1,pickscore:0.5). A URL may not hold a comma,
which separates a spec's rewards.

Reward servers: the protocol. JSON over HTTP or HTTPS, one POST per batch of at most 32 images (MAX_IMAGES), at
any path:

    POST {"prompts": ["a red circle", ...], "images": ["<base64 PNG>", ...]}
    200  {"rewards": [0.83, null, ...], "strict": [1, 0, ...]}

One reward per image, in order. A null is an image the server could not score: the trainer counts it in
`invalid` and leaves it out of its group, as it does a NaN reward. Any other list of as many numbers (or nulls)
is a component, logged as reward_<key>. The images are 8-bit RGB PNGs at the training resolution: the served
reward of an image equals the in-process reward of its 8-bit copy, bit for bit, and a tiny-world run against
`reward.py serve color` trains the same LoRA as one with that reward in process (tested). The client sends a
request again when it gets no answer (refused, reset, timed out) or 429, 502, 503 or 504; any other status
stops the run, and an answer over 4 MiB, of another length or not JSON is a one-line error naming the URL. The
server scores one request at a time and answers a bad request with 400, a reward that raises with 500, each
with {"error": one line}.

What the trainer does with a server:
  - Before any model loads, it sends each server one grey 64 px image with the first training prompt; a
    server that does not answer, or answers wrongly, is named in one line.
  - A server that stops answering during the run is retried after 1, 2, 4 ... 30 s for --reward-wait seconds
    (300). Then the run saves its last complete epoch and stops with one line and the command that continues
    it. An epoch whose training finished but whose evaluation could not be scored is saved with its metrics
    row, which --resume completes with that evaluation first. The resumed run is the uninterrupted one, bit
    for bit: the same LoRA, EMA and metrics rows (tested with the server killed while it scores an epoch's
    samples and while it scores an evaluation, and by hand under torchrun).

GenEval, OCR and judges. Run `reward.py serve` in the environment that has the model, with a plug-in returning
one score per image: `python reward.py serve my_geneval.py:score --port 8001` (that environment needs torch,
numpy, scipy, pillow, starlette and uvicorn). A GenEval server looks the prompt's checks up in GenEval's
evaluation_metadata.jsonl by the prompt's text, since the protocol carries only the prompt. It returns the
fraction of the checks that pass, or 1 or 0 for GenEval's strict score, and null for a prompt it has no checks
for. A plug-in may return a dict, {"rewards": Tensor[B], "strict": Tensor[B]}, to send components. An OCR
server returns 1 minus the edit distance between the text the prompt quotes and the text it reads, over the
quote's length. A judge returns the number parsed from its answer, null when there is none.

Security. Both sides parse JSON and PNG only: nothing received is unpickled or executed, unlike servers that
exchange pickles, which let either side run code in the other. `reward.py serve` binds to 127.0.0.1 unless
--host says otherwise. Anyone who reaches its port can use its GPU, so open it wider only on a network you
trust, or reach it through `ssh -L 8000:127.0.0.1:8000 gpu2`.

What serving costs the trainer (21.5 ms more per 512 px image on 2 CPU threads, half of it PNG encoding) is
measured in bench/README.md, "Reward servers: cost".
"""
import argparse
import base64
import importlib.util
import io
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

RewardFn = Callable[[Tensor, list[str]], Tensor]

# ---------------------------------------------------------------- colours, shapes and the tiny world's grammar

COLORS = {  # RGB in [0, 1]; the first four are the tiny world's palette
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10), "orange": (1.00, 0.55, 0.00), "purple": (0.55, 0.20, 0.75),
    "pink": (1.00, 0.60, 0.75), "cyan": (0.00, 0.85, 0.90), "white": (1.00, 1.00, 1.00),
    "black": (0.00, 0.00, 0.00), "gray": (0.50, 0.50, 0.50), "brown": (0.55, 0.35, 0.15),
}
WORLD_COLORS = ("red", "green", "blue", "yellow")
BACKGROUND = (0.08, 0.08, 0.08)
SHAPES = ("circle", "square")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}


def color_word(prompt: str) -> str | None:
    """The first colour named in the prompt."""
    return next((w for w in prompt.lower().replace(",", " ").split() if w in COLORS), None)


def parse_caption(prompt: str) -> dict:
    """{count, color, shape, position} of a caption `a {color} {shape} on the {position}` or `{n} {color} {shape}s`;
    a part the caption does not name is None."""
    words = prompt.lower().replace(",", " ").split()
    shape = next((w.rstrip("s") for w in words if w.rstrip("s") in SHAPES), None)
    return dict(count=NUMBERS.get(words[0]) if words else None, color=color_word(prompt), shape=shape,
                position=next((w for w in words if w in POSITIONS), None))


# ---------------------------------------------------------------- geneval_toy

MIN_BLOB = 12  # pixels (of 64 x 64); smaller connected sets of a colour are specks, not objects
MATCH = 0.3    # RGB distance under which a pixel counts as a palette colour
# A blob's polar second moment over that of a disc of the same area is 1 for a disc and pi/3 for a square, and
# stays between them under blur. Its squareness ramps from 0 to 1 over the middle half of that interval; above 1/2
# the blob is a square.
OBJECT_AREA = 64  # pixels: the smallest drawn object (radius 5) covers about 78


def blobs(image: np.ndarray, color: str) -> list[dict]:
    """Connected blobs of one palette colour in an [H, W, 3] image in [0, 1]: area, centroid (x, y), moment."""
    palette = np.array([BACKGROUND] + [COLORS[c] for c in WORLD_COLORS])
    distance = np.linalg.norm(image[:, :, None, :] - palette, axis=-1)  # [H, W, 1 + colours]
    nearest = distance.argmin(-1)
    mask = (nearest == 1 + WORLD_COLORS.index(color)) & (distance.min(-1) < MATCH)
    labels, _ = ndimage.label(mask)
    found = []
    for index in range(1, labels.max() + 1):
        ys, xs = np.nonzero(labels == index)
        if len(xs) >= MIN_BLOB:
            # each pixel a unit square: its own polar moment is 1/6 about its centre
            moment = ((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2).sum() + len(xs) / 6
            found.append(dict(area=len(xs), centroid=(xs.mean() + 0.5, ys.mean() + 0.5),
                              moment=moment / (len(xs) ** 2 / (2 * math.pi))))
    return found


def toward(centroid: tuple, position: str, size: int) -> float:
    """Signed distance in pixels of a centroid from the image's midline, positive on the `position` side."""
    x, y = centroid
    return {"left": size / 2 - x, "right": x - size / 2, "top": size / 2 - y, "bottom": y - size / 2}[position]


def geneval_checks(image: np.ndarray, prompt: str, soft: bool = False) -> dict:
    """GenEval-style checks of one [H, W, 3] image against its caption: the asked colour is there, its blobs are as
    many as asked, every one has the asked shape, the largest sits in the asked half. soft=False gives pass/fail;
    soft=True a score in [0, 1] per check that moves with the image, for a reward that separates near-equal samples:
    colour area up to one small object, 1 / (1 + count error), squareness (0 for a disc, 1 for a square, a ramp
    between), and distance past the midline up to an eighth of the image."""
    want, size = parse_caption(prompt), image.shape[0]
    if want["color"] not in WORLD_COLORS:
        return {}
    found = blobs(image, want["color"])
    scores = dict(color=min(1.0, sum(b["area"] for b in found) / OBJECT_AREA) if soft else len(found) > 0)
    if want["count"] is not None:
        error = abs(len(found) - want["count"])
        scores["count"] = 1 / (1 + error) if soft else error == 0
    if want["shape"] is not None:
        square = [np.clip(2 * (b["moment"] - 1) / (math.pi / 3 - 1) - 0.5, 0, 1) for b in found]
        fits = [q if want["shape"] == "square" else 1 - q for q in square]
        scores["shape"] = float(np.mean(fits)) if soft and fits else len(fits) > 0 and min(fits) > 0.5
    if want["position"] is not None:
        largest = max(found, key=lambda b: b["area"], default=None)
        past = toward(largest["centroid"], want["position"], size) if largest else -size
        scores["position"] = float(np.clip(0.5 + past / (size / 8), 0, 1)) if soft else past > 0
    return scores


def to_numpy(images: Tensor) -> np.ndarray:
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]


def geneval_toy(images: Tensor, prompts: list[str]) -> Tensor:
    """Mean of the caption's soft checks (colour, count, shape, position), in [0, 1]; 1 for a drawn caption."""
    scores = []
    for image, prompt in zip(to_numpy(images), prompts):
        checks = geneval_checks(image, prompt, soft=True)
        scores.append(sum(checks.values()) / len(checks) if checks else 0.0)
    return torch.tensor(scores, dtype=torch.float32)


def color(images: Tensor, prompts: list[str]) -> Tensor:
    """How close the image's pixels are to the colour its prompt names: 1 - mean RGB distance / sqrt(3), in [0, 1]."""
    target = torch.tensor([COLORS.get(color_word(p), (float("nan"),) * 3) for p in prompts])  # [B, 3]
    distance = (images.float().cpu() - target[:, :, None, None]).norm(dim=1)  # [B, H, W]
    return 1 - distance.mean(dim=(1, 2)) / 3**0.5


# ---------------------------------------------------------------- JPEG size (DDPO)

def to_pil(images: Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in (to_numpy(images) * 255).round().astype(np.uint8)]


def jpeg_incompressibility(images: Tensor, prompts: list[str]) -> Tensor:
    """Size of the image as a JPEG of quality 95, in kB: noise is large, flat colour is small."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes)


def jpeg_compressibility(images: Tensor, prompts: list[str]) -> Tensor:
    """Minus the JPEG size in kB: higher for images that compress well."""
    return -jpeg_incompressibility(images, prompts)


# ---------------------------------------------------------------- CLIP-based rewards, through transformers

# The hub models of each CLIP-based reward, its model first, then its processor where that lives elsewhere:
# (hub id, the environment variable naming a local copy instead, a file the hub's cache holds once it is downloaded)
MODELS = {"pickscore": [("yuvalkirstain/PickScore_v1", "PICKSCORE_MODEL", "config.json"),
                        ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "PICKSCORE_PROCESSOR", "preprocessor_config.json")],
          "clipscore": [("openai/clip-vit-large-patch14", "CLIPSCORE_MODEL", "config.json")]}


def required_models(spec: str, flag: str = "--reward") -> list[tuple[str, str, str, str]]:
    """(reward name, model: the local copy its variable names, else the hub id, the variable, a file of it) for every
    model the spec's rewards load, so that a run can look for all of them before it loads any."""
    return [(name, os.environ.get(env, model), env, file) for name, _ in parse_spec(spec, flag)
            for model, env, file in MODELS.get(name, [])]


def load_clip(name: str, device, dtype: torch.dtype = torch.float32) -> tuple:
    """The CLIPModel (in dtype) and processor of the reward `name` (a key of MODELS), from the local copies its
    environment variables name when set, else from the hub."""
    from transformers import AutoProcessor, CLIPModel

    (model_id, model_env, _), (processor_id, processor_env, _) = MODELS[name][0], MODELS[name][-1]
    model_id, processor_id = os.environ.get(model_env, model_id), os.environ.get(processor_env, processor_id)
    try:
        model = CLIPModel.from_pretrained(model_id, dtype=dtype).eval().requires_grad_(False).to(device)
        processor = AutoProcessor.from_pretrained(processor_id)
    except (OSError, ValueError) as err:
        missing = processor_id if isinstance(err, OSError) and processor_id in str(err) else model_id
        raise SystemExit(f"error: cannot load {missing!r} for --reward (not on disk and the hub is unreachable): "
                         f"download it with `hf download {missing}` or set {model_env}/{processor_env} to a local "
                         f"copy") from None
    return model, processor


def clip_similarity(model, processor, scaled: bool) -> RewardFn:
    """Cosine of CLIP's normalised image and text embeddings, times exp(logit_scale) when scaled (PickScore).
    It scores wherever the model is (the caller may move score.models between scorings)."""
    def score(images: Tensor, prompts: list[str]) -> Tensor:
        inputs = processor(text=prompts, images=to_pil(images), padding=True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings, return_tensors="pt")
        out = model(**inputs.to(model.device, model.dtype))
        cosine = (out.image_embeds * out.text_embeds).float().sum(-1)  # CLIPOutput's embeddings are normalised
        return (model.logit_scale.exp().float() * cosine if scaled else cosine).cpu()
    score.models = [model]
    return score


def pickscore(device, dtype=torch.float32) -> RewardFn:
    return clip_similarity(*load_clip("pickscore", device, dtype), True)


def clipscore(device, dtype=torch.float32) -> RewardFn:
    return clip_similarity(*load_clip("clipscore", device, dtype), False)


# ---------------------------------------------------------------- load_reward: specs, weights, plug-ins

BUILDERS = {  # name -> (device, dtype) -> RewardFn; each is built once per run
    "pickscore": pickscore,
    "clipscore": clipscore,
    "jpeg_compressibility": lambda device, dtype: jpeg_compressibility,
    "jpeg_incompressibility": lambda device, dtype: jpeg_incompressibility,
    "color": lambda device, dtype: color,
    "geneval_toy": lambda device, dtype: geneval_toy,
}


def parse_spec(spec: str, flag: str = "--reward") -> list[tuple[str, float]]:
    """`a:1,b:0.5,file.py:fn` -> [(name, weight)]; checks every name before anything is built, naming `flag` in
    its errors."""
    parts = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, weight = part, 1.0
        head, _, tail = part.rpartition(":")
        # a URL's last number is its weight only after a port or a path: http://host:8000 has none
        if head and _is_number(tail) and (not is_url(head) or "/" in head.partition("://")[2] or
                                          ":" in head.partition("://")[2]):
            name, weight = head, float(tail)
        if is_url(name):
            check_url(name, flag)
        elif ".py:" in name:
            path = Path(name.rpartition(":")[0])
            if not path.is_file():
                raise SystemExit(f"error: {flag} {part!r}: no file {str(path)!r}")
        elif name not in BUILDERS:
            raise SystemExit(f"error: {flag}: unknown reward {name!r}; known: {', '.join(BUILDERS)}, "
                             f"path/to/file.py:function, or http://host:port/path")
        parts.append((name, weight))
    if not parts:
        raise SystemExit(f"error: {flag} is empty; give e.g. pickscore or geneval_toy")
    return parts


def reward_failure(metrics: dict, reward: str, eval_reward: str, where: str) -> str | None:
    """One line when no image of an epoch or evaluation (metrics: reward_* and eval_* means) had a finite reward,
    naming the spec (--reward, or --eval-reward when given) and its parts that gave none; None otherwise."""
    evaluation = ("--eval-reward", eval_reward) if eval_reward else ("--reward", reward)
    for key, prefix, (flag, spec) in (("reward_mean", "reward_", ("--reward", reward)),
                                      ("eval_reward", "eval_", evaluation)):
        if key in metrics and not math.isfinite(metrics[key]):
            empty = [name for name, _ in parse_spec(spec, flag) if not math.isfinite(metrics.get(prefix + name, 0))]
            return (f"{flag} {spec!r} gave no finite reward {where}: NaN or infinite for every image, from "
                    f"{', '.join(empty) or 'the sum'}; check that it suits the prompts (color and geneval_toy need a "
                    f"colour word) or fix the plug-in or server")
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def load_plugin(name: str, flag: str = "--reward") -> RewardFn:
    """`path/to/file.py:function` -> that function, or one line naming the spec and why it cannot be had."""
    path, _, function = name.rpartition(":")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the plug-in's own error (a syntax error, a missing import), not a traceback of ours
        where = f" at line {err.lineno}" if isinstance(err, SyntaxError) else ""
        raise SystemExit(f"error: {flag} {name!r}: {path} does not load: {type(err).__name__}{where}: "
                         f"{first_line(err)}") from None
    if not callable(getattr(module, function, None)):
        raise SystemExit(f"error: {flag} {name!r}: {path} has no function {function!r}")
    return getattr(module, function)


def first_line(err: BaseException) -> str:
    """An error's message in one line of at most 200 characters (a SyntaxError's without its file and line)."""
    return (str(getattr(err, "msg", None) or err).strip().splitlines() or [""])[0][:200]


def check_plugin(name: str, flag: str, prompt: str):
    """Before anything loads: a plug-in scores two small grey images with `prompt`, one number each, or one line
    names the spec and what it did instead."""
    fn = load_plugin(name, flag)
    try:
        out = fn(torch.full((2, 3, 64, 64), 0.5), [prompt, prompt])
        values = torch.as_tensor(out, dtype=torch.float32).reshape(-1)
    except Exception as err:
        raise SystemExit(f"error: {flag} {name!r} fails on two grey 64 px images: {type(err).__name__}: "
                         f"{first_line(err)}") from None
    if values.shape != (2,):
        got = f"a {type(out).__name__} of shape {tuple(out.shape)}" if hasattr(out, "shape") else \
            f"a {type(out).__name__}" + (f" of {len(out)}" if hasattr(out, "__len__") else "")
        raise SystemExit(f"error: {flag} {name!r} returned {got} for 2 images; a reward returns one number per "
                         f"image, Tensor[B] (reward.py)")


def load_reward(spec: str, device="cpu", batch_size: int = 32, dtype: torch.dtype = torch.float32,
                wait: float = 300.0) -> Callable[[Tensor, list[str]], dict[str, Tensor]]:
    """Build the rewards of a spec once (model-based ones in dtype); the result scores under no_grad, in batches of
    at most batch_size, and returns {"reward": sum of weight * component, name: component} as float32 Tensor[B] on
    the CPU. A sample with a non-finite component has a non-finite reward: the training loop leaves it out of its
    group. A reward server's other lists join as components of their own names. Its .models lists the reward
    models, for a caller that keeps them off the GPU between scorings. Raises RewardServerError for a reward server
    that fails (`wait`: seconds it may take, retries included)."""
    parts = parse_spec(spec)
    fns = {name: server_reward(name, wait) if is_url(name) else load_plugin(name) if ".py:" in name
           else BUILDERS[name](device, dtype) for name, _ in parts}

    @torch.no_grad()
    def score(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = {}
        for name, fn in fns.items():
            chunks = [fn(images[i:i + batch_size], prompts[i:i + batch_size])
                      for i in range(0, len(images), batch_size)]
            chunks = [c if isinstance(c, dict) else {"rewards": c} for c in chunks]  # a server's answers are dicts
            for key in chunks[0]:
                column = name if key == "rewards" else key
                if column in out:
                    raise RewardServerError(f"{name}: its list {key!r} has the name of another component")
                out[column] = torch.cat([torch.as_tensor(c[key], dtype=torch.float32).cpu().reshape(-1)
                                         for c in chunks])
                if out[column].shape != (len(images),):
                    raise ValueError(f"reward {name}: {len(out[column])} scores for {len(images)} images")
        out["reward"] = sum(weight * out[name] for name, weight in parts)
        return out
    score.models = [model for fn in fns.values() for model in getattr(fn, "models", [])]
    return score


# ---------------------------------------------------------------- rewards from a server: JSON over HTTP

# The protocol. The client POSTs {"prompts": [str], "images": [base64 PNG]}, at most MAX_IMAGES of each; the
# server answers {"rewards": [float or null]}, one per image, null for an image it could not score. Any other list
# of as many numbers (or nulls) in the answer is a component, logged beside the reward. Both sides parse JSON and
# PNG, never pickles: nothing received is executed. HTTP is httpx's on the client, Starlette and uvicorn's on the
# server.
MAX_IMAGES = 32
MAX_ANSWER_BYTES = 1 << 22    # 4 MiB: 32 numbers and a few more lists take a few kB
MAX_REQUEST_BYTES = 1 << 28   # 256 MiB: 32 base64 PNGs of 1024 px with room to spare
RETRIED = {429, 502, 503, 504}  # busy, or restarting behind a proxy: worth another try; other errors are not


class RewardServerError(Exception):
    """A reward server that gave no answer within its wait, retries included, or an answer that breaks the protocol.
    Its message is one line that starts with the URL."""


def is_url(name: str) -> bool:
    return name.startswith(("http://", "https://"))


def check_url(url: str, flag: str = "--reward"):
    """One line for a URL that cannot be requested: a host is needed; commas separate a spec's rewards."""
    import httpx

    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as err:
        raise SystemExit(f"error: {flag} {url!r} is not a URL ({err})") from None
    if not host:
        raise SystemExit(f"error: {flag} {url!r} names no host; give e.g. http://127.0.0.1:8000/")


def png_base64(images: Tensor) -> list[str]:
    """[B, 3, H, W] in [0, 1] -> B base64 strings of 8-bit RGB PNGs (what a server receives: the image rounded to
    8 bits, as a saved one is)."""
    encoded = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # 5x faster than the default 6, 20% larger
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def from_png_base64(encoded: list[str]) -> Tensor:
    """B base64 PNGs of one size -> [B, 3, H, W] float32 in [0, 1]; ValueError for anything else."""
    try:
        arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(e, validate=True))).convert("RGB"))
                  for e in encoded]
    except (OSError, ValueError, TypeError) as err:  # bad base64, not an image
        raise ValueError(f"an image is not a base64 PNG ({type(err).__name__}: {err})") from None
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"the images differ in size: {sorted({a.shape[:2] for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def server_reward(url: str, wait: float = 300.0, retry: bool = True) -> Callable[[Tensor, list[str]], dict]:
    """The reward a server computes: fn(images [B, 3, H, W], prompts) -> {"rewards": Tensor[B], key: Tensor[B] for
    every other list of the first answer}, null as NaN. A request without an answer (refused, reset, timed out) or
    answered 429, 502, 503 or 504 is sent again after 1, 2, 4, ... 30 s until `wait` seconds have passed since it
    was first sent (with retry=False, once); then, or at once for an answer that breaks the protocol,
    RewardServerError."""
    import httpx

    client, keys = httpx.Client(), []

    def score(images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        body = post(client, url, {"prompts": list(prompts), "images": png_base64(images)}, wait, retry)
        answer = read_answer(body, url, len(prompts))
        keys[:] = keys or ["rewards", *sorted(k for k in answer if k != "rewards")]
        nan = [float("nan")] * len(prompts)
        return {k: torch.tensor([float("nan") if v is None else v for v in answer.get(k, nan)]) for k in keys}
    return score


def post(client, url: str, payload: dict, wait: float, retry: bool) -> bytes:
    """POST payload as JSON; the answer's body, at most MAX_ANSWER_BYTES. Retries as server_reward says."""
    import httpx

    start, delay = time.monotonic(), 1.0
    while True:
        left = max(wait - (time.monotonic() - start), 0.1)  # each try may take what is left of the wait
        try:
            with client.stream("POST", url, json=payload, timeout=httpx.Timeout(left, connect=min(left, 10.0))
                               ) as response:
                if response.status_code not in RETRIED:
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > MAX_ANSWER_BYTES:
                            raise RewardServerError(f"{url}: an answer over {MAX_ANSWER_BYTES >> 20} MiB")
                    if response.status_code != 200:
                        raise RewardServerError(f"{url}: HTTP {response.status_code}: "
                                                f"{body[:200].decode(errors='replace')!r}")
                    return bytes(body)
                problem = f"HTTP {response.status_code}"
        except httpx.TransportError as err:  # refused, reset, timed out
            problem = f"{type(err).__name__}: {err}".replace("\n", " ")
        left = wait - (time.monotonic() - start)
        if not retry or left <= 0:
            raise RewardServerError(f"{url}: no answer within {wait:g} s (--reward-wait), retries included "
                                    f"({problem})" if retry else f"{url}: no answer ({problem}; --reward-wait "
                                    f"{wait:g} s)")
        time.sleep(min(delay, left))
        delay = min(2 * delay, 30.0)


def read_answer(body: bytes, url: str, n: int) -> dict[str, list]:
    """The answer's lists of n numbers or nulls, "rewards" among them; RewardServerError for anything else."""
    try:
        answer = json.loads(body)
    except ValueError:  # not UTF-8 or not JSON
        raise RewardServerError(f"{url}: the answer is not JSON: {body[:80]!r}") from None
    number = lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    lists = {k: v for k, v in answer.items() if isinstance(v, list) and len(v) == n and all(map(number, v))} \
        if isinstance(answer, dict) else {}
    if "rewards" not in lists:
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        what = (f"{len(rewards)} rewards for {n} images" if isinstance(rewards, list) and len(rewards) != n else
                "rewards that are not all numbers or null" if isinstance(rewards, list) else "no list \"rewards\"")
        raise RewardServerError(f"{url}: the answer has {what}: {body[:80]!r}")
    return lists


def check_rewards(spec: str, flag: str, prompt: str, wait: float):
    """Before anything loads: every plug-in of a spec scores two small grey images (check_plugin), and every server
    one, with `prompt`, or one line names the plug-in or URL and what went wrong."""
    for name, _ in parse_spec(spec, flag):
        if is_url(name):  # as parse_spec reads a name: a URL first, then a plug-in
            try:
                server_reward(name, wait, retry=False)(torch.full((1, 3, 64, 64), 0.5), [prompt])
            except RewardServerError as err:
                raise SystemExit(f"error: {flag} {err}; is the server running? (python reward.py serve REWARD "
                                 f"--port PORT starts one)") from None
        elif ".py:" in name:
            check_plugin(name, flag, prompt)


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", dtype: str = "float32"):
    """Serve the rewards of `spec` at `host`:`port` until Ctrl-C, as this file's docstring says ("Reward servers:
    the protocol" and "Security")."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    parse_spec(spec, "serve REWARD")  # its errors before any model loads
    fn, lock = load_reward(spec, device, dtype=getattr(torch, dtype)), threading.Lock()

    def work(images: Tensor, prompts: list[str]) -> dict:
        with lock:
            scores = fn(images, prompts)
        finite = lambda t: [v if math.isfinite(v) else None for v in t.tolist()]  # noqa: E731  (JSON has no NaN)
        # each component beside the sum, unless the spec is one reward: then it is the sum
        return {"rewards": finite(scores.pop("reward")), **({k: finite(v) for k, v in scores.items()}
                                                            if len(scores) > 1 else {})}

    async def endpoint(request):
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                return JSONResponse({"error": f"a request over {MAX_REQUEST_BYTES >> 20} MiB"}, status_code=413)
        try:
            payload = json.loads(b"".join(chunks))
            prompts, images = payload["prompts"], from_png_base64(payload["images"])
            if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) and len(prompts) ==
                    len(images) and 0 < len(images) <= MAX_IMAGES):
                raise ValueError(f"need 1 to {MAX_IMAGES} prompts (strings) and as many images")
        except (ValueError, KeyError, TypeError) as err:
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=400)
        try:
            return JSONResponse(await run_in_threadpool(work, images, prompts))
        except Exception as err:  # the reward's own failure, said to the client
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)

    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])
    print(f"serving --reward {spec!r} at http://{host}:{port}/ (JSON over HTTP POST; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a reward of reward.py over HTTP (protocol: its docstring).")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("spec", metavar="REWARD",
                        help="a reward spec, as --reward takes it: name[:weight],... or path/file.py:fn")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve others (see Security in the docstring)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    cli = parser.parse_args()
    serve(cli.spec, cli.host, cli.port, cli.device, cli.dtype)
