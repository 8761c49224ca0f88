"""SD3.5-medium's architecture with random weights, and a PickScore-sized reward model, for GPU benchmarks.

Speed and memory depend on shapes, not on weights, so a benchmark can run the project's own training code on
the real classes and configs without downloading anything:

    python bench/sd35m.py --out /tmp/sd35m --device cuda     # full size, on a GPU: 16 + 4 GB of files
    python bench/sd35m.py --out /tmp/sd35m-mini --reduced    # the same layout in miniature, on a CPU, in seconds
    python bench/sd35m.py --count                            # parameter counts only (meta device, any machine)

writes DIR/model (a StableDiffusion3Pipeline folder) and DIR/pickscore/{model,processor}, and prints the
parameter counts. Then, as with the real models:

    PICKSCORE_MODEL=/tmp/sd35m/pickscore/model PICKSCORE_PROCESSOR=/tmp/sd35m/pickscore/processor \\
        python tempflow_grpo.py --model /tmp/sd35m/model --prompt-file prompts.txt --reward pickscore

From Python, `build_sd35m(device, dtype)` returns the pipeline itself, and `build_pickscore(folder)` saves the
reward model. Full size is only for a GPU: on a CPU the pipeline alone takes 15 GB of memory in bf16.

What is real and what is not:
  - every config below is the released one (checked against copies of the published configs), except the
    special-token ids, which are those of the tokenizers;
  - the tokenizers are the project's tiny-vocabulary ones (tiny_world.TINY_WORDS) at the real lengths, 77 CLIP
    and 128 T5 tokens (the official code's max_sequence_length), while the text encoders keep their real vocabulary
    sizes, so that their embedding tables weigh what the real ones weigh;
  - the reward model is stored in float32, as PickScore_v1 is, so that loading it reads what the real one reads
    (reward.py casts it to the dtype it asks for).

Parameters at full size, counted on the meta device (`python bench/sd35m.py --count`):
    transformer               2,243,171,520  (+ a 226,492,416-value positional-embedding buffer, saved with the
                                              weights: the "2.5B" of the model card)
    vae                          83,819,683
    text_encoder   (CLIP-L)     123,650,304
    text_encoder_2 (CLIP-G)     694,659,840
    text_encoder_3 (T5-XXL)   4,762,310,656
    total                     7,907,612,003  (in bf16: 15.8 GB, 16.3 GB with the buffer)
    PickScore      (CLIP-H)     986,109,441  (float32: 3.9 GB)
"""
import argparse
import copy
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                          CLIPTextModelWithProjection, T5Config, T5EncoderModel)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tempflow_grpo as tg  # noqa: E402
import tiny_world  # noqa: E402

# =====================================================================================================
# The configs: SD3.5-medium's five models and PickScore's CLIP-H, then the same layouts in miniature
# =====================================================================================================

TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=16, norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=1.5305,
           shift_factor=0.0609, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False)
CLIP_H = dict(  # PickScore_v1: CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K) fine-tuned
    projection_dim=1024,
    text_config=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu"))

CLIP_TOKENS = 77  # CLIP's positions; the T5 length is tempflow_grpo's (the official code's 128)
# The tiny tokenizers' special ids (tempflow_grpo._tiny_*_tokenizer). CLIP pools at the first eos: with the real
# configs' eos id 2, transformers would pool at the argmax token id instead, which only fits the real vocabulary.
CLIP_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
T5_IDS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

# Miniatures: the same classes, options and vocabularies, a few layers of a few channels. The widths obey the
# SD3 pipeline's constraints: CLIP-L + CLIP-G hidden <= T5 d_model = joint_attention_dim (the CLIP embeddings
# are concatenated and zero-padded to T5's width) and CLIP-L + CLIP-G projection = pooled_projection_dim.
REDUCED = dict(
    transformer=dict(TRANSFORMER, sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                     joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                     pos_embed_max_size=16, dual_attention_layers=(0,)),
    vae=dict(VAE, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
    clip_l=dict(CLIP_L, hidden_size=8, intermediate_size=16, projection_dim=16, num_hidden_layers=2,
                num_attention_heads=2),
    clip_g=dict(CLIP_G, hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                num_attention_heads=2),
    t5=dict(T5_XXL, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    clip_h=dict(projection_dim=16,
                text_config=dict(CLIP_H["text_config"], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2),
                vision_config=dict(CLIP_H["vision_config"], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2)))
FULL = dict(transformer=TRANSFORMER, vae=VAE, clip_l=CLIP_L, clip_g=CLIP_G, t5=T5_XXL, clip_h=CLIP_H)


def configs(reduced: bool = False) -> dict[str, dict]:
    """The component configs by name: transformer, vae, clip_l, clip_g, t5, clip_h."""
    return copy.deepcopy(REDUCED if reduced else FULL)


# =====================================================================================================
# Building: born on the target device in the target dtype, so that 8B parameters take seconds on a GPU
# =====================================================================================================


@contextmanager
def building_on(device, dtype: torch.dtype):
    """Modules constructed inside allocate and initialise their parameters on `device` in `dtype`, with no CPU
    copy and no cast afterwards; the default dtype is restored on the way out, also after an error."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def seeded(device, seed: int):
    """The RNGs of the CPU and of `device` forked and seeded: random weights repeat for a seed, and the caller's
    generators are left as they were."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def frozen(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Eval mode (a T5 built from a config has dropout on), no gradients, and every tensor in `dtype` on `device`,
    as from_pretrained(dtype=...) leaves it: buffers made in float32 whatever the default (diffusers' positional
    embedding) are cast, the rest is already there."""
    # torch's own .to: diffusers' override warns about float32 modules at every dtype cast, even when there are none
    return torch.nn.Module.to(module, device, dtype).eval().requires_grad_(False)


def sd35m_tokenizers() -> dict:
    """The project's tiny-vocabulary tokenizers at SD3.5's lengths: 77 tokens for both CLIPs, 128 for T5."""
    clip, t5 = tiny_world._tiny_clip_tokenizer(), tiny_world._tiny_t5_tokenizer()
    clip.model_max_length, t5.model_max_length = CLIP_TOKENS, tg.T5_TOKENS
    return dict(tokenizer=clip, tokenizer_2=copy.deepcopy(clip), tokenizer_3=t5)


def sd35m_models(cfg: dict[str, dict]) -> dict[str, torch.nn.Module]:
    """The five models of the pipeline from their configs, random, on the current default device and dtype."""
    return dict(transformer=SD3Transformer2DModel(**cfg["transformer"]), vae=AutoencoderKL(**cfg["vae"]),
                text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_l"], **CLIP_IDS)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["clip_g"], **CLIP_IDS)),
                text_encoder_3=T5EncoderModel(T5Config(**cfg["t5"], **T5_IDS)))


def build_sd35m(device="cpu", dtype: torch.dtype = torch.bfloat16, reduced: bool = False,
                seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-medium (or its miniature) with random weights, built directly on `device` in `dtype`, every model in
    eval mode without gradients, FlowMatchEulerDiscreteScheduler(shift=3.0) as released. device="meta" gives the
    shapes without storage, for counting."""
    with seeded(device, seed), building_on(device, dtype):
        models = sd35m_models(configs(reduced))
    models = {name: frozen(model, device, dtype) for name, model in models.items()}
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **sd35m_tokenizers(),
                                    **models)


def save_sd35m(folder, reduced: bool = False, device="cpu", dtype: torch.dtype = torch.bfloat16) -> Path:
    """Build and save the pipeline where `--model folder` (tempflow_grpo.load_pipeline) loads it. Full size needs
    15 GB of memory on `device`: use a GPU."""
    folder = Path(folder)
    build_sd35m(device, dtype, reduced).save_pretrained(folder)
    return folder


def pickscore_processor() -> CLIPProcessor:
    """PickScore's preprocessing (CLIP's 224 px resize, centre crop and normalisation) and the tiny CLIP tokenizer
    at CLIP's 77 tokens."""
    tokenizer = tiny_world._tiny_clip_tokenizer()
    tokenizer.model_max_length = CLIP_TOKENS
    images = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def pickscore_config(reduced: bool = False) -> CLIPConfig:
    """CLIP ViT-H/14's config (or its miniature) with the tiny CLIP tokenizer's special ids."""
    cfg = configs(reduced)["clip_h"]
    return CLIPConfig(projection_dim=cfg["projection_dim"], vision_config=cfg["vision_config"],
                      text_config=dict(cfg["text_config"], **CLIP_IDS))


def build_pickscore(folder, reduced: bool = False, device="cpu", dtype: torch.dtype = torch.float32,
                    seed: int = 0) -> Path:
    """A random CLIPModel of PickScore's size (CLIP ViT-H/14, about 1B parameters) saved to folder/model, and its
    processor to folder/processor: the paths PICKSCORE_MODEL and PICKSCORE_PROCESSOR take (`pickscore_env`).
    float32 by default, as PickScore_v1 is stored (reward.py casts it to the dtype it asks for)."""
    with seeded(device, seed), building_on(device, dtype):
        model = CLIPModel(pickscore_config(reduced))
    folder = Path(folder)
    frozen(model, device, dtype).save_pretrained(folder / "model")
    pickscore_processor().save_pretrained(folder / "processor")
    return folder


def pickscore_env(folder, setenv=os.environ.__setitem__) -> dict[str, str]:
    """Point reward.py's pickscore at the model `build_pickscore` saved in `folder`, through `setenv(key, value)`
    (a test passes pytest's monkeypatch.setenv); returns what it set."""
    env = dict(PICKSCORE_MODEL=str(Path(folder) / "model"), PICKSCORE_PROCESSOR=str(Path(folder) / "processor"))
    for key, value in env.items():
        setenv(key, value)
    return env


# =====================================================================================================
# Counting and the command line
# =====================================================================================================


def parameter_count(module: torch.nn.Module) -> int:
    """Distinct parameters (tied weights, like T5's shared embedding, once)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(pipe: StableDiffusion3Pipeline) -> dict[str, int]:
    """Parameters of each model of the pipeline, and their total."""
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    counts = {name: parameter_count(getattr(pipe, name)) for name in names}
    return dict(counts, total=sum(counts.values()))


def meta_counts(reduced: bool = False) -> dict[str, int]:
    """parameter_counts of the pipeline and of PickScore, built on the meta device: no memory, any machine."""
    with torch.device("meta"):
        clip_h = CLIPModel(pickscore_config(reduced))
    return dict(parameter_counts(build_sd35m("meta", reduced=reduced)), pickscore=parameter_count(clip_h))


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="writes OUT/model and OUT/pickscore/{model,processor}")
    parser.add_argument("--reduced", action="store_true", help="the miniature: same classes, tiny widths")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to build (full size needs a GPU's memory)")
    parser.add_argument("--count", action="store_true", help="only print the parameter counts (meta device)")
    args = parser.parse_args(argv)
    if not args.count and args.out is None:
        parser.error("give --out DIR, or --count")
    if not (args.count or args.reduced or torch.device(args.device).type == "cuda"):
        parser.error("full size needs about 20 GB of memory where it is built: use --device cuda, or --reduced")
    for name, n in meta_counts(args.reduced).items():
        print(f"{name:>15} {n:>15,}")
    if args.count:
        return
    save_sd35m(args.out / "model", args.reduced, args.device)
    build_pickscore(args.out / "pickscore", args.reduced, args.device)
    env = " ".join(f"{key}={value}" for key, value in pickscore_env(args.out / "pickscore").items())
    print(f"wrote {args.out}; to train on it:\n  {env} python tempflow_grpo.py --model {args.out / 'model'} "
          f"--reward pickscore --prompt-file ...")


if __name__ == "__main__":
    main()
