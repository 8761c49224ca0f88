"""What moves, checks, shows, keeps or stops a tempflow_grpo.py run, deciding none of its numbers: torchrun, the checks
before anything loads, model loading, progress lines, the out folder (config.json, metrics.jsonl, grids, curves, a
tracker, checkpoints, lora/), resume rules, signals, reward-server outages and out-of-memory advice. It never imports
tempflow_grpo.py: what it needs (the settings, their defaults, the script's path) comes in as values."""
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.training_utils import offload_models
from torch import Tensor
from tqdm.auto import tqdm

from reward import (RewardServerError, check_rewards, first_line, load_reward, parse_spec, required_models,
                    reward_failure, to_pil)


# ---------------- torchrun: N processes split an epoch's prompts and make the one-process step, by hand: DDP and
# accelerate average gradients at every backward and need equal micro-batch counts; here the processes train uneven
# numbers of transitions (the zero-advantage rule) and their step must equal the one-process step on the union (tested)
def init_distributed() -> torch.device:
    """This process's device; under torchrun (RANK, LOCAL_RANK set) first the process group: NCCL on GPUs, else gloo."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))  # a peer that hangs
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*lines: str):
    """Lines on stdout from the first process only (under torchrun it speaks for all), beside any progress bar."""
    for line in lines if rank_and_world()[0] == 0 else ():
        tqdm.write(line)
    sys.stdout.flush()


@contextmanager
def said_once():
    """Under torchrun the first process says each error of settings, files and rewards; the others exit quietly."""
    try:
        yield
    except SystemExit as err:
        if isinstance(err.code, str) and int(os.environ.get("RANK", 0)) > 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's ending is final, whatever the loop set
            time.sleep(30)  # for the first to speak: torchrun ends every process as soon as one fails
            raise SystemExit(1) from None
        raise


def _wire() -> torch.device:
    """Where collectives take their tensors: the GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(t: Tensor) -> Tensor:
    """Every process's t (one shape on all), concatenated in rank order, on the CPU; t itself in one process."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t, device=_wire()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(_wire()))
    return torch.cat(parts).cpu()


def all_sum(value: float) -> float:
    """value summed over processes."""
    if not dist.is_initialized():
        return value
    total = torch.tensor(float(value), dtype=torch.float64, device=_wire())
    dist.all_reduce(total)
    return total.item()


def agree(failure: Exception | None):
    """Raise a reward server's failure in every process if any process met one, so that all stop at one point."""
    if all_sum(failure is not None):
        raise failure or RewardServerError("a reward server failed in another process")


def sum_gradients(params: list[torch.nn.Parameter]):
    """Each gradient summed over processes in one flat all-reduce; a process that trained nothing adds zeros."""
    if not dist.is_initialized():
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p)


# the statistics update() returns, averaged over processes in one all-reduce
TRAIN_STATS = ("policy_loss", "kl", "ratio_mean", "approx_kl", "clipfrac", "loss", "skipped_updates", "grad_norm")


def mean_over_processes(stats: dict, weight: float) -> dict:
    """TRAIN_STATS's means over the processes that have each, weighted by transitions (plain where none has any)."""
    if not dist.is_initialized():
        return stats
    parts = [[stats[k] * weight, weight, stats[k], 1.0] if k in stats else [0.0] * 4 for k in TRAIN_STATS]
    sums = torch.tensor(parts, dtype=torch.float64, device=_wire())
    dist.all_reduce(sums)
    return {k: vw / w if w else v / n for k, (vw, w, v, n) in zip(TRAIN_STATS, sums.tolist()) if n}


def close_processes():
    """torchrun's process group closed, where there is one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def reward_metrics(scores: dict, groups: Tensor, zero_std: Tensor, transitions: int) -> dict:
    """An epoch's reward metrics from all processes' scores (name -> [M], NaN where invalid), group ids [M] and
    whether each image's group had equal rewards [M]; transitions: those trained, over all processes."""
    valid = torch.isfinite(scores["reward"])
    rewards = scores["reward"][valid]
    metrics = dict(reward_mean=rewards.mean().item(), reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
                   images=len(valid), invalid=int((~valid).sum()), transitions=transitions,
                   zero_std_frac=groups[zero_std].unique().numel() / groups.unique().numel())
    metrics.update({f"reward_{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.items() if k != "reward"})
    return metrics


# ---------------- the checks made before anything loads: settings, prompt files, --out, models, servers ----------
def check(condition, message: str):
    if not condition:
        raise SystemExit(f"error: {message}")


def parse_steps(text: str, steps: int, flag: str = "--branch-steps") -> list[int]:
    """`0-8` or `0,2,4` -> sorted grid indices; empty: 0..T-2, every step but the last; else one line naming flag."""
    if not text:
        return list(range(steps - 1))
    picked = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            picked.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r} is not a list like 0,2,4 or a range like 0-8") from None
    return sorted(picked)


def read_prompts(path: str, flag: str = "--prompt-file") -> list[str]:
    """Non-blank lines of a UTF-8 text file, or one line saying what is wrong with it."""
    return [prompt for _, prompt in numbered_prompts(path, flag)]


def numbered_prompts(path: str, flag: str = "--prompt-file") -> list[tuple[int, str]]:
    """(line number, prompt) of each non-blank line, split at "\n" only; a BOM, "\r" and zero-width spaces at a line's
    ends are dropped (the tokenizers would read them as part of a word)."""
    file = Path(path)
    if not path:
        raise SystemExit(f"error: {flag} is required")
    if file.is_dir():
        raise SystemExit(f"error: {flag} {path!r} is a folder; give the text file in it, a prompt per line")
    if not file.is_file():
        raise SystemExit(f"error: {flag} {path!r} does not exist")
    try:
        lines = file.read_bytes().decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise SystemExit(f"error: {flag} {path!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it "
                         f"as UTF-8") from None
    prompts = [(n, p) for n, line in enumerate(lines, start=1) if (p := line.strip().strip("\ufeff\u200b").strip())]
    if not prompts:
        raise SystemExit(f"error: {flag} {path!r} has no prompts (it is empty or only blank lines)")
    return prompts


# the settings whose value is one of a few words
CHOICES = dict(rollout="branch sde tree", group="seed prompt", weighting="noise uniform", adv_std="group global",
               sampler="sde cps", prompt_draw="shared independent", reward_dtype="float32 bfloat16",
               compile="auto on off")

# Real-valued settings: the least each may be, whether it must exceed it, and why (only the clips may be infinite). A
# useless value fails: --max-grad-norm -1 mirrors every update, 0 learns nothing, --adv-clip -1 makes every advantage -1
BOUNDS = {"lr": (0, True, ""), "clip_range": (0, True, ""), "beta": (0, False, "0: no KL"),
          "weight_decay": (0, False, "0: none"), "noise_level": (0, True, "the SDE needs noise"),
          "shift": (0, False, "0: the model's own"), "guidance": (1, False, "1: no CFG, as below 1 in the pipeline"),
          "reward_wait": (0, True, "seconds"), "max_grad_norm": (0, True, "inf: no clipping"),
          "adv_clip": (0, True, "inf: no clipping")}


def check_settings(args):
    """Every setting of an Args whose method presets are filled in, checked; each failure one line naming its flag."""
    for name, words in CHOICES.items():
        check(getattr(args, name) in words.split(), f"--{name.replace('_', '-')} {getattr(args, name)!r} is unknown; "
              f"choose one of {words.replace(' ', ', ')}")
    read_prompts(args.prompt_file)
    if args.eval_prompt_file:
        read_prompts(args.eval_prompt_file, "--eval-prompt-file")
    check(args.steps >= 2, f"--steps {args.steps}: need at least 2 sampling steps")
    steps = parse_steps(args.branch_steps, args.steps)
    check(steps and 0 <= steps[0] and steps[-1] <= args.steps - 2, f"--branch-steps {args.branch_steps!r}: steps "
          f"must lie in 0..{args.steps - 2} (T - 2; the last step is never trained)")
    check(args.group == "prompt" or args.rollout != "sde", "--group seed needs --rollout branch or tree: the "
          "samples of an SDE rollout share no initial noise; use --group prompt")
    group = args.branches * (args.seeds_per_prompt if args.group == "prompt" else 1)
    check(args.rollout == "tree" or args.branches >= 1 and group >= 2, f"--branches {args.branches} and --seeds-per-"
          f"prompt {args.seeds_per_prompt} make groups of {group}; advantages need at least 2 samples per group")
    check_tree(args, steps)
    for name, (low, strict, note) in BOUNDS.items():
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        finite = math.isfinite(value) or (name in ("max_grad_norm", "adv_clip") and value == math.inf)
        check(finite and (value > low if strict else value >= low), f"{flag} {value}: must be "
              f"{'more than' if strict else 'at least'} {low}{f' ({note})' if note else ''}")
    check(args.lr * args.weight_decay < 1, f"--weight-decay {args.weight_decay} with --lr {args.lr}: their product "
          f"must be below 1, or each step shrinks the LoRA past zero")
    check(args.max_nfe >= 0, f"--max-nfe {args.max_nfe}: must be 0 (no limit) or more")
    check(args.sampler == "sde" or args.noise_level <= 1, f"--noise-level {args.noise_level}: --sampler cps needs "
          f"0 < a <= 1 (its std is s_(k+1) sin(a pi / 2))")
    check(args.finish_steps >= 0, f"--finish-steps {args.finish_steps}: must be 0 (the whole remaining grid) or more")
    check(args.finish_steps == 0 or args.rollout == "branch", f"--finish-steps {args.finish_steps} needs "
          f"--rollout branch: it shortens how branches end, and an SDE rollout has none")
    try:  # VAE down-sampling x patch size, from a local model's configs (SD3's 8 x 2 for a hub id)
        vae = json.loads((Path(args.model) / "vae" / "config.json").read_text())
        patch = json.loads((Path(args.model) / "transformer" / "config.json").read_text())["patch_size"]
        factor = 2 ** (len(vae["block_out_channels"]) - 1) * patch
    except (OSError, KeyError, ValueError):
        factor = 16
    check(args.resolution > 0 and args.resolution % factor == 0,
          f"--resolution {args.resolution}: must be a positive multiple of {factor} (VAE factor x patch size)")
    for flag in ("epochs", "prompts_per_epoch", "seeds_per_prompt", "lora_rank", "optimizer_steps", "save_every",
                 "eval_every", "eval_steps", "image_every", "rollout_prompts"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; the process group comes later, with the model
    check(args.prompts_per_epoch % world == 0, f"--prompts-per-epoch {args.prompts_per_epoch} does not split into "
          f"whole prompts over {world} processes; choose a multiple of {world}")
    for flag in ("max_batch", "train_batch"):
        check(getattr(args, flag) >= 2, f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 2 "
              f"(CFG's two halves)")
    parse_spec(args.reward)
    if args.eval_reward:
        parse_spec(args.eval_reward, "--eval-reward")


def check_tree(args, branch_steps: list[int]):
    """BranchGRPO's flags: --rollout tree only; splits at branch steps, 2+ children, something left to train."""
    for flag in ("split_steps", "prune_depth", "prune_width"):
        check(args.rollout == "tree" or not getattr(args, flag), f"--{flag.replace('_', '-')} needs --rollout tree "
              f"(--method branch_grpo)")
    if args.rollout != "tree":
        return
    steps = {flag: parse_steps(getattr(args, flag), args.steps, "--" + flag.replace("_", "-"))
             if getattr(args, flag) else [] for flag in ("split_steps", "prune_depth")}
    check(steps["split_steps"] and set(steps["split_steps"]) <= set(branch_steps), f"--split-steps "
          f"{args.split_steps!r}: each split must be a stochastic step, one of --branch-steps {branch_steps}")
    check(args.split_factor >= 2, f"--split-factor {args.split_factor}: a split needs at least 2 children")
    check(args.prune_width >= 0, f"--prune-width {args.prune_width}: must be 0 (no pruning) or more")
    check(set(branch_steps) - set(steps["prune_depth"]), f"--prune-depth {args.prune_depth!r} prunes every "
          f"trained step")


def check_models(args):
    """Look for every model the run loads (pipeline, rewards') before loading any; one line names all it lacks."""
    needs = [("--model", args.model, "model_index.json", "--model /path/to/a/local/copy")]
    for flag, spec in (("--reward", args.reward), ("--eval-reward", args.eval_reward)):
        needs += [(f"{flag} {name}", model, file, f"{env}=/path/to/a/local/copy")
                  for name, model, env, file in (required_models(spec, flag) if spec else [])]
    missing = [f"{flag} needs {model!r}, {why} (or {local})" for flag, model, file, local in
               {need[1]: need for need in needs}.values() if (why := model_problem(model, file))]  # each model once
    check(not missing, f"{len(missing)} model(s) this run needs cannot be loaded: {'; '.join(missing)}")


def model_problem(model: str, file: str) -> str | None:
    """Why `model` (a folder or hub id) cannot load, or None: a folder, `file` in the hub's cache, or hub-served."""
    import huggingface_hub as hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id
    if Path(model).is_dir():
        return None
    try:
        validate_repo_id(model)
    except HFValidationError:
        return "which is no folder"
    if isinstance(hub.try_to_load_from_cache(model, file), str):
        return None
    if hub.is_offline_mode():
        return f"which is not in the hub's cache (HF_HUB_OFFLINE is set): `hf download {model}` where online"
    try:
        hub.auth_check(model)
    except GatedRepoError:
        return f"which is gated: accept its license at https://huggingface.co/{model}, then `hf auth login`"
    except RepositoryNotFoundError:
        return "which is not on the hub (if it is private, `hf auth login`)"
    except Exception as err:  # the network: a DNS failure, a timeout, a proxy
        return f"which is not in the hub's cache, and the hub is unreachable ({type(err).__name__}): " \
               f"`hf download {model}` where online"
    return None


def saved_config(out: str) -> dict | None:
    """The config.json of the run in --out; None if there is none, one line if it cannot be read."""
    path = Path(out) / "config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --out {out}: its config.json cannot be read ({type(err).__name__}: "
                         f"{str(err)[:80]}); move the folder aside or choose another --out") from None


# A resume may change where the run is and what it logs, evaluates or saves...
RESUMABLE = {"out", "resume", "epochs", "save_every", "eval_every", "image_every", "eval_prompt_file", "eval_steps",
             "max_nfe", "wandb", "eval_reward", "reward_wait", "ran_with"}
# ... and the memory levers and --compile: they change the order of floating-point sums (compiled kernels round
# differently) and of noise draws, not what training computes: the run goes on, not bit-identical to an unbroken one
MEMORY_LEVERS = {"max_batch", "train_batch", "rollout_prompts", "gradient_checkpointing", "offload_text_encoders",
                 "offload_reward", "reward_dtype", "compile"}
# What runs begun before a setting existed ran with: a resume compares and continues with these
BEFORE_SETTING = {"compile": "off", "prompt_draw": "independent"}


def last_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (an interrupted one, still .tmp, does not count), if any."""
    done = sorted(p for p in (out / "checkpoints").glob("epoch_*") if p.suffix != ".tmp")
    return done[-1] if done else None


def check_out(args, config: dict) -> str | None:
    """Refuse an --out holding another run, or this one without --resume, or a --resume of nothing or by another
    number of processes; writes nothing. Returns a note when a resume changes a memory lever."""
    old = saved_config(args.out)
    if old is None:
        check(not args.resume, f"--resume: --out {args.out} holds no run to resume (no config.json); check the "
              f"path, or leave out --resume to start a new run")
        return None
    default = {f.name: f.default for f in fields(args)} | BEFORE_SETTING
    # a setting that did not exist when the run began had its default, or BEFORE_SETTING's; older runs compare paths
    before = {k: old.get(k, default.get(k)) for k in config}
    ignored = RESUMABLE | MEMORY_LEVERS | ({"prompt_file"} if "prompts_sha256" in old else {"prompts_sha256"})
    flag = lambda k: "the prompts" if k == "prompts_sha256" else "--" + k.replace("_", "-")  # noqa: E731
    changed = [f"{flag(k)} {before[k]!r} -> {config[k]!r}" for k in sorted(config) if k not in ignored
               and before[k] != config[k]]
    check(not changed, f"--out {args.out} holds a run with another configuration ({', '.join(changed[:3])}"
          f"{', ...' if len(changed) > 3 else ''}); choose another --out")
    check(args.resume, f"--out {args.out} already holds this run; pass --resume to continue it or choose another --out")
    last, world = last_checkpoint(Path(args.out)), int(os.environ.get("WORLD_SIZE", 1))
    processes = json.loads((last / "state.json").read_text()).get("processes", 1) if last else world
    check(processes == world, f"--resume: the run in --out {args.out} ran as {processes} process(es), this is {world}; "
          f"resume it with torchrun --nproc_per_node {processes} (its noise is per process)")
    levers = [f"{flag(k)} {before[k]!r} -> {config[k]!r}" for k in sorted(MEMORY_LEVERS) if before[k] != config[k]]
    return (f"note: --resume with {', '.join(levers)}: the same run, continued in another order of floating-point "
            f"sums and noise draws, so not bit-identical to an uninterrupted one") if levers else None


def run_config(args, prompts: list[str]) -> dict:
    """config.json: the settings, the prompts' digest (a moved file is the same data, an edited one is not), and what
    ran it (the libraries' versions, this file's commit)."""
    from importlib.metadata import version
    git = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                         text=True) if shutil.which("git") else None
    commit = git.stdout.strip() if git and git.returncode == 0 else None  # None: not a git checkout
    return dict(asdict(args), prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                ran_with={**{name: version(name) for name in ("torch", "diffusers", "transformers", "peft")},
                          "python": sys.version.split()[0], "commit": commit})


def preflight(args) -> tuple[object, dict, list[tuple[int, str]], list[tuple[int, str]], str | None]:
    """All that can fail before loading (prompt files, --out, models, each reward), for finalized settings. Returns
    them (a resume keeps its --prompt-draw), config.json, both files' (line, prompt) pairs and a resume's note."""
    saved = saved_config(args.out) if args.resume else None
    if saved:  # a run resumes with its own prompt draw
        args = replace(args, prompt_draw=saved.get("prompt_draw", BEFORE_SETTING["prompt_draw"]))
    prompts = numbered_prompts(args.prompt_file)
    eval_prompts = numbered_prompts(args.eval_prompt_file, "--eval-prompt-file") if args.eval_prompt_file else []
    out = Path(args.out)  # a folder this process can write in (or can create), or one line saying why not
    existing = next(p for p in (out, *out.parents) if p.exists())
    check(existing.is_dir(), f"--out {args.out!r} is a file, not a folder" if existing == out else
          f"--out {args.out!r}: {str(existing)!r} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise SystemExit(f"error: --out {args.out!r}: cannot write in {str(existing)!r} ({err.strerror})") from None
    config = run_config(args, [prompt for _, prompt in prompts])
    note = check_out(args, config)
    check_models(args)
    for flag, spec in (("--reward", args.reward), ("--eval-reward", args.eval_reward)):
        if spec:
            check_rewards(spec, flag, prompts[0][1], args.reward_wait)
    return args, config, prompts, eval_prompts, note


# ---------------- loading, and the libraries' glue: models, prompt lengths, compiling, the LoRA's files ----------
def load_models(args, device: torch.device, dtype: torch.dtype) -> tuple:
    """The frozen pipeline in `dtype`, each module on its device (the text encoders on the CPU with --offload-text-
    encoders), and the training and evaluation rewards (reward.py; on the CPU with --offload-reward)."""
    place, reward_dtype = "cpu" if args.offload_reward else device, getattr(torch, args.reward_dtype)
    # without torchvision, transformers falls back to its PIL image processors (fine here) and says so at every start
    with logs_dropped(["transformers.utils.import_utils"], "requires torchvision"):
        reward_fn = load_reward(args.reward, place, dtype=reward_dtype, wait=args.reward_wait)
        eval_fn = reward_fn if not args.eval_reward else load_reward(args.eval_reward, place, dtype=reward_dtype,
                                                                     wait=args.reward_wait)
        pipe = load_pipeline(args.model, dtype)
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    for module in [pipe.transformer, pipe.vae, *encoders]:
        module.requires_grad_(False)
        module.to("cpu" if args.offload_text_encoders and module in encoders else device)
    if device.type == "cuda":
        pipe.vae.enable_slicing()  # one 512 px image at a time: a batch's decoder activations would take GBs
    return pipe, reward_fn, eval_fn


def is_terminal() -> bool:
    """Whether stdout and stderr are terminals; elsewhere (a log file, nohup, `| tee`) every redraw stays as text."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """StableDiffusion3Pipeline from a hub id or a local folder, or one line saying how to provide it."""
    import diffusers
    import transformers
    if not is_terminal():  # in a log file their loading bars would be redraws
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        return diffusers.StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SystemExit(f"error: cannot load --model {model!r}: {reason}") from None


@contextmanager
def logs_dropped(loggers: list[str], *phrases: str):
    """For the block, these loggers drop their records that contain any of the phrases."""
    def keep(record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in phrases)
    for name in loggers:
        logging.getLogger(name).addFilter(keep)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(keep)


def without_truncation_warnings(pipe):
    """Drops the warnings at every encoding of a too-long prompt; prompt_cuts says it once, at the start."""
    return logs_dropped([type(pipe).encode_prompt.__module__, "transformers.tokenization_utils_base"],
                        "The following part of your input was truncated", "Token indices sequence length is longer")


def prompt_cuts(pipe, numbered: list[tuple[int, str]], flag: str, t5_length: int) -> str | None:
    """One line naming the prompts (by line) the pipeline cuts at CLIP's tokens or at t5_length T5 tokens, or None."""
    if not numbered:
        return None
    parts = []
    with without_truncation_warnings(pipe):
        for name, tokenizer, limit in (("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
                                       ("T5", pipe.tokenizer_3, t5_length)):
            lengths = [len(ids) for ids in tokenizer([prompt for _, prompt in numbered]).input_ids]
            lines = [n for (n, _), length in zip(numbered, lengths) if length > limit]
            if lines:
                shown = ", ".join(map(str, lines[:5])) + (", ..." if len(lines) > 5 else "")
                parts.append(f"{len(lines)} longer than {name}'s {limit} tokens (line {shown})")
    return (f"note: {flag}: {'; '.join(parts)}, of {len(numbered)} prompts; the text encoders see them cut there"
            if parts else None)


def compile_transformer(transformer, warm_up, backend: str = "inductor") -> float | None:
    """torch.compile each transformer block in place (blocks of one kind share graphs, weights keep their names), then
    warm_up(): all compiling happens here. Returns its seconds; None where any process failed: all run eager."""
    print0(f"--compile: compiling the transformer's {len(transformer.transformer_blocks)} blocks for the run's call "
           f"shapes, once")
    start, seconds = time.perf_counter(), None
    try:
        # a graph per kind of block (dual attention, plain, last), call shape and mode: more than dynamo's 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in transformer.transformer_blocks:
            block.compile(backend=backend, dynamic=False)
        warm_up()
    except torch.cuda.OutOfMemoryError:
        raise  # the run's own calls would not fit either: memory_advice's line, not a warning
    except Exception as err:  # an optimisation never ends a run
        err = getattr(err, "inner_exception", None) or err  # what a backend raised, inside dynamo's wrapper
        print0(f"warning: --compile failed ({type(err).__name__}: {first_line(err)}); the run goes on eager")
    else:
        seconds = time.perf_counter() - start
    finally:
        transformer.zero_grad(set_to_none=True)  # the warm-up's backward leaves nothing behind
    if all_sum(seconds is None):  # one process that could not makes all eager (their numbers round alike)
        eager(transformer)
        return None
    print0(f"--compile: compiled in {seconds:.0f} s (not counted in the epochs' seconds)")
    return seconds


def eager(transformer):
    """Undo compile_transformer: the blocks' calls are eager again."""
    for block in transformer.transformer_blocks:
        block._compiled_call_impl = None  # what nn.Module.compile set
    torch._dynamo.reset()


# diffusers' file name of a LoRA, which load_lora_weights(folder) looks for
LORA_FILE = "pytorch_lora_weights.safetensors"


def save_lora(transformer, folder: Path):
    """The adapter in diffusers' format, alpha included: load_lora_weights(folder) loads it as trained."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    umask = os.umask(0)  # safetensors leaves its file 0600; the LoRA is shared as every other output is
    os.umask(umask)
    (folder / LORA_FILE).chmod(0o666 & ~umask)


@contextmanager
def ema_weights(ema, params: list[torch.nn.Parameter]):
    """The EMA weights in place of the live ones for a while (evaluation, export); the live ones without an EMA."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(params)


# ---------------- progress lines, timers, memory ----------------
def describe_epoch(size: dict, prompts: int, world: int) -> str:
    """An epoch's size (the trainer's epoch_size of its settings, for `prompts` prompts), in one line."""
    return (f"epoch: {prompts} prompts x {size['trunks'] // prompts} noises"
            f"{f' over {world} processes' if world > 1 else ''}, {size['images']:,} images, "
            f"{size['transitions']:,} transitions ({size['per_step']:,} per optimizer step), "
            f"{size['rollout_nfe'] + size['train_nfe']:,} transformer evaluations (rollout "
            f"{size['rollout_nfe']:,}, training {size['train_nfe']:,})")


class Timer:
    """Seconds per phase of an epoch (`with timer("sample_s"):`), and on CUDA the epoch's peak memory."""
    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the GPU's work of this phase, not the launches alone
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict:
        peak = dict(peak_gb=torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else {}
        return {**{k: round(v, 2) for k, v in self.seconds.items()}, **peak}


class PlainLines:
    """A file for tqdm: each refresh ('\\r' + status + padding) one line on stdout; closing's blank ones dropped."""
    def write(self, text: str):
        text = text.strip("\r\n").rstrip()
        if text:
            sys.stdout.write(text + "\n")

    def flush(self):
        sys.stdout.flush()


def progress(iterable=None, every_s: float = 300, **kwargs) -> tqdm:
    """tqdm's bar on a terminal; elsewhere a plain line every every_s seconds, the first after every_s (a log file)."""
    kwargs.setdefault("disable", rank_and_world()[0] != 0)  # under torchrun the first process speaks for all
    if not is_terminal():  # position=0: a nested bar would move the cursor up and down with escape codes
        kwargs.update(file=PlainLines(), mininterval=every_s, delay=every_s, position=0,
                      bar_format="{desc}: {n_fmt}/{total_fmt} {unit}, {elapsed} elapsed, {remaining} left")
    return tqdm(iterable, **kwargs)


@contextmanager
def memory_advice(args, where: str):
    """CUDA out of memory ends the run with one line naming the memory levers that a resume may change."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"error: CUDA out of memory {where}: lower --max-batch (now {args.max_batch}) "
                         f"or --train-batch (now {args.train_batch}), or add --gradient-checkpointing, "
                         f"--offload-text-encoders, --offload-reward; then --resume") from None


# ---------------- the out folder: metrics, grids, curves, a tracker, checkpoints, lora/ ----------------
def scored(samples, reward_fn, device: torch.device, offload: bool, grid: Path, shown: int = 64) -> dict:
    """Mean rewards (eval_<name>) of (prompts, images [n, 3, H, W]) chunks scored as they come (with offload, the
    reward model on the device only then); the first `shown` to a grid. A server's failure raises in every process."""
    scores, images, prompts, failure = [], [], [], None
    for chunk, chunk_images in samples:
        try:
            with offload_models(*reward_fn.models, device=device, offload=offload):
                scores.append(reward_fn(chunk_images, chunk))
        except RewardServerError as err:
            failure = err
            break
        images.append(chunk_images[:max(0, shown - len(prompts))].cpu())
        prompts += chunk
    agree(failure)
    scores = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
    save_grid(torch.cat(images), captioned(prompts, scores["reward"][:shown]), grid)
    return {f"eval_{k}": v[torch.isfinite(v)].mean().item() for k, v in scores.items()}


def grid_picks(images: int, most: int = 32) -> Tensor:
    """[images] True for the (at most) `most` images of an epoch that its grid shows, spread evenly over it."""
    shown = torch.zeros(images, dtype=torch.bool)
    shown[torch.linspace(0, images - 1, min(most, images)).long()] = True
    return shown


def captioned(prompts: list[str], rewards: Tensor) -> list[str]:
    """A grid's captions: each prompt with its image's reward [len(prompts)]."""
    return [f"{prompt} | {r:.3g}" for prompt, r in zip(prompts, rewards.tolist())]


def save_grid(images: Tensor, captions: list[str], path: Path, columns: int = 8, side: int = 192):
    """A PNG of images [N, 3, H, W] in [0, 1], each over its caption, from the first process (all evaluate alike)."""
    from PIL import Image, ImageDraw
    if rank_and_world()[0] != 0:
        return
    cell = side + 36  # an image over three lines of caption
    grid = Image.new("RGB", (columns * side, math.ceil(len(images) / columns) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for n, (image, caption) in enumerate(zip(to_pil(images), captions)):
        x, y = n % columns * side, n // columns * cell
        grid.paste(image.resize((side, side), Image.NEAREST), (x, y))
        lines = textwrap.wrap(caption, width=side // 6)[:3]
        draw.multiline_text((x + 2, y + side + 1), "\n".join(lines), fill="black", spacing=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def log(row: dict, path: Path):
    """One fixed-format line per epoch, and the same numbers in metrics.jsonl."""
    evaluation = f" | base eval {row['base_eval_reward']:.3f}" if "base_eval_reward" in row else ""
    evaluation += f" | eval {row['eval_reward']:.3f}" if "eval_reward" in row else ""
    print0(f"epoch {row['epoch']} | reward {row['reward_mean']:.3f} +- {row['reward_std']:.3f}{evaluation} | "
           f"loss {row.get('loss', 0):.3g} | kl {row.get('kl', 0):.2e} | clipfrac {row.get('clipfrac', 0):.2f} | "
           f"zero-std {row['zero_std_frac']:.2f} | nfe {row['nfe']} | {row['wall_s']:.0f} s")
    # strict JSON has no NaN or Infinity: a non-finite number is written as null
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The metrics rows of a run, one JSON object per line of metrics.jsonl; none if there is no file yet."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_series(ax, rows: list[dict], x_key: str, key: str, log_scale: bool = False, **style):
    """One metric against x_key over the rows that have it; log scale if asked and every value is positive."""
    points = [(row[x_key], row[key]) for row in rows if row.get(key) is not None and x_key in row]
    if not points:
        return
    xs, ys = zip(*points)
    style.setdefault("marker", "." if len(points) == 1 else None)  # a line through one point is invisible
    ax.plot(xs, ys, **style)
    if log_scale and all(y > 0 for y in ys if math.isfinite(y)):
        ax.set_yscale("log")


def plot_curves(rows: list[dict], path: Path):
    """A PNG of reward, KL and clip fraction against epochs (top) and transformer evaluations (bottom); the figure."""
    # Figure, not pyplot: no global backend switch and no figure left open in the caller's process
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter
    fig = Figure(figsize=(12, 6), dpi=100, layout="constrained")
    for ax_row, x_key, x_label in zip(fig.subplots(2, 3), ("epoch", "nfe"), ("epoch", "transformer evaluations (NFE)")):
        plot_series(ax_row[0], rows, x_key, "reward_mean", label="train")
        plot_series(ax_row[0], rows, x_key, "eval_reward", label="eval", marker="o", markersize=3)
        if rows and "base_eval_reward" in rows[0]:
            ax_row[0].axhline(rows[0]["base_eval_reward"], color="gray", linestyle="--", label="base")
        if ax_row[0].get_legend_handles_labels()[0]:  # a legend with nothing in it would only warn
            ax_row[0].legend()
        plot_series(ax_row[1], rows, x_key, "kl", log_scale=True)
        plot_series(ax_row[2], rows, x_key, "clipfrac")
        for ax, title in zip(ax_row, ("reward", "KL to base", "clip fraction")):
            ax.set(title=title, xlabel=x_label)
            ax.xaxis.set_major_formatter(EngFormatter())  # 20k, 1.5M: NFE runs to millions
            ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


class Tracker:
    """A wandb run's rows and grids at their epoch's step; without one (no --wandb, not the first process) a no-op."""
    def __init__(self, run=None, image: type | None = None):
        self.run, self.image = run, image  # image: wandb.Image

    def log(self, row: dict):
        if self.run is not None:
            self.run.log(row, step=row["epoch"])

    def log_image(self, path: Path, key: str, epoch: int):
        if self.run is not None:
            self.run.log({key: self.image(str(path))}, step=epoch)

    def finish(self):
        if self.run is not None:
            self.run.finish()


def open_tracker(project: str, config: dict, out: Path, resume: bool) -> Tracker:
    """One wandb run per --out, in out/wandb, its id in out/wandb_id for --resume; WANDB_MODE=offline needs no login."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("error: --wandb needs the wandb package: pip install wandb") from None
    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None  # None: wandb picks one
    run = wandb.init(project=project, config=config, dir=str(out), id=run_id, resume="allow")
    id_file.write_text(run.id)
    return Tracker(run, wandb.Image)


def write_config(out: Path, config: dict):
    """The first process makes --out and writes config.json atomically, once every process has checked the folder."""
    if dist.is_initialized():
        dist.barrier()
    if rank_and_world()[0] == 0:
        try:  # a full disk leaves no half file
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json.tmp").write_text(json.dumps(config, indent=1))
            os.replace(out / "config.json.tmp", out / "config.json")
        except OSError as err:
            (out / "config.json.tmp").unlink(missing_ok=True)
            raise SystemExit(f"error: --out {out}: cannot write config.json ({err.strerror})") from None


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """About what a checkpoint and lora/ take on disk: the LoRA, its two AdamW moments, its EMA, the EMA's export."""
    return 5 * 4 * sum(p.numel() for p in params)


def save_checkpoint(out: Path, transformer, params, optimizer, ema, gen: torch.Generator, state: dict):
    """Write checkpoints/epoch_N atomically (a .tmp folder renamed), drop older ones, and the EMA's LoRA in out/lora;
    the first process writes, with every process's generator state."""
    gens = [gen.get_state()]
    if dist.is_initialized():  # all hold the same LoRA, or a bug would train N diverging models in silence
        mine = torch.cat([p.detach().flatten() for p in params]).to(_wire())
        first = mine.clone()
        dist.broadcast(first, 0)
        differs = torch.tensor(float(not torch.equal(mine, first)), device=_wire())
        dist.all_reduce(differs)
        if differs.item():
            raise RuntimeError(f"the LoRA weights of {int(differs.item())} process(es) differ from process 0's")
        gens = [None] * dist.get_world_size()
        dist.all_gather_object(gens, gen.get_state().cpu())
    if rank_and_world()[0] != 0:
        return
    root = out / "checkpoints"
    final, tmp = root / f"epoch_{state['epoch']:06d}", root / f"epoch_{state['epoch']:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_lora(transformer, tmp)  # the live weights, which training resumes from
        rng = dict(gens=gens, torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        torch.save(dict(optimizer=optimizer.state_dict(), rng=rng, ema=ema.state_dict() if ema else None),
                   tmp / "optimizer_rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        with ema_weights(ema, params):  # evaluation's and the export's weights
            save_lora(transformer, out / "lora.tmp")
    except BaseException as err:  # a full disk, or a second Ctrl-C: no partial folder stays to fill it
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out / "lora.tmp", ignore_errors=True)
        if isinstance(err, RuntimeError):  # torch.save's failed write ("PytorchStreamWriter failed writing ...")
            raise OSError(first_line(err)) from err
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in set(root.glob("epoch_*")) - {final}:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(out / "lora", ignore_errors=True)
    os.replace(out / "lora.tmp", out / "lora")


def load_checkpoint(out: Path, transformer, optimizer, ema, gen: torch.Generator) -> dict | None:
    """Restore the last complete checkpoint; None if there is none. It is data, never code: it loads weights_only."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    last = last_checkpoint(out)
    if last is None:
        return None
    old = (last / "lora.safetensors").exists()  # a checkpoint from before diffusers' format: peft's keys
    set_peft_model_state_dict(transformer, load_file(last / "lora.safetensors") if old else
                              {k.removeprefix("transformer."): v for k, v in load_file(last / LORA_FILE).items()})
    # on the CPU first: the first process saved it from its GPU, and the generator states must stay CPU tensors
    saved = torch.load(last / "optimizer_rng.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])  # (moves its state to each parameter's device)
    if ema is not None:
        ema.load_state_dict(saved["ema"])
        ema.to(transformer.device)
    gen.set_state(saved["rng"]["gens"][rank_and_world()[0]])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return json.loads((last / "state.json").read_text())


def resume_command(args, world: int, default: dict, script: str) -> str:
    """`script`'s command line that continues this run: the settings that differ from `default`, and --resume."""
    words = (["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]) + [os.path.relpath(script)]
    for f in fields(args):
        value, flag = getattr(args, f.name), "--" + f.name.replace("_", "-")
        if f.name != "resume" and not (value == default[f.name] and f.name not in ("prompt_file", "out")):
            words += ([flag] if value else ["--no-" + flag[2:]]) if f.type is bool else [flag, str(value)]
    return shlex.join(words + ["--resume"])


class RunFolder:
    """--out and what a run keeps there, and how it stops (a signal, a reward with nothing finite, a server down) with
    the command that resumes it; the first process writes. Made once all has loaded: it takes SIGINT and SIGTERM."""
    def __init__(self, args, config: dict, resume: str, transformer, params, optimizer, ema, gen: torch.Generator,
                 t5_length: int):
        self.args, self.out, self.resume, self.t5_length = args, Path(args.out), resume, t5_length
        self.transformer, self.params, self.optimizer, self.ema, self.gen = transformer, params, optimizer, ema, gen
        self.first = rank_and_world()[0] == 0
        write_config(self.out, config)
        # room for two checkpoints (a new one is written before the last goes); under torchrun out may not be made yet
        existing = next(p for p in (self.out, *self.out.parents) if p.exists())
        need, free = 2 * checkpoint_bytes(params), shutil.disk_usage(existing).free
        check(free >= need, f"--out {self.out}: {free / 2**20:,.0f} MiB free, and a checkpoint needs "
              f"{need / 2**20:,.0f} MiB (two while one is written); free some space or choose another --out")
        self.tracker = open_tracker(args.wandb, config, self.out, args.resume) if args.wandb and self.first \
            else Tracker()
        self.signum, self.relayed = None, "RANK" in os.environ  # handle() takes SIGINT and SIGTERM from now on
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        """SIGINT or SIGTERM: finish the epoch, save, exit; a second stops at once (not under torchrun: its agent
        relays each Ctrl-C, so it comes twice, and kills after --shutdown-timeout)."""
        if self.signum is not None and not self.relayed:
            raise KeyboardInterrupt
        if self.signum is None:
            print0(f"{signal.Signals(signum).name}: finishing this epoch, then saving a checkpoint " + (
                "(torchrun kills the processes after its --shutdown-timeout, 30 s unless set longer)" if self.relayed
                else "(again to abort)"))
        self.signum = self.signum or signum

    def restore(self) -> dict:
        """Where the run stands: with --resume the last checkpoint restored, metrics.jsonl cut to it; else epoch 0."""
        state = self.args.resume and load_checkpoint(self.out, self.transformer, self.optimizer, self.ema, self.gen)
        state = state or dict(epoch=0, metrics_rows=0, nfe=0, wall_s=0.0)
        if self.first:  # metrics.jsonl keeps the rows of the checkpoint's epochs
            path = self.out / "metrics.jsonl"
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:state["metrics_rows"]])
                            if path.exists() else "")
        if self.args.resume:
            print0(f"--resume: {self.out} continues at epoch {state['epoch']} of {self.args.epochs}")
        return state

    def eval_grid(self, name: str) -> Path:
        return self.out / "images" / f"eval_{name}.png"

    def evaluated(self, evaluate, name: str, where: str) -> dict:
        """evaluate(images/eval_{name}.png) -> metrics; a reward server's failure ends the run."""
        try:
            return evaluate(self.eval_grid(name))
        except RewardServerError as err:
            self.down(err, where, evaluating=True)

    def base(self, evaluate) -> dict:
        """The base model's evaluation as base_eval_*; a reward that gives it nothing finite ends the run."""
        base = self.evaluated(evaluate, "base", "in the base model's evaluation")
        failure = reward_failure(base, self.args.reward, self.args.eval_reward, "in the base model's evaluation")
        with said_once():
            check(not failure, failure)
        return {"base_" + k: v for k, v in base.items()}

    def pending(self, state: dict, evaluate) -> list[dict]:
        """The row saved when its evaluation's server failed, evaluated (unless evaluate is None) and published."""
        if not state.get("pending"):
            return []
        row = state.pop("pending")
        row.update(self.evaluated(evaluate, f"{row['epoch']:06d}", f"in epoch {row['epoch']}'s evaluation")
                   if evaluate else {})
        self.publish(row, None, row["epoch"] + 1 >= self.args.epochs or 0 < self.args.max_nfe <= state["nfe"])
        state["metrics_rows"] += 1
        return [row]

    def epoch_start(self) -> tuple[Tensor, Tensor]:
        """The generators' states as an epoch starts: saved instead of the epoch, if its rollout's server fails."""
        return self.gen.get_state(), torch.get_rng_state()

    def drop_epoch(self, start: tuple[Tensor, Tensor], state: dict, err: RewardServerError, epoch: int):
        """A reward server failed in the epoch's rollout: the run is saved as at the epoch's start, and ends."""
        self.gen.set_state(start[0])
        torch.set_rng_state(start[1])
        self.save(state)
        self.down(err, f"in epoch {epoch}")

    def keep_pending(self, row: dict, samples: tuple | None, state: dict, last: bool, err: RewardServerError):
        """The epoch trained but its evaluation's server failed: saved with its row pending, and the run ends."""
        self.save_samples(row["epoch"], samples, last)
        self.save(dict(state, metrics_rows=state["metrics_rows"] - 1, pending=row))
        self.down(err, f"in epoch {row['epoch']}'s evaluation", evaluating=True)

    def save_samples(self, epoch: int, samples: tuple | None, last: bool) -> Path | None:
        """The grid of the epoch's samples (images, captions) every --image-every epochs and at the end, or None."""
        path = self.out / "images" / f"{epoch:06d}.png"
        if samples is None or not ((epoch + 1) % self.args.image_every == 0 or last) or not self.first:
            return None
        save_grid(*samples, path)
        return path

    def publish(self, row: dict, samples: tuple | None, last: bool):
        """An epoch's log line, metrics row, sample grid and curves (when due), and the same to the tracker."""
        if not self.first:
            return
        epoch = row["epoch"]
        log(row, self.out / "metrics.jsonl")
        grids = {"samples": self.save_samples(epoch, samples, last),
                 "eval_base": self.eval_grid("base") if "base_eval_reward" in row else None,
                 "eval": self.eval_grid(f"{epoch:06d}") if "eval_reward" in row else None}
        if "eval_reward" in row or last:
            plot_curves(read_rows(self.out / "metrics.jsonl"), self.out / "curves.png")
        self.tracker.log(row)
        for key, path in grids.items():
            if path is not None:
                self.tracker.log_image(path, key, epoch)

    def save(self, state: dict):
        """save_checkpoint and lora/README.md; a failed write (a full disk) ends the run with one line."""
        args = self.args
        try:
            save_checkpoint(self.out, self.transformer, self.params, self.optimizer, self.ema, self.gen,
                            dict(state, processes=rank_and_world()[1]))
            if self.first:  # how to sample with it: the T5 length training used is not the pipeline's
                (self.out / "lora" / "README.md").write_text(textwrap.dedent(f"""\
                    The EMA LoRA of {self.out} after {state['epoch']} epoch(s). To sample with it in diffusers:

                        pipe = StableDiffusion3Pipeline.from_pretrained({args.model!r}, dtype=torch.bfloat16)
                        pipe.to("cuda").load_lora_weights({str(self.out / 'lora')!r})
                        image = pipe(prompt, num_inference_steps={args.eval_steps}, guidance_scale={args.guidance},
                                     max_sequence_length={self.t5_length}, height={args.resolution},
                                     width={args.resolution}).images[0]
                    """))
        except OSError as err:
            full, last = shutil.disk_usage(self.out).free < checkpoint_bytes(self.params), last_checkpoint(self.out)
            raise SystemExit(f"error: checkpoint epoch_{state['epoch']:06d} could not be written in {self.out} ("
                             f"{'the disk is full' if full else str(err)[:100]}); "
                             f"{f'the last one, {last.name}, is intact' if last else 'no checkpoint was written yet'}"
                             f"; with room again: {self.resume}") from None

    def stopping(self) -> bool:
        """Whether a signal reached any process: all stop after this epoch."""
        return all_sum(bool(self.signum)) > 0

    def end_if(self, stopping: bool, failure: str | None, epoch: int):
        """After the epoch's checkpoint: a reward that gave nothing, or a signal, ends the run."""
        with said_once():
            check(not failure, f"{failure}; the epoch's checkpoint is saved")
        if stopping:
            print0(f"stopped after epoch {epoch}, checkpoint saved; to continue: {self.resume}")
            raise SystemExit(128 + (self.signum or signal.SIGTERM))

    def down(self, err: RewardServerError, where: str, evaluating: bool = False):
        """The one line that ends a run whose reward server failed, once its checkpoint is written."""
        flag = "--eval-reward" if evaluating and self.args.eval_reward else "--reward"
        with said_once():
            raise SystemExit(f"error: {flag} {err} {where}; once the server answers, the run continues from its "
                             f"last checkpoint with: {self.resume}")

    def finish(self):
        """The run in one line (from its metrics rows; the last checkpoint wrote lora/), and the tracker closed."""
        out, rows = self.out, read_rows(self.out / "metrics.jsonl")
        value = lambda v: "nan" if v is None else f"{v:.3f}"  # noqa: E731  (metrics.jsonl writes NaN as null)
        evals = [row["eval_reward"] for row in rows if "eval_reward" in row]
        reward = (f"eval reward {value(rows[0]['base_eval_reward'])} (base) -> {value(evals[-1])}"
                  if evals and "base_eval_reward" in rows[0] else
                  f"reward {value(rows[0]['reward_mean'])} (epoch 0) -> {value(rows[-1]['reward_mean'])}")
        print0(f"done: {rows[-1]['epoch'] + 1} epochs | {reward} | nfe {rows[-1]['nfe']:,} | "
               f"{rows[-1]['wall_s'] / 60:.1f} min | LoRA in {out / 'lora'}, curves {out / 'curves.png'}, grids in "
               f"{out / 'images'}")
        self.tracker.finish()
