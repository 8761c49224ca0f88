"""One GPU, predicted: each phase's peak memory and the epoch's FLOPs and time, from this project's code on
SD3.5-medium's architecture, without allocating a single weight.

    python bench/plan.py [training flags]    # the peaks and time of one configuration, e.g. --train-batch 4
    python bench/plan.py --write             # bench/README.md's table -> bench/results/plan.md (minutes)
    python bench/plan.py --reduced ...       # the miniature (the suite runs this)

The pipeline (bench/sd35m.py) and PickScore's CLIP-H are built on the meta device: tensors with shapes and
dtypes but no storage. The project's own functions then run on them, phase by phase, as train() calls them:
encode_prompts on an epoch's prompts; rollout() on one chunk of --rollout-prompts prompts; decode_latents and the
reward model on --max-batch images; transition_loss on one micro-batch of --train-batch latents (the policy's
forward, the base model's with the LoRA off, backward), then gradient clipping, the AdamW step and the EMA; and
ode_images for an evaluation chunk. torch's MemTracker follows every tensor they create (`Tracker`), and
FlopCounterMode counts their matrix FLOPs. Three things make the meta device behave like CUDA:

  - CUDA's autocast casts, applied by hand (`CudaAutocast`): autocast has no meta kernels, yet it decides the
    bytes: bf16 for matmuls and convolutions, float32 for norms, softmax, exp, pow and sums (the lists of torch's
    AMP documentation).
  - Fused attention: on meta, F.scaled_dot_product_attention takes its math path, which keeps every attention
    matrix for backward (about double the training peak); CUDA runs bf16 attention without a mask (head size
    64) in the flash kernel, and with a mask (the CLIP text encoders) in the memory-efficient one. The plan calls
    those kernels' ops, whose meta functions give their outputs and saved tensors.
  - What sits on the GPU beside a phase is added as train() places it: the transformer, the VAE, the text
    encoders and the reward model unless offloaded, the LoRA, its AdamW moments and EMA, the epoch's prompt
    embeddings, and during training the gradients.

A rollout chunk makes hundreds of transformer calls of one size; the plan measures one such call under the
tracker and lets rollout() run with a stand-in that allocates that call's measured working memory and returns a
velocity of the right shape, so that the rollout's own tensors (trunks, branches, recorded transitions) are its
own, and the chunk takes seconds. Predicted peaks count tensors, as torch.cuda.max_memory_allocated does; the
caching allocator's fragmentation and the CUDA context (about 0.5 GB) come on top. Time is the FLOPs over the
effective rate one H200 measured for the reference epoch, eager (EPOCH_RATE: 19% of its measured bf16 matmul
rate); other cards' rates are predicted, the H200's scaled by their datasheet peaks. A compiled rate is not yet
measured.
"""
import argparse
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plumbing  # noqa: E402
import tempflow_grpo as tg  # noqa: E402
from bench import sd35m  # noqa: E402

GiB = 2**30
# Dense bf16 tensor-core peaks (no sparsity) in TFLOP/s, from the NVIDIA datasheets: H200 SXM and H100 SXM5
# (Hopper), A100 SXM4 80 GB, L40S, GeForce RTX 4090 (with FP32 accumulation)
CARDS = {"H200 SXM": 989, "H100 SXM": 989, "A100 80GB": 312, "L40S": 362, "RTX 4090": 165}
# Measured on one H200 (2026-12-04, eager, bf16, 512 px, random weights; provenance in bench/README.md): its bf16
# matmul rate, and the reference epoch's effective rate with the 80 GB flags, 419 PFLOP (this plan) in 48 x 59.4 s
MEASURED, MATMUL_RATE, EPOCH_RATE = "H200 SXM", 765, 147  # TFLOP/s
PAPER_EPOCHS = 1000
# =====================================================================================================
# CUDA's autocast and fused attention, on the meta device
# =====================================================================================================

# torch.amp's documented CUDA lists: ops that autocast to the lower precision, and ops that autocast to float32
LOWER = {"__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot", "conv1d",
         "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm",
         "mv", "prelu", "scaled_dot_product_attention"}
FLOAT32 = {"__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "binary_cross_entropy_with_logits",
           "cosh", "cosine_embedding_loss", "cdist", "cosine_similarity", "cross_entropy", "cumprod", "cumsum",
           "dist", "erfinv", "exp", "expm1", "group_norm", "hinge_embedding_loss", "kl_div", "l1_loss",
           "layer_norm", "log", "log_softmax", "log10", "log1p", "log2", "margin_ranking_loss", "mse_loss",
           "multilabel_margin_loss", "multi_margin_loss", "nll_loss", "norm", "normalize", "pdist",
           "poisson_nll_loss", "pow", "prod", "reciprocal", "rsqrt", "sinh", "smooth_l1_loss", "soft_margin_loss",
           "softmax", "softmin", "softplus", "sum", "renorm", "tan", "triplet_margin_loss"}


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", torch.bfloat16) for tensors on any device: floating inputs of LOWER ops cast to
    bf16, of FLOAT32 ops to float32 (ops given an explicit dtype excepted), the casts recorded by autograd as
    CUDA's are; scaled_dot_product_attention goes to the fused kernel CUDA would pick."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, "__name__", "")
        if (name in LOWER or name in FLOAT32) and kwargs.get("dtype") is None:
            dtype = torch.bfloat16 if name in LOWER else torch.float32
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t,
                                         (args, kwargs))
        if name == "scaled_dot_product_attention":
            return fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA runs it in bf16: the flash kernel without a mask, the
    memory-efficient one with (both keep only their inputs, output and log-sum-exp for backward)."""
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    bias = attn_mask.to(query.dtype) if attn_mask.dtype == torch.bool else attn_mask
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias.expand(
        query.shape[0], query.shape[1], query.shape[2], key.shape[2]), query.requires_grad, dropout_p, is_causal,
        scale=scale)[0]


def checkpointed(block, *args):
    """torch.utils.checkpoint of a transformer block as diffusers calls it, with CUDA's autocast around the forward
    and its recomputation in backward alike (CUDA's checkpointing restores the forward's autocast state; a mode
    entered around the forward is gone by the time backward recomputes)."""
    def forward(*inputs):
        with CudaAutocast():
            return block(*inputs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


class NoModules:
    """What MemTracker and FlopCounterMode ask of their module trackers, without per-module hooks: one parent,
    "Global", and backward told by autograd's own graph-task id. Their module hooks keep the tensors that
    gradient checkpointing recomputes in backward alive until backward ends (the peak came out as high as
    without checkpointing); MemTracker's also hook every parameter for its gradient (a frozen weight refuses),
    refuse a second call of one model in a pass (the KL reference forward) and loop over every module at every
    op. The totals need none of it."""
    parents = {"Global"}

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *hooks):
        pass

    def clear_user_hooks(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass


class Tracker(MemTracker):
    """torch's MemTracker as a peak meter of the tensors created inside it and of those handed to track_external,
    by category (parameters, buffers, activations, temporaries of backward, optimizer states, other), without
    its per-module statistics (NoModules)."""

    def __init__(self):
        super().__init__()
        self._mod_tracker = NoModules()

    def peak(self) -> tuple[int, dict[str, int]]:
        """The peak's bytes on the meta device (the GPU's stand-in; CPU tensors do not count) by category."""
        snapshot = self.get_tracker_snapshot("peak").get(torch.device("meta"), {})
        parts = {str(getattr(kind, "value", kind)): n for kind, n in snapshot.items()}
        return parts.pop("Total", 0), parts


@contextmanager
def metered(*resident):
    """Tracker and FlopCounterMode over a block, under CUDA's autocast rules, with `resident` (modules, optimizers,
    tensors) counted as already on the GPU. Yields a dict that holds, after the block, peak bytes, categories,
    FLOPs and the resident bytes."""
    tracker, flops, result = Tracker(), FlopCounterMode(display=False), {}
    flops.mod_tracker = NoModules()
    tracker.track_external(*resident)
    result["resident"] = tracker.get_tracker_snapshot().get(torch.device("meta"), {}).get("Total", 0)
    with tracker, flops:
        yield result
    result["peak"], result["parts"] = tracker.peak()
    result["flops"] = flops.get_total_flops()


# =====================================================================================================
# The models on the meta device, and the stand-in for a no-grad transformer call
# =====================================================================================================


class World:
    """SD3.5-medium (or its miniature) and a PickScore-sized reward on the meta device, set up as train() sets them
    up on CUDA for `args`: a bf16 pipeline with a float32 LoRA, VAE slicing, gradient checkpointing if asked,
    AdamW with its moments (as after the first step), the EMA, and the reward in --reward-dtype."""

    def __init__(self, args: tg.Args, reduced: bool):
        from transformers import CLIPModel

        self.args = args
        self.pipe = sd35m.build_sd35m("meta", torch.bfloat16, reduced)
        self.pipe.vae.enable_slicing()
        self.params = tg.add_lora(self.pipe.transformer, args.lora_rank)
        if args.gradient_checkpointing:  # diffusers' checkpointing, its recomputation under CudaAutocast too
            self.pipe.transformer.enable_gradient_checkpointing(checkpointed)
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema = EMAModel(self.params, decay=tg.EMA_DECAY) if args.ema else None
        with sd35m.building_on("meta", getattr(torch, args.reward_dtype)):
            self.reward = CLIPModel(sd35m.pickscore_config(reduced)).eval().requires_grad_(False)
        self.sigmas = tg.sigma_grid(self.pipe.scheduler, args.steps, args.shift).to("meta")
        self.branch_steps = plumbing.parse_steps(args.branch_steps, args.steps)

    def resident(self, encoding: bool = False, scoring: bool = False) -> list:
        """What train() keeps on the GPU: the offloaded models only while they work."""
        pipe, args = self.pipe, self.args
        encoders = tg.text_encoders(pipe) if encoding or not args.offload_text_encoders else []
        reward = [self.reward] if scoring or not args.offload_reward else []
        ema = self.ema.shadow_params if self.ema else []
        return [pipe.transformer, pipe.vae, *encoders, *reward, self.optimizer, *ema]

    def embeds(self, n: int) -> tg.PromptEmbeds:
        """n prompts' embeddings, as encode_prompts returns them (bf16, CLIP's 77 tokens and T5's)."""
        config = self.pipe.transformer.config
        tokens = sd35m.CLIP_TOKENS + tg.t5_length(self.pipe)
        sequence = torch.empty(n, tokens, config.joint_attention_dim, device="meta", dtype=torch.bfloat16)
        pooled = torch.empty(n, config.pooled_projection_dim, device="meta", dtype=torch.bfloat16)
        return tg.PromptEmbeds(sequence, pooled, sequence.clone(), pooled.clone())

    def noise(self, n: int) -> torch.Tensor:
        side = self.args.resolution // self.pipe.vae_scale_factor
        return torch.empty(n, self.pipe.transformer.config.in_channels, side, side, device="meta")

    def score(self, images: torch.Tensor) -> dict:
        """The reward model on images [n, 3, H, W]: what reward.py's CLIP rewards put on the GPU (the processor's
        224 px pixels and 77 token ids) and its forward."""
        n, dtype = len(images), self.reward.dtype
        pixels = torch.empty(n, 3, 224, 224, device="meta", dtype=dtype)
        ids = torch.zeros(n, sd35m.CLIP_TOKENS, device="meta", dtype=torch.long)
        out = self.reward(input_ids=ids, pixel_values=pixels)
        return dict(reward=(out.image_embeds * out.text_embeds).float().sum(-1))


class Measured:
    """The transformer for rollout() and ode_images(): each call allocates the working memory that one real call
    of the full size was measured to take above its inputs, frees it and returns a bf16 velocity of the input's
    shape, so that the peak of a call lands on top of whatever the caller holds at that moment."""

    def __init__(self, transformer, working: int):
        self.working = working
        self.dtype, self.device, self.config = transformer.dtype, transformer.device, transformer.config

    def __call__(self, hidden_states, **kwargs):
        scratch = torch.empty(self.working, dtype=torch.uint8, device="meta")
        del scratch
        return (torch.empty_like(hidden_states, dtype=torch.bfloat16),)


# =====================================================================================================
# The phases of an epoch
# =====================================================================================================


@contextmanager
def cuda_rules():
    """tempflow_grpo's autocast, which follows the pipeline's dtype, as CudaAutocast for the block."""
    autocast = tg.autocast
    tg.autocast = lambda transformer: CudaAutocast() if transformer.dtype != torch.float32 else nullcontext()
    try:
        yield
    finally:
        tg.autocast = autocast


def plan(args: tg.Args, reduced: bool = False) -> dict:
    """Each phase's predicted peak (bytes, with the resident part and categories) and FLOPs (per prompt, image
    or transition, as epoch_flops multiplies them), and the FLOPs of one latent's transformer evaluation."""
    with cuda_rules():
        return phases_of(World(args, reduced))


def phases_of(world: World) -> dict:
    args, phases = world.args, {}
    pipe, per_call = world.pipe, max(1, args.max_batch // tg.cfg_copies(args.guidance))
    with metered(*world.resident(encoding=True)) as phases["encode"]:  # the tokenizers pad: any text will do
        embeds = tg.encode_prompts(pipe, ["a photo of a cat"] * args.prompts_per_epoch)
    # one no-grad transformer call of the full size: its working memory above its inputs, and its FLOPs
    inputs = (world.noise(per_call), torch.ones(per_call, device="meta"), world.embeds(per_call))
    with metered(pipe.transformer, *inputs) as call, tg.autocast(pipe.transformer), torch.no_grad():
        tg.cfg_velocity(pipe.transformer, *inputs, args.guidance)
    stand_in = Measured(pipe.transformer, call["peak"] - call["resident"])
    flops_per_latent = call["flops"] / (per_call * tg.cfg_copies(args.guidance))
    per_prompt = tg.epoch_size(args, world.branch_steps)["trunks"] // args.prompts_per_epoch
    trunks = min(args.rollout_prompts, args.prompts_per_epoch) * per_prompt
    rows = torch.zeros(trunks, dtype=torch.long, device="meta")
    epoch_noise = world.noise(args.prompts_per_epoch * per_prompt)  # collect() draws the epoch's on the GPU
    with metered(*world.resident(), embeds, epoch_noise) as phases["sample"], tg.autocast(pipe.transformer):
        out = tg.rollout(tg.sd3_velocity(stand_in, embeds.take(rows), args.guidance, args.max_batch),
                         world.noise(trunks), world.sigmas, args.rollout, world.branch_steps, args.noise_level,
                         torch.Generator(), args.branches, args.sampler, args.finish_steps, *tg.tree_shape(args))
    phases["sample"]["flops"] = tg.rollout_nfe(args.rollout, args.steps, world.branch_steps, args.branches,
                                               args.guidance, args.finish_steps, *tg.tree_shape(args)) * trunks * \
        flops_per_latent
    # decode and score one chunk of --max-batch images: every chunk holds the same, beside the same rollout
    with metered(*world.resident(scoring=True), embeds, epoch_noise, *out) as phases["score"], \
            tg.autocast(pipe.transformer):
        chunk = out.latents[:args.max_batch]
        world.score(tg.decode_latents(pipe, chunk))
    phases["score"]["flops"] /= len(chunk)
    del out
    phases["train"] = train_step(world, embeds)
    eval_embeds = world.embeds(per_call)  # one chunk's; the epoch's embeddings are still held by train()
    with metered(*world.resident(scoring=True), embeds, eval_embeds) as phases["evaluate"], \
            tg.autocast(pipe.transformer):
        pipe.transformer, transformer = stand_in, pipe.transformer
        try:
            world.score(tg.ode_images(pipe, eval_embeds, world.noise(per_call), args.eval_steps, args.guidance,
                                      args.max_batch))
        finally:
            pipe.transformer = transformer
    phases["evaluate"]["flops"] = (call["flops"] * args.eval_steps + phases["score"]["flops"] * per_call) / per_call
    return dict(phases=phases, flops_per_latent=flops_per_latent, per_call=per_call)


def train_step(world: World, embeds: tg.PromptEmbeds) -> dict:
    """One micro-batch of --train-batch latents, as update() trains it: transition_loss (the policy's forward with
    gradients, the base model's without), backward into gradients that already exist (accumulation), then
    gradient clipping, the AdamW step and the EMA's update."""
    args, pipe = world.args, world.pipe
    n = max(1, args.train_batch // tg.cfg_copies(args.guidance))
    latents = world.noise(n)
    k = torch.zeros(n, dtype=torch.long, device="meta")
    batch = tg.Batch(latents, latents.clone(), torch.zeros(n, device="meta"), k, k, torch.ones(n, device="meta"))
    step_weight = torch.ones(args.steps, device="meta")
    grads = [torch.zeros_like(p) for p in world.params]  # accumulated over the step's micro-batches
    for p, grad in zip(world.params, grads):
        p.grad = grad
    with metered(*world.resident(), embeds, *batch, *grads) as result:  # the micro-batch came over
        loss, _ = tg.transition_loss(pipe.transformer, batch, torch.arange(n, device="meta"), embeds, world.sigmas,
                                     step_weight, args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(world.params, args.max_grad_norm)
        world.optimizer.step()
        if world.ema:
            world.ema.step(world.params)
    world.optimizer.zero_grad(set_to_none=True)
    result["flops"] /= n
    return result


# =====================================================================================================
# The run's numbers, the report and the command line
# =====================================================================================================

PHASES = {"encode": "encode prompts", "sample": "rollout chunk", "score": "decode + score", "train": "train step",
          "evaluate": "evaluation"}
WORK = {"encode": "encoding", "sample": "sampling", "score": "decoding and scoring", "train": "training"}


def epoch_flops(args: tg.Args, result: dict) -> dict[str, float]:
    """The epoch's FLOPs by phase, from the measured ones and the epoch's sizes (tempflow_grpo.epoch_size)."""
    size, phases = tg.epoch_size(args, plumbing.parse_steps(args.branch_steps, args.steps)), result["phases"]
    return {"encode": phases["encode"]["flops"], "sample": size["rollout_nfe"] * result["flops_per_latent"],
            "score": size["images"] * phases["score"]["flops"], "train": size["transitions"] * phases["train"]["flops"]}


def run_peak(result: dict, skip: tuple[str, ...] = ()) -> float:
    """The run's predicted peak in GiB: its largest phase (of those not skipped)."""
    return max(phase["peak"] for name, phase in result["phases"].items() if name not in skip) / GiB


def card_times(flops: float) -> list[tuple[str, float, float]]:
    """(card, effective TFLOP/s, seconds) for `flops`: the H200's measured EPOCH_RATE, other cards' predicted as that
    rate times their datasheet peak over the H200's (the same fraction of the peak)."""
    rates = {card: EPOCH_RATE * peak / CARDS[MEASURED] for card, peak in CARDS.items()}
    return [(card, rate, flops / (rate * 1e12)) for card, rate in rates.items()]


def parse(flags: list[str], prompt_file: Path = ROOT / "bench" / "prompts.txt") -> tg.Args:
    """Training flags as tempflow_grpo parses them; --prompt-file defaults to the shipped GPU prompts."""
    return tg.parse_args(([] if "--prompt-file" in flags else ["--prompt-file", str(prompt_file)]) + flags)


def describe(args: tg.Args, result: dict) -> list[str]:
    """The phases' peaks, the epoch's FLOPs and its time on each card, as printed lines."""
    lines = [f"{'phase':<16}{'peak GiB':>10}{'resident':>10}  largest parts"]
    for name, phase in result["phases"].items():
        parts = sorted(phase["parts"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{PHASES[name]:<16}{phase['peak'] / GiB:>10.1f}{phase['resident'] / GiB:>10.1f}  "
                     + ", ".join(f"{kind} {n / GiB:.1f}" for kind, n in parts))
    flops = epoch_flops(args, result)
    total = sum(flops.values())
    lines += [f"run's peak: {run_peak(result):.1f} GiB (tensors; the CUDA context and fragmentation come on top)",
              f"epoch: {total / 1e15:,.0f} PFLOP (" + ", ".join(f"{WORK[k]} {v / 1e15:,.1f}" for k, v in
                                                           flops.items()) + ")"]
    lines += [f"time, eager, at the rate an {MEASURED} measured (reference epoch, 80 GB flags): {EPOCH_RATE} TFLOP/s, "
              f"{EPOCH_RATE / MATMUL_RATE:.0%} of its", "  measured bf16 matmul; the 24 GB flags ran slower (80.8 "
              "against 47.5 min); other cards' rates predicted"]
    for card, tflops, seconds in card_times(total):
        lines.append(f"  {card:<10} {seconds / 60:6.1f} min an epoch at {tflops:.0f} TFLOP/s "
                     f"({'measured' if card == MEASURED else 'predicted'}); "
                     f"{PAPER_EPOCHS} epochs {seconds * PAPER_EPOCHS / 3600:,.0f} GPU-hours")
    return lines + ["compiled: not yet measured by bench/gpu.py"]


def write_report(path: Path, reduced: bool = False, sweep=(2, 4, 8, 16, 32)) -> str:
    """bench/results/plan.md: the cards' rows with bench/README.md's flags, the training micro-batch against
    --train-batch with and without checkpointing, and the reference epoch's FLOPs and time."""
    from bench.gpu import CAPS
    import diffusers

    extra = ["--resolution", "64"] if reduced else []
    lines = ["# One GPU, predicted: SD3.5-medium's memory and compute, from the code", "",
             "**Predicted, not measured**, but for the H200's rate of the last section. "
             f"`python bench/plan.py --write{' --reduced' if reduced else ''}` on "
             f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, diffusers {diffusers.__version__}: "
             "this project's functions on SD3.5-medium's architecture and a PickScore-sized CLIP-H on the meta "
             "device, under CUDA's bf16 autocast rules with fused attention (how: bench/plan.py). Peaks count "
             "tensors, as `torch.cuda.max_memory_allocated` and the `peak_gb` metric do; the CUDA context "
             "(about 0.5 GiB) and the allocator's fragmentation come on top, so a row fits with 2 GiB to spare.",
             "", "## The reference epoch on each card size (48 prompts x 4 seeds, T = 10, B = 0..8, G = 6)", "",
             "| card | flags | " + " | ".join(PHASES.values()) + " | run's peak | fits |",
             "| --- | --- |" + " --- |" * (len(PHASES) + 2)]
    reference = None
    for gb, flags in CAPS.items():
        args = parse(flags + extra)
        result = plan(args, reduced)
        reference = reference or (args, result)
        peaks = " | ".join(f"{phase['peak'] / GiB:.1f}" for phase in result["phases"].values())
        lines.append(f"| {gb} GB | `{' '.join(flags)}` | {peaks} | {run_peak(result):.1f} GiB | "
                     f"{'yes' if run_peak(result) + 2 <= gb else 'no'} |")
    lines += ["", "GiB per phase, each with what train() keeps on the GPU beside it (offloaded models only while "
              "they work).", "", "## One training micro-batch against `--train-batch` (latents, CFG's two halves "
              "counted)", "", "| --train-batch | peak GiB | with --gradient-checkpointing |", "| --- | --- | --- |"]
    for n in sweep:
        peaks = []
        for ckpt in ([], ["--gradient-checkpointing"]):
            with cuda_rules():
                world = World(parse(["--train-batch", str(n), *ckpt, *extra]), reduced)
                peaks.append(train_step(world, world.embeds(world.args.prompts_per_epoch))["peak"] / GiB)
        lines.append(f"| {n} | {peaks[0]:.1f} | {peaks[1]:.1f} |")
    args, result = reference
    flops = epoch_flops(args, result)
    total = sum(flops.values())
    lines += ["", "The defaults' resident set (pipeline, PickScore in float32, LoRA, AdamW, EMA, the epoch's "
              "embeddings) is the floor under every micro-batch.", "",
              "## The reference epoch's compute", "", "| phase | PFLOP |", "| --- | --- |",
              *(f"| {WORK[k]} | {v / 1e15:,.1f} |" for k, v in flops.items()), f"| epoch | {total / 1e15:,.1f} |",
              "", f"Time, eager, at the effective rate measured on one {MEASURED} on 2026-12-04: {EPOCH_RATE} "
              f"TFLOP/s, 419 PFLOP in 48 x 59.4 s with the 80 GB flags, {EPOCH_RATE / MATMUL_RATE:.0%} of the "
              f"{MATMUL_RATE} TFLOP/s its bf16 matmul measured (SD3.5-medium's shapes with random weights, bf16, "
              "512 px, torch 2.11.0+cu130, diffusers 0.42.1, transformers 5.17.0, peft 0.21.2, project at 9eff69b; "
              "bench/README.md). The other cards' rates are predicted, not measured: the H200's scaled by their "
              f"dense bf16 datasheet peaks against its {CARDS[MEASURED]}. With the 24 GB flags the H200's epoch took "
              "80.8 min: smaller batches and offloading run below this rate. Compiled: not yet measured by "
              "`bench/gpu.py`.", "",
              f"| card | datasheet bf16 TFLOP/s | effective TFLOP/s | epoch | {PAPER_EPOCHS} epochs |",
              "| --- | --- | --- | --- | --- |"]
    for card, tflops, seconds in card_times(total):
        kind = "measured" if card == MEASURED else "predicted"
        lines.append(f"| {card} | {CARDS[card]} | {tflops:.0f} ({kind}) | {seconds / 60:.1f} min | "
                     f"{seconds * PAPER_EPOCHS / 3600:,.0f} GPU-hours |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="bench/README.md's table -> --out")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "plan.md")
    parser.add_argument("--reduced", action="store_true", help="the miniature pipeline (seconds, for tests)")
    ours, flags = parser.parse_known_args(argv)
    start = time.perf_counter()
    if ours.write:
        print(write_report(ours.out, ours.reduced))
    else:
        args = parse(flags)
        print("\n".join(describe(args, plan(args, ours.reduced))))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
