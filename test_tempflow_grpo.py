"""Properties of tempflow_grpo.py, one per test. CPU only, offline, on tiny pipelines built in code."""
import json
import math
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel

import plumbing
import reward
import tempflow_grpo as tg
import tiny_world
from bench import compare, nft, sd35m

# The reference grid (T = 10, shift 3; README, method 1) and its noise-aware weights for k = 0..8 (method 5).
REFERENCE_GRID = [1.0000, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
REFERENCE_WEIGHTS = [1.577, 1.673, 1.208, 1.004, 0.882, 0.795, 0.719, 0.635, 0.508]


@pytest.fixture(scope="module")
def pipe():
    return tiny_world.build_tiny_pipeline(seed=0)


def reference_grid(steps=10, shift=3.0):
    return tg.sigma_grid(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def random_latents(batch, seed, shape=(4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape, generator=gen)


# ---------------------------------------------------------------- the grid and one step

def test_grid_is_the_schedulers():
    """The T-step grid comes from diffusers' scheduler: s_0 = 1 > ... > s_T = 0, the reference values for T = 10."""
    sigmas = reference_grid()
    assert sigmas.shape == (11,)
    assert torch.allclose(sigmas, torch.tensor(REFERENCE_GRID), atol=1e-4)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


def test_shift_gives_the_grid_of_a_scheduler_with_that_shift_and_leaves_the_models_alone():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grids = {shift: tg.sigma_grid(scheduler, 10, shift=shift) for shift in (1.0, 3.0, 6.0)}
    for shift, grid in grids.items():
        torch.testing.assert_close(grid, reference_grid(shift=shift))
    torch.testing.assert_close(tg.sigma_grid(scheduler, 10, shift=0.0), grids[3.0])  # 0: the scheduler's own
    assert scheduler.config.shift == 3.0
    # a larger shift spends more of the steps at high noise: every interior s_i grows with it
    assert (grids[1.0][1:-1] < grids[3.0][1:-1]).all() and (grids[3.0][1:-1] < grids[6.0][1:-1]).all()


def test_log_prob_is_the_gaussian_density_at_every_grid_index():
    """log_prob = Normal(mean, std).log_prob(y) averaged over C*H*W, finite at every i including s = 1."""
    sigmas = reference_grid()
    x, v = random_latents(3, seed=1)
    for i in range(len(sigmas) - 1):
        y, log_prob, mean, std = tg.sde_step(x, v, sigmas, i, 0.7, generator=torch.Generator().manual_seed(i))
        assert log_prob.shape == (3,) and std.shape == (3,)
        expected = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(y).mean(dim=(1, 2, 3))
        assert torch.isfinite(log_prob).all(), f"log_prob not finite at grid index {i}"
        assert torch.allclose(log_prob, expected, atol=1e-5, rtol=1e-5)


def test_sde_samples_have_the_reported_mean_and_std():
    """(y - mean) / std of sde_step's samples is N(0, 1): its mean and std match within 5 standard errors."""
    sigmas = reference_grid()
    x, v = random_latents(512, seed=2)
    i = torch.arange(512) % (len(sigmas) - 1)
    y, _, mean, std = tg.sde_step(x, v, sigmas, i, 0.7, generator=torch.Generator().manual_seed(3))
    z = ((y - mean) / std.view(-1, 1, 1, 1)).flatten().double()
    n = z.numel()
    # standard error of a sample mean is 1 / sqrt(n); of a Gaussian sample std, about 1 / sqrt(2 n)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)


def test_sde_step_preserves_the_flow_marginals():
    """For Gaussian data and its exact velocity, one SDE step maps the marginal at s_i to the one at s_{i+1},
    with a local error that shrinks like dt^2 (the score correction of the drift is right)."""
    c2 = 0.25  # data x_0 ~ N(0, c2); x_s = (1 - s) x_0 + s x_1 has variance (1 - s)^2 c2 + s^2

    def var(s):
        return (1 - s) ** 2 * c2 + s**2

    def one_step_error(s, ds):
        sigmas = torch.tensor([1.0, s, s - ds, 0.0], dtype=torch.float64)
        x = torch.full((1, 1, 1, 1), math.sqrt(var(s)), dtype=torch.float64)
        v = x * (s - (1 - s) * c2) / var(s)  # E[x_1 - x_0 | x_s], linear in x
        _, _, mean, std = tg.sde_step(x.double(), v.double(), sigmas.double(), 1, 0.7, y=x)
        predicted = (mean / x).item() ** 2 * var(s) + std.item() ** 2
        return abs(predicted - var(s - ds))

    for s in (0.9, 0.6, 0.3):
        coarse, fine = one_step_error(s, 0.02), one_step_error(s, 0.01)
        assert fine < coarse / 3, f"at s = {s}: halving dt took the error from {coarse:.2e} to {fine:.2e}"


def test_zero_noise_level_turns_the_sde_mean_into_the_ode_step():
    """As the noise level a -> 0, sde_step's mean is ode_step's Euler update."""
    sigmas = reference_grid()
    x, v = random_latents(2, seed=4)
    for i in range(len(sigmas) - 1):
        mean = tg.sde_step(x, v, sigmas, i, 1e-6, generator=torch.Generator().manual_seed(0))[2]
        assert torch.allclose(mean, tg.ode_step(x, v, sigmas, i), atol=1e-6)


def test_cps_log_prob_is_the_gaussian_density_at_every_trained_grid_index():
    """CPS: log_prob = Normal(mean, std).log_prob(y) averaged over C*H*W with std_i = s_{i+1} sin(a pi / 2), at every
    grid index but the last (s_T = 0: std 0, the step is the ODE's and is never trained)."""
    sigmas = reference_grid()
    x, v = random_latents(3, seed=1)
    for i in range(len(sigmas) - 2):
        y, log_prob, mean, std = tg.sde_step(x, v, sigmas, i, 0.7, generator=torch.Generator().manual_seed(i),
                                             sampler="cps")
        assert torch.allclose(std, sigmas[i + 1] * math.sin(0.7 * math.pi / 2) * torch.ones(3))
        expected = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1)).log_prob(y).mean(dim=(1, 2, 3))
        assert torch.isfinite(log_prob).all() and torch.allclose(log_prob, expected, atol=1e-5, rtol=1e-5)
        z = (y - mean) / std.view(-1, 1, 1, 1)  # the sample is the mean plus std times a standard normal
        assert abs(z.mean()) < 0.2 and abs(z.std() - 1) < 0.1


def test_cps_with_zero_noise_level_is_the_ode_step():
    """At a = 0 CPS has no noise (std 0) and its mean is ode_step's Euler update, at every grid index."""
    sigmas = reference_grid()
    x, v = random_latents(2, seed=4)
    for i in range(len(sigmas) - 1):
        y, _, mean, std = tg.sde_step(x, v, sigmas, i, 0.0, generator=torch.Generator().manual_seed(0), sampler="cps")
        assert (std == 0).all() and torch.equal(y, mean)
        assert torch.allclose(mean, tg.ode_step(x, v, sigmas, i), atol=1e-6)


def step_map(sigmas, i, mu, sampler, noise_level=0.7):
    """One step on data concentrated at mu with its exact velocity v = (x - mu) / s: y = alpha x + beta + std eps,
    read off sde_step at x = 0 and x = 1 (the mean is linear in x)."""
    s = sigmas[i].item()
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    _, _, mean, std = tg.sde_step(x, (x - mu) / s, sigmas, i, noise_level, y=x, sampler=sampler)
    return (mean[1] - mean[0]).item(), mean[0].item(), std[0].item()


def test_cps_keeps_the_flow_marginal_exactly_where_the_sde_does_so_to_first_order():
    """For data at one point mu (a Gaussian of variance 0), x_s ~ N((1 - s) mu, s^2) and the velocity is known
    exactly, so CPS's predicted image and noise are the true ones: one CPS step, however long, lands on the flow's
    marginal at s_{i+1} to float32 round-off (its noise coefficients add in quadrature to s_{i+1}). The SDE's step
    of the same length misses it by an error that shrinks like dt^2 (exact to first order only)."""
    mu = 0.8

    def error(s, ds, sampler):
        sigmas = torch.tensor([1.0, s, s - ds, 0.0], dtype=torch.float64)
        alpha, beta, std = step_map(sigmas, 1, mu, sampler)
        mean, var = alpha * (1 - s) * mu + beta, alpha**2 * s**2 + std**2  # of y, for x ~ N((1 - s) mu, s^2)
        return abs(mean - (1 - s + ds) * mu) + abs(var - (s - ds) ** 2)

    for s in (0.9, 0.6, 0.3):
        assert error(s, s / 2, "cps") < 1e-6 < 1e-2 < error(s, s / 2, "sde")  # float32 round-off against the SDE's
        coarse, fine = error(s, 0.02, "sde"), error(s, 0.01, "sde")
        assert coarse > 1e-6 and fine < coarse / 3, f"at s = {s}: the SDE's error {coarse:.2e} -> {fine:.2e}"


def test_ode_step_equals_diffusers_scheduler_step(pipe):
    """ode_step is FlowMatchEulerDiscreteScheduler.step on the pipeline's own grid."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    sigmas = tg.sigma_grid(pipe.scheduler, 10)
    x, v = random_latents(2, seed=5)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(v, t, x, return_dict=False)[0]
        assert torch.equal(tg.ode_step(x, v, sigmas, i), expected)


def test_mixed_grid_indices_in_a_batch_match_one_index_at_a_time():
    """A batch whose rows sit at different grid indices gives each row what its own index gives alone."""
    sigmas = reference_grid()
    x, v = random_latents(4, seed=6)
    i = torch.tensor([0, 3, 5, 8])
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    _, log_prob, mean, std = tg.sde_step(x, v, sigmas, i, 0.7, y=y)
    x_next = tg.ode_step(x, v, sigmas, i)
    for row, k in enumerate(i.tolist()):
        r = slice(row, row + 1)
        _, lp_k, mean_k, std_k = tg.sde_step(x[r], v[r], sigmas, k, 0.7, y=y[r])
        assert torch.allclose(log_prob[r], lp_k) and torch.allclose(mean[r], mean_k) and torch.allclose(std[r], std_k)
        assert torch.allclose(x_next[r], tg.ode_step(x[r], v[r], sigmas, k))


# ---------------------------------------------------------------- noise-aware weighting

def test_noise_aware_weights_match_the_reference_table_and_average_one():
    """On the reference grid the weights are the reference table, mean exactly 1, largest early and smallest late."""
    weights = tg.noise_aware_weights(reference_grid(), 0.7, list(range(9)))
    assert torch.allclose(weights, torch.tensor(REFERENCE_WEIGHTS), atol=1e-3)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.argmin() == 8 and weights[:2].min() > weights[2:].max()


def test_noise_aware_weights_are_computed_from_the_grid():
    """Another grid (more steps, another shift, a subset of steps) gives other weights, each averaging 1."""
    reference = tg.noise_aware_weights(reference_grid(), 0.7, list(range(9)))
    for weights in (tg.noise_aware_weights(reference_grid(steps=10, shift=1.0), 0.7, list(range(9))),
                    tg.noise_aware_weights(reference_grid(steps=20), 0.7, list(range(0, 18, 2)))):
        assert weights.mean().item() == pytest.approx(1.0, abs=1e-6)
        assert not torch.allclose(weights, reference, atol=1e-2)
    subset = tg.noise_aware_weights(reference_grid(), 0.7, [0, 4, 8])
    assert torch.allclose(subset, reference[[0, 4, 8]] / reference[[0, 4, 8]].mean(), atol=1e-6)


# ---------------------------------------------------------------- the pipeline

def test_ode_rollout_reproduces_the_diffusers_pipeline(pipe):
    """ode_step + the CFG velocity on prompt embeddings from encode_prompt reproduce StableDiffusion3Pipeline."""
    prompts, steps, guidance, size = ["a red circle on the left", "two blue squares"], 6, 4.5, 64
    expected = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    generator=torch.Generator().manual_seed(0), output_type="latent",
                    max_sequence_length=pipe.tokenizer_3.model_max_length).images
    embeds = tg.encode_prompts(pipe, prompts)
    x = tg.initial_noise(pipe, len(prompts), size, torch.Generator().manual_seed(0))
    sigmas = tg.sigma_grid(pipe.scheduler, steps)
    with torch.no_grad():
        ours = tg.ode_rollout(tg.sd3_velocity(pipe.transformer, embeds, guidance), x, sigmas)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_tiny_pipeline_is_deterministic_and_in_eval_mode(pipe):
    """The same seed builds the same weights; every component is in eval mode (T5's dropout is off)."""
    again, other = tiny_world.build_tiny_pipeline(seed=0), tiny_world.build_tiny_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b, c = (getattr(p, name).state_dict() for p in (pipe, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between two builds with seed 0"
        assert not all(torch.equal(a[k], c[k]) for k in a), f"{name} does not depend on the seed"
        assert not any(m.training for m in getattr(pipe, name).modules()), f"{name} is in train mode"


def test_missing_model_fails_with_one_line_naming_it():
    """Offline and without the files, loading a model exits with one line naming the model and --model."""
    with pytest.raises(SystemExit) as err:
        plumbing.load_pipeline("no-such-org/no-such-model")
    message = str(err.value)
    assert "\n" not in message and "no-such-org/no-such-model" in message and "--model" in message


# ---------------------------------------------------------------- rewards

@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel and its processor, saved where PickScore's and CLIP's would be downloaded."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = tiny_world._tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8, logit_scale_init_value=3.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def reference_clip_scores(path, images, prompts):
    """logit_scale, and the cosine of normalised image and text embeddings, computed without reward.py."""
    from transformers import AutoProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    pil = [reward.Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    with torch.no_grad():
        image = model.get_image_features(**processor(images=pil, return_tensors="pt")).pooler_output
        text = model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text)
    return model.logit_scale.exp().item(), cosine


def test_pickscore_is_logit_scale_times_cosine(tiny_clip_dir, monkeypatch):
    """pickscore, loaded through its own loading code from a local copy, is exp(logit_scale) * cosine."""
    monkeypatch.setenv("PICKSCORE_MODEL", tiny_clip_dir)
    monkeypatch.setenv("PICKSCORE_PROCESSOR", tiny_clip_dir)
    images, prompts = torch.rand(3, 3, 40, 40), ["a red ball", "two blue squares", "a green circle on the left"]
    scores = reward.load_reward("pickscore")(images, prompts)
    scale, cosine = reference_clip_scores(tiny_clip_dir, images, prompts)
    assert torch.allclose(scores["pickscore"], scale * cosine, atol=1e-5)


def test_clipscore_is_the_cosine(tiny_clip_dir, monkeypatch):
    """clipscore is the plain cosine of CLIP's normalised image and text embeddings."""
    monkeypatch.setenv("CLIPSCORE_MODEL", tiny_clip_dir)
    images, prompts = torch.rand(2, 3, 32, 32), ["a red ball", "a blue ball"]
    _, cosine = reference_clip_scores(tiny_clip_dir, images, prompts)
    assert torch.allclose(reward.load_reward("clipscore")(images, prompts)["reward"], cosine, atol=1e-5)


def test_missing_reward_model_fails_with_one_line(monkeypatch):
    """A reward model that is neither on disk nor reachable fails with one line naming it and the variable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: fail at once, no retries
    monkeypatch.setenv("PICKSCORE_MODEL", "no-such-org/no-such-pickscore")
    with pytest.raises(SystemExit) as err:
        reward.load_reward("pickscore")
    assert "\n" not in str(err.value) and "no-such-org/no-such-pickscore" in str(err.value)
    assert "PICKSCORE_MODEL" in str(err.value)


def test_flat_image_is_more_jpeg_compressible_than_noise():
    """A flat image compresses to fewer kB than noise."""
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.stack([torch.full((3, 64, 64), 0.5), noise])
    compress = reward.jpeg_compressibility(images, ["", ""])
    assert compress[0] > compress[1]
    assert torch.equal(reward.jpeg_incompressibility(images, ["", ""]), -compress)


def test_color_reward_follows_the_prompt():
    """A red image beats a blue one for `a red ball`, and the reverse for `a blue ball`."""
    red, blue = torch.zeros(3, 32, 32), torch.zeros(3, 32, 32)
    red[0], blue[2] = 1.0, 1.0
    images = torch.stack([red, blue])
    for_red, for_blue = reward.color(images, ["a red ball"] * 2), reward.color(images, ["a blue ball"] * 2)
    assert for_red[0] > for_red[1] and for_blue[1] > for_blue[0]


def test_weighted_sum_reports_every_component():
    """`color:2,jpeg_compressibility:0.5` gives both components and their weighted sum."""
    images, prompts = torch.rand(3, 3, 32, 32), ["a red ball", "a blue ball", "a green ball"]
    scores = reward.load_reward("color:2,jpeg_compressibility:0.5")(images, prompts)
    assert set(scores) == {"reward", "color", "jpeg_compressibility"}
    assert torch.allclose(scores["reward"], 2 * scores["color"] + 0.5 * scores["jpeg_compressibility"])


def test_plugin_reward_from_a_file_is_called_in_capped_batches(tmp_path):
    """`file.py:function` loads the user's function; it never sees more than batch_size images at once."""
    (tmp_path / "mine.py").write_text("def brightness(images, prompts):\n"
                                      "    assert len(images) <= 3, f'called with {len(images)} images'\n"
                                      "    return images.mean(dim=(1, 2, 3))\n")
    images = torch.rand(7, 3, 8, 8)
    fn = reward.load_reward(f"{tmp_path / 'mine.py'}:brightness:3", batch_size=3)
    assert torch.allclose(fn(images, [""] * 7)["reward"], 3 * images.mean(dim=(1, 2, 3)))


def test_unknown_reward_lists_the_known_ones_before_loading_any_model(monkeypatch):
    """An unknown name exits with the list of known rewards, before the valid ones before it are built."""
    monkeypatch.setenv("PICKSCORE_MODEL", "/no/such/model")  # loading pickscore would fail with another message
    with pytest.raises(SystemExit) as err:
        reward.load_reward("pickscore,sharpness")
    assert "'sharpness'" in str(err.value) and "geneval_toy" in str(err.value) and "color" in str(err.value)


def test_non_finite_component_makes_that_sample_non_finite_only(tmp_path):
    """A plug-in's NaN for one image makes that sample's reward NaN and leaves the others finite."""
    (tmp_path / "flaky.py").write_text("import torch\n"
                                       "def flaky(images, prompts):\n"
                                       "    nan = float('nan')\n"
                                       "    return torch.tensor([nan if p == 'bad' else 1.0 for p in prompts])\n")
    fn = reward.load_reward(f"{tmp_path / 'flaky.py'}:flaky,color")
    scores = fn(torch.rand(3, 3, 8, 8), ["a red", "bad", "a red"])
    assert torch.isfinite(scores["reward"]).tolist() == [True, False, True]


# ---------------------------------------------------------------- rollouts

def tiny_rollout(pipe, branches, steps=6, branch_steps=(0, 2, 4), n=2, guidance=4.5, max_batch=1024, seed=0,
                 **options):
    """A rollout of n initial noises of two prompts on the tiny pipeline: TempFlow's with branches > 0, Flow-GRPO's with
    0, BranchGRPO's with split_steps (options: sampler, finish_steps, split_steps, split_factor)."""
    embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
    gen = torch.Generator().manual_seed(seed)
    noise = tg.initial_noise(pipe, n, 64, gen)
    sigmas = tg.sigma_grid(pipe.scheduler, steps)
    velocity_fn = tg.sd3_velocity(pipe.transformer, embeds.take(torch.arange(n) % 2), guidance, max_batch)
    kind = "tree" if options.get("split_steps") else "branch" if branches else "sde"
    out = tg.rollout(velocity_fn, noise, sigmas, kind, list(branch_steps), 0.7, gen, branches, **options)
    return out, embeds.take(torch.arange(n) % 2), sigmas


def test_branches_share_their_state_and_differ_only_in_the_sde_noise(pipe):
    """Credit localization: the G branches of one (noise, k) leave the same x_k, differ only by their SDE noise
    at k, and the ODE from a recorded y_k reproduces that branch's final latent."""
    out, embeds, sigmas = tiny_rollout(pipe, branches=3)
    for noise in range(2):
        for k in (0, 2, 4):
            rows = ((out.step == k) & (out.image_noise[out.image] == noise)).nonzero().flatten()
            assert len(rows) == 3
            assert all(torch.equal(out.x[rows[0]], out.x[r]) for r in rows), "branches of a group left different x_k"
            assert not torch.equal(out.y[rows[0]], out.y[rows[1]]), "two branches drew the same SDE noise"
    row = ((out.step == 2) & (out.image_noise[out.image] == 1)).nonzero()[0, 0]
    with torch.no_grad():
        finished = tg.ode_rollout(tg.sd3_velocity(pipe.transformer, embeds.take([1]), 4.5), out.y[row:row + 1], sigmas,
                                  start=3)
    assert torch.allclose(finished, out.latents[out.image[row]][None], atol=1e-5)


def test_sde_rollout_records_every_branch_step_of_each_sample(pipe):
    """Flow-GRPO's rollout: one image per initial noise, one recorded transition per branch step, chained."""
    out, _, _ = tiny_rollout(pipe, branches=0)
    assert len(out.latents) == 2 and (out.image_step == -1).all()
    for sample in range(2):
        rows = (out.image == sample).nonzero().flatten()
        assert out.step[rows].tolist() == [0, 2, 4]
        assert not torch.equal(out.y[rows[0]], out.x[rows[1]])  # an ODE step (index 1) lies between 0 and 2


@pytest.mark.parametrize("kind, sampler, finish", [("branch", "sde", 0), ("sde", "sde", 0), ("branch", "cps", 2),
                                                   ("branch", "sde", 1), ("sde", "cps", 0)])
def test_rollout_costs_the_cost_formula_in_t_transformer_calls(pipe, kind, sampler, finish):
    """Latents through the transformer equal the cost formula's count (279 per seed for T = 10, B = 0..8, G = 6,
    times 2 for CFG; with a finish of at most F steps, max(B) + 1 + G sum_k min(F, T - 1 - k)), in at most T calls
    when nothing is chunked, and in more calls, with the same count, under a small max_batch."""
    branches, steps, branch_steps = (6 if kind == "branch" else 0), 10, list(range(9))
    formula = tg.rollout_nfe(kind, steps, branch_steps, 6, 4.5, finish)
    by_hand = {0: 279, 1: 9 + 6 * 9, 2: 9 + 6 * (2 * 8 + 1)}[finish]
    assert formula == (2 * by_hand if kind == "branch" else 2 * 10)
    for max_batch, most_calls in ((1024, steps), (2, None)):
        latents = []  # one entry per transformer call
        hook = pipe.transformer.register_forward_hook(
            lambda m, a, kw, o: latents.append(len(kw["hidden_states"])), with_kwargs=True)
        try:
            tiny_rollout(pipe, branches, steps, branch_steps, n=2, max_batch=max_batch, sampler=sampler,
                         finish_steps=finish)
        finally:
            hook.remove()
        assert sum(latents) == 2 * formula and max(latents) <= max_batch
        assert len(latents) == steps if most_calls else len(latents) > steps


def test_finish_steps_change_only_how_branches_end(pipe):
    """--finish-steps F: trunks, branch states, SDE samples and log-probs are those of the full finish (the same
    draws in the same order; to float32 round-off, as the trunks share their transformer calls with fewer branches,
    which some CPUs' kernels sum in another order), F = 0 and an F past every branch's remaining steps are the full
    finish itself, bit for bit, and a branch born at k ends by Euler steps over the grid points F + 1 spread evenly
    over k+1..T."""
    full, embeds, sigmas = tiny_rollout(pipe, branches=2, steps=8, branch_steps=(0, 3, 5))
    for finish in (0, 7):
        same = tiny_rollout(pipe, branches=2, steps=8, branch_steps=(0, 3, 5), finish_steps=finish)[0]
        assert all(torch.equal(a, b) for a, b in zip(full, same))
    coarse = tiny_rollout(pipe, branches=2, steps=8, branch_steps=(0, 3, 5), finish_steps=2)[0]
    assert torch.equal(full.step, coarse.step) and torch.equal(full.image, coarse.image)
    for f in ("x", "y", "log_prob"):
        torch.testing.assert_close(getattr(coarse, f), getattr(full, f), rtol=1e-5, atol=1e-5)
    assert tg.finish_grid(0, 8, 2) == [1, 4, 8] and tg.finish_grid(3, 8, 2) == [4, 6, 8]  # 1, 4.5, 8: to even
    assert tg.finish_grid(5, 8, 2) == [6, 7, 8] and tg.finish_grid(5, 8, 0) == [6, 7, 8]  # 2 steps left: all of them
    for row in ((coarse.step == 3) & (coarse.image_noise[coarse.image] == 1)).nonzero().flatten()[:1].tolist():
        x, prompt = coarse.y[row:row + 1], embeds.take([1])
        path = tg.finish_grid(3, 8, 2)
        with torch.no_grad():
            for i, j in zip(path, path[1:]):
                v = tg.cfg_velocity(pipe.transformer, x, sigmas[i:i + 1], prompt, 4.5)
                x = tg.ode_step(x, v, sigmas, i, j)
        assert torch.allclose(x, coarse.latents[coarse.image[row]][None], atol=1e-5)
        assert not torch.allclose(x, full.latents[full.image[row]][None], atol=1e-3)


def tree_rollout(pipe, steps=6, branch_steps=(0, 1, 2, 3, 4), split_steps=(0, 2), factor=2, n=2, **options):
    return tiny_rollout(pipe, 0, steps, branch_steps, n=n, split_steps=list(split_steps), split_factor=factor,
                        **options)


@pytest.mark.parametrize("max_batch", [1024, 4])
def test_a_tree_costs_its_formula_and_grows_by_its_splits(pipe, max_batch):
    """BranchGRPO's tree: before step i a root has f ** (splits before i) nodes, all of them in one batched call
    (more calls under a small max_batch, the same latents); after it f ** (splits up to i) nodes, each the end of
    one recorded transition; its leaves are f ** |splits| images. The count matches the formula (BranchGRPO's example:
    T = 10, splits 0, 3, 6, f = 2: 43 per root)."""
    assert tg.rollout_nfe("tree", 10, list(range(9)), 6, 4.5, 0, [0, 3, 6], 2) == 2 * 43
    latents, steps, splits = [], 6, (0, 2)
    hook = pipe.transformer.register_forward_hook(lambda m, a, kw, o: latents.append(len(kw["hidden_states"])),
                                                  with_kwargs=True)
    try:
        out, _, _ = tree_rollout(pipe, steps, split_steps=splits, max_batch=max_batch)
    finally:
        hook.remove()
    before = [2 ** sum(k < i for k in splits) for i in range(steps)]
    assert sum(latents) == 2 * tg.rollout_nfe("tree", steps, list(range(5)), 6, 4.5, 0, list(splits), 2)
    assert sum(latents) == 2 * 2 * sum(before) and (len(latents) == steps) == (max_batch == 1024)
    assert [int((out.step == i).sum()) for i in range(5)] == [2 * 2 ** sum(k <= i for k in splits) for i in range(5)]
    assert len(out.latents) == 2 * 4 and out.image_noise.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_nodes_children_share_its_state_and_differ_only_in_their_sde_noise(pipe):
    """At a split step the children of one node leave the state their parent reached, differ in their SDE sample
    only, and score by the leaves below them: the nodes of a step with N of them split the L leaves in blocks of
    L / N, in order."""
    out, _, _ = tree_rollout(pipe)
    parents, children = (out.step == 1).nonzero().flatten(), (out.step == 2).nonzero().flatten()
    assert len(children) == 2 * len(parents) == 8
    for j, child in enumerate(children.tolist()):
        parent = parents[j // 2]
        assert torch.equal(out.x[child], out.y[parent]), "a child left another state than its parent reached"
        assert out.image[child] == j and out.span[child] == 1 and out.span[parent] == 2
        assert out.image[parent] == 2 * (j // 2)
    assert not torch.equal(out.y[children[0]], out.y[children[1]]), "two children drew the same SDE noise"
    assert torch.equal(out.x[children[0]], out.x[children[1]])
    assert (out.span[out.step == 0] == 2).all() and (out.span[out.step == 4] == 1).all()


def test_fused_rewards_and_depth_wise_advantages_match_a_hand_computed_tree():
    """One root, splits at steps 0 and 1 (f = 2), SDE at 0, 1, 2; leaf rewards 1, 3, 2, 6. A node's reward is the
    mean of its leaves' (2 and 4 after step 0; the leaves' own after steps 1 and 2), its group the nodes of its
    depth, A = (r - mean) / (population std + 1e-4). Width pruning to the best and worst leaf (6 and 1) trains
    their paths only; depth pruning drops a step."""
    step = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    first, span = torch.tensor([0, 2, 0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([2, 2, 1, 1, 1, 1, 1, 1, 1, 1])
    k = len(step)
    out = tg.Rollout(torch.zeros(0, 1), torch.zeros(4, dtype=torch.long), torch.full((4,), -1), torch.zeros(k, 1),
                     torch.zeros(k, 1), torch.zeros(k), step, first, span)
    scores = {"reward": torch.tensor([1.0, 3.0, 2.0, 6.0])}
    assert tg.fused_rewards(scores["reward"], first, span).tolist() == [2, 4, 1, 3, 2, 6, 1, 3, 2, 6]
    std_leaves = math.sqrt(((1 - 3) ** 2 + 0 + (2 - 3) ** 2 + (6 - 3) ** 2) / 4)
    leaves = [(r - 3) / (std_leaves + 1e-4) for r in (1, 3, 2, 6)]
    by_hand = [-1 / (1 + 1e-4), 1 / (1 + 1e-4), *leaves, *leaves]
    args = tg.finalize(tg.Args(prompt_file=str(Path(tg.__file__).parent / "tiny_world" / "prompts.txt"),
                               method="branch_grpo", steps=4, branch_steps="0-2", split_steps="0,1"))
    batch, metrics = tg.trained_batch(out, scores, torch.zeros(1, dtype=torch.long), args)
    assert torch.allclose(batch.advantage, torch.tensor(by_hand), atol=1e-6) and len(batch.x) == k
    assert metrics["reward_mean"] == 3 and metrics["zero_std_frac"] == 0
    batch, _ = tg.trained_batch(out, scores, torch.zeros(1, dtype=torch.long), replace(args, prune_width=1))
    assert torch.allclose(batch.advantage, torch.tensor(by_hand)[[0, 1, 2, 5, 6, 9]], atol=1e-6)
    batch, _ = tg.trained_batch(out, scores, torch.zeros(1, dtype=torch.long), replace(args, prune_depth="2"))
    assert batch.step.tolist() == [0, 0, 1, 1, 1, 1]


def test_a_branch_grpo_run_counts_its_trees_cost(random_model, prompt_file, tmp_path):
    """--method branch_grpo on the tiny pipeline: the epoch's images, trained transitions and transformer
    evaluations counted by the forward hook are the epoch's sizes from the formula."""
    args = quick_args(random_model, prompt_file, tmp_path, "--method", "branch_grpo", "--split-steps", "0,1",
                      "--epochs", "1", "--no-drop-zero-std")
    row = tg.train(args)[0]
    size = tg.epoch_size(args, plumbing.parse_steps(args.branch_steps, args.steps))
    assert (row["images"], row["transitions"], row["nfe"]) == (size["images"], size["transitions"],
                                                                size["rollout_nfe"] + size["train_nfe"])
    assert (size["images"], size["transitions"]) == (2 * 4, 2 * (2 + 4 + 4))


# ---------------------------------------------------------------- advantages and the loss

def test_group_advantages_are_standardised_per_group():
    """Each group's advantages have mean 0 and (population) std 1; equal rewards give 0, not NaN."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.cat([torch.randn(6, generator=gen), torch.randn(6, generator=gen) * 3 + 2, torch.full((6,), 0.5)])
    groups = torch.arange(3).repeat_interleave(6)
    adv, zero_std = tg.group_advantages(rewards, groups)
    for g in range(2):
        a = adv[groups == g].double()
        assert abs(a.mean()) < 1e-6 and abs(a.std(unbiased=False) - 1) < 1e-3
    assert torch.equal(adv[groups == 2], torch.zeros(6)) and zero_std.tolist() == [False] * 12 + [True] * 6


def test_group_advantages_are_clipped_and_skip_non_finite_rewards():
    """Advantages stay within [-5, 5]; a NaN reward gets A = 0 and leaves its group's statistics alone."""
    rewards = torch.tensor([0.0] * 99 + [1.0])
    adv, _ = tg.group_advantages(rewards, torch.zeros(100, dtype=torch.long))
    assert adv.max() == 5.0 and adv.min() > -5
    with_nan = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    adv, _ = tg.group_advantages(with_nan, torch.zeros(4, dtype=torch.long))
    clean, _ = tg.group_advantages(with_nan[:3], torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(adv).all() and adv[3] == 0 and torch.allclose(adv[:3], clean)


def test_global_std_divides_by_the_std_of_all_rewards_and_keeps_the_group_mean():
    """Per-group std (TempFlow) and global std (Flow-GRPO's global_std) against a hand computation."""
    rewards = torch.tensor([1.0, 2.0, 4.0, 10.0, 10.0, 13.0, float("nan")])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    r, g = rewards[:6].double().numpy(), groups[:6].numpy()
    means = np.array([r[g == j].mean() for j in g])
    per_group = (r - means) / (np.array([r[g == j].std() for j in g]) + 1e-4)
    overall = (r - means) / (r.std() + 1e-4)
    for global_std, expected in ((False, per_group), (True, overall)):
        adv, _ = tg.group_advantages(rewards, groups, clip=100.0, global_std=global_std)
        assert np.allclose(adv[:6].numpy(), expected, atol=1e-6) and adv[6] == 0


def test_a_trunk_is_dropped_only_when_all_its_advantages_are_zero():
    """The official rule (method 6): the zero-advantage images of a trunk with any signal still train; a trunk
    without any signal does not; --drop-zero-std drops every equal-reward group instead; a non-finite reward never
    trains."""
    # trunk 0: one group with a signal, one of equal rewards; trunk 1: two groups of equal rewards
    rewards = torch.tensor([0.2, 0.8, 0.5, 0.5, 0.3, 0.3, 0.9, 0.9, float("nan"), 0.4])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    trunk = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    adv, zero_std = tg.group_advantages(rewards, groups)
    valid = torch.isfinite(rewards)
    official = tg.trained_images(adv, trunk, valid, zero_std, drop_zero_std=False)
    assert official.tolist() == [True] * 4 + [False] * 4 + [False, False]
    dropped = tg.trained_images(adv, trunk, valid, zero_std, drop_zero_std=True)
    assert dropped.tolist() == [True] * 2 + [False] * 8


@pytest.fixture()
def lora_pipe():
    pipe = tiny_world.build_tiny_pipeline(seed=0)
    return pipe, tg.add_lora(pipe.transformer, rank=4)


def tiny_batch(pipe, advantage, sampler="sde", kind="branch"):
    """The branch (or BranchGRPO tree) rollout's transitions as a training batch with one advantage for all."""
    tree = dict(split_steps=[0, 2], split_factor=2) if kind == "tree" else {}
    out, _, sigmas = tiny_rollout(pipe, branches=2 if kind == "branch" else 0, sampler=sampler, **tree)
    return tg.Batch(out.x, out.y, out.log_prob, out.step, out.image_noise[out.image] % 2,
                    torch.full_like(out.log_prob, advantage)), sigmas


def test_lora_targets_the_official_joint_attention_projections_of_sd35_medium():
    """The official LoRA targets (method 6): on SD3.5-medium's transformer (built on the meta device) the LoRA wraps
    the 191 joint-attention projections, none of the dual-attention blocks' attn2, with 18.8 M parameters at rank
    32."""
    transformer = sd35m.build_sd35m("meta").transformer
    params = tg.add_lora(transformer, rank=32)
    wrapped = [name for name, module in transformer.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == 191 and not any(".attn2." in name for name in wrapped)
    assert round(sum(p.numel() for p in params) / 1e6, 1) == 18.8


def test_t5_prompt_is_128_tokens_as_the_official_code_encodes():
    """As the official code encodes them, the prompt embeddings hold the CLIP tokens and 128 T5 tokens, not the
    pipeline's default 256."""
    pipe = tiny_world.build_tiny_pipeline(seed=0)
    pipe.tokenizer_3.model_max_length = 512
    clip_tokens = pipe.tokenizer.model_max_length
    assert tg.encode_prompts(pipe, ["a red circle"]).embeds.shape[1] == clip_tokens + 128


def test_default_epoch_is_the_reference_batch(tmp_path):
    """The reference recipe: by default an epoch is 48 prompts x 4 seeds: 10,368 trained transitions, 5,184 per
    optimizer step, for TempFlow's branches and for Flow-GRPO's 48 groups of 24 alike."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    for method in ("tempflow", "flow_grpo"):
        args = tg.finalize(tg.Args(prompt_file=str(prompts), method=method))
        size = tg.epoch_size(args, plumbing.parse_steps(args.branch_steps, args.steps))
        assert (args.prompts_per_epoch, size["transitions"], size["per_step"]) == (48, 10368, 5184)


def test_ema_follows_the_official_decay_schedule():
    """The official EMA: it moves at every 8th optimizer step n, to decay_n ema + (1 - decay_n) live with
    decay_n = min((1 + n) / (10 + n), 0.9), and stays put in between."""
    param = torch.nn.Parameter(torch.zeros(3))
    ema, expected = EMAModel([param], decay=tg.EMA_DECAY), torch.zeros(3)
    for n in range(1, 121):
        with torch.no_grad():
            param.add_(1.0)  # the live weights after optimizer step n
        tg.ema_update(ema, [param], n)
        if (n + 1) % 8 == 0:
            decay = min((1 + n) / (10 + n), 0.9)
            expected = decay * expected + (1 - decay) * param.detach()
        assert torch.allclose(ema.shadow_params[0], expected, atol=1e-5), n
    with tg.ema_weights(ema, [param]):
        assert torch.equal(param.detach(), ema.shadow_params[0])
    assert torch.equal(param.detach(), torch.full((3,), 120.0))  # the live weights are back


@pytest.mark.parametrize("sampler, kind", [("sde", "branch"), ("cps", "branch"), ("sde", "tree")])
def test_first_training_pass_has_ratio_one_and_zero_kl(lora_pipe, sampler, kind):
    """Re-scoring freshly sampled transitions with the same policy gives ratio 1 and, before any update (B = 0),
    KL 0 to the base model, under either sampler, and for BranchGRPO's tree."""
    pipe, _ = lora_pipe
    batch, sigmas = tiny_batch(pipe, 1.0, sampler, kind)
    args = tg.Args(guidance=4.5, beta=0.004, sampler=sampler)
    embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
    _, stats = tg.transition_loss(pipe.transformer, batch, torch.arange(len(batch.x)), embeds, sigmas,
                                  torch.ones(6), args)
    assert abs(stats["ratio_mean"] - 1) < 1e-6 and stats["clipfrac"] == 0 and stats["approx_kl"] < 1e-12
    assert stats["kl"] == 0


@pytest.mark.parametrize("advantage, sampler, kind", [(1.0, "sde", "branch"), (-1.0, "sde", "branch"),
                                                     (1.0, "cps", "branch"), (-1.0, "cps", "branch"),
                                                     (1.0, "sde", "tree"), (-1.0, "sde", "tree")])
def test_one_update_moves_the_log_prob_with_the_advantage(lora_pipe, advantage, sampler, kind):
    """One optimizer step on transitions with positive advantage raises their log-probability; negative lowers it
    (branches and BranchGRPO's tree alike)."""
    pipe, params = lora_pipe
    batch, sigmas = tiny_batch(pipe, advantage, sampler, kind)
    embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
    args = tg.Args(guidance=4.5, beta=0.0, clip_range=0.2, optimizer_steps=1, max_batch=1024, sampler=sampler)
    rows = torch.arange(len(batch.x))
    optimizer = torch.optim.SGD(params, lr=1e-2)  # a step the ratio shows in float32 on every batch
    tg.update(pipe.transformer, params, optimizer, batch, embeds, sigmas, torch.ones(6), args, torch.Generator())
    with torch.no_grad():
        _, stats = tg.transition_loss(pipe.transformer, batch, rows, embeds, sigmas, torch.ones(6), args)
    # ratio = pi_new / pi_old over the same transitions: above 1 means their log-probability rose
    assert (stats["ratio_mean"] - 1) * advantage > 0 and stats["approx_kl"] > 0


def test_diffusionnft_loss_matches_a_hand_computed_case():
    """bench/nft.py's loss on two 2-element latents, worked by hand: the implicit positive and negative policies,
    their x0 errors divided by their mean absolute error, weighted by r and 1 - r, scaled by adv_clip / beta, plus
    kl_beta times the squared distance to the base model."""
    r = nft.optimality(torch.tensor([5.0, -2.5, 0.0, 9.0]), adv_clip=5.0)
    assert r.tolist() == [1.0, 0.25, 0.5, 1.0]
    lat = lambda *rows: torch.tensor(rows).view(len(rows), 2, 1, 1)  # noqa: E731
    x0, x_t = lat([1.0, 0.0], [0.0, 2.0]), lat([0.5, 0.5], [1.0, 1.0])
    v, v_old, v_ref = lat([1.0, -1.0], [0.5, 0.5]), lat([0.0, 0.0], [1.0, -1.0]), lat([0.0, 0.0], [0.5, 0.5])
    loss, stats = nft.nft_loss(v, v_old, v_ref, x0, x_t, torch.tensor([0.5, 1.0]), r[:2], beta=1.0, kl_beta=0.1,
                               adv_clip=5.0)
    # sample 0, r = 1: v+ = v = (1, -1), x0+ = (0, 1), e = (-1, 1), L+ = 1 / 1; v- = -v, x0- = x0, L- = 0 -> 5 * 1
    # sample 1, r = 1/4: x0+ = (0.5, 0.5), e = (0.5, -1.5), L+ = 1.25 / 1; v- = 2 v_old - v = (1.5, -2.5),
    # x0- = (-0.5, 3.5), e = (-0.5, 1.5), L- = 1.25 -> 5 * (0.25 * 1.25 + 0.75 * 1.25) = 6.25; KL 1 and 0
    assert stats["policy_loss"].item() == pytest.approx((5 + 6.25) / 2)
    assert stats["kl"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx((5 + 6.25) / 2 + 0.1 * 0.5)


@pytest.mark.parametrize("advantage", [5.0, -5.0])
def test_diffusionnft_pulls_v_toward_a_positive_sample_and_pushes_it_from_a_negative(advantage):
    """On the first step (v_old = v), a gradient step on a sample with r = 1 brings v's clean-latent prediction
    closer to the sample; with r = 0 it moves it away."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = torch.randn(3, 4, 2, 2, generator=gen, requires_grad=True)
    r = nft.optimality(torch.full((3,), advantage))
    loss, _ = nft.nft_loss(v, v.detach(), v.detach(), x0, x_t, t, r, beta=0.5)
    loss.backward()
    error = lambda velocity: (x_t - t.view(-1, 1, 1, 1) * velocity - x0).flatten(1).norm(dim=1)  # noqa: E731
    moved = error(v.detach() - 1e-3 * v.grad) - error(v.detach())
    assert ((moved < 0) if advantage > 0 else (moved > 0)).all()


def test_the_plumbing_never_imports_the_trainer():
    """plumbing.py, and every module of this repository it imports (at the top or inside a function), never import
    tempflow_grpo.py: what the plumbing needs from the trainer comes in as values."""
    import ast

    root, seen, todo = Path(tg.__file__).parent, set(), ["plumbing"]
    while todo:
        name = todo.pop()
        seen.add(name)
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in (m.split(".")[0] for m in modules):
                assert module != "tempflow_grpo", f"{name}.py imports the trainer"
                if (root / f"{module}.py").exists() and module not in seen:
                    todo.append(module)
    assert seen == {"plumbing", "reward"}


# ---------------------------------------------------------------- long runs

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """The random tiny pipeline saved as a model folder, so runs load it as they would SD3.5."""
    path = tmp_path_factory.mktemp("random_model")
    tiny_world.build_tiny_pipeline(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle on the left\n\ntwo blue squares\nthree green circles\n")
    return str(path)


def quick_args(model, prompts, out, *extra):
    """A run of a few seconds an epoch on the random tiny pipeline."""
    return tg.parse_args(["--tiny", "--model", model, "--prompt-file", prompts, "--out", str(out), "--reward", "color",
                          "--steps", "4", "--branches", "2", "--seeds-per-prompt", "1", "--prompts-per-epoch", "2",
                          "--lr", "3e-2", "--clip-range", "0.2", "--save-every", "1", "--eval-prompt-file", "",
                          *extra])


def lora_of(out):
    from safetensors.torch import load_file

    return load_file(next((out / "checkpoints").glob("epoch_*")) / plumbing.LORA_FILE)


def exported_lora(out):
    from safetensors.torch import load_file

    return load_file(out / "lora" / "pytorch_lora_weights.safetensors")


def test_diffusionnft_trains_the_tiny_pipeline_and_counts_its_evaluations(random_model, prompt_file, tmp_path):
    """bench/nft.py's loop: two epochs on the random tiny pipeline move the exported LoRA off its start (B = 0), and
    each epoch spends T evaluations per sample (the ODE rollout, no CFG) and 3 per trained (sample, noise level)."""
    rows = nft.train(["--tiny", "--model", random_model, "--prompt-file", prompt_file, "--out", str(tmp_path / "nft"),
                      "--reward", "color", "--steps", "4", "--branches", "2", "--seeds-per-prompt", "2",
                      "--prompts-per-epoch", "2", "--lr", "3e-2", "--eval-prompt-file", "", "--epochs", "2"])
    samples, levels = 2 * 4, int(4 * 0.99)  # 2 prompts x 4 samples; 3 of the 4 noise levels each
    assert [row["nfe"] for row in rows] == [epoch * (samples * 4 + samples * levels * 3) for epoch in (1, 2)]
    assert all(math.isfinite(row["loss"]) and row["transitions"] == samples * levels for row in rows)
    assert any(v.abs().max() > 0 for k, v in exported_lora(tmp_path / "nft").items() if "lora_B" in k)
    # bench/compare.py's time estimate reads the second epoch back as the rollout's forwards, the old policy's and
    # the KL reference's, and the trained latents
    config = json.loads((tmp_path / "nft" / "config.json").read_text())
    assert compare.forwards(rows[1], rows[0]["nfe"], config) == (samples * 4, 2 * samples * levels, samples * levels)


@pytest.mark.parametrize("flags", [[], ["--beta", "0"], ["--method", "flow_grpo"],
                                   ["--method", "branch_grpo", "--guidance", "1"]])
def test_the_time_estimate_splits_an_epochs_evaluations_as_the_trainer_counts_them(flags, prompt_file):
    """bench/compare.py's estimated GPU seconds start from an epoch row's evaluations split into the rollout's, the
    KL reference's and the trained latents: the rollout's are epoch_size's, with and without CFG and beta."""
    args = tg.parse_args(["--tiny", "--prompt-file", prompt_file, *flags])
    size = tg.epoch_size(args, plumbing.parse_steps(args.branch_steps, args.steps))
    row = dict(nfe=100 + size["rollout_nfe"] + size["train_nfe"], transitions=size["transitions"])
    trained = size["transitions"] * (2 if args.guidance > 1 else 1)
    assert compare.forwards(row, 100, vars(args)) == (size["rollout_nfe"], trained * (args.beta > 0), trained)


def test_the_time_estimates_unit_costs_give_back_the_epoch_they_were_measured_on():
    """Unit costs taken from the H200's measured epoch (reference settings: CFG, beta > 0) estimate that epoch at
    its measured seconds: sampling, decoding and scoring, and training, nothing counted twice or left out."""
    epoch, reference = compare.H200_EPOCH, dict(guidance=tg.Args.guidance, beta=tg.Args.beta)
    estimate = compare.gpu_seconds([epoch], reference, compare.unit_costs(epoch))
    assert estimate[-1] == pytest.approx(epoch["sample_s"] + epoch["score_s"] + epoch["train_s"])


def test_the_time_estimate_reads_bench_gpus_rows_by_step_and_names_a_missing_one(tmp_path):
    """--gpu-epoch FILE --gpu-step S takes the unit costs from bench/gpu.py's row of that step, skipping a step
    that failed; a file without one is a one-line error naming both flags."""
    rows = tmp_path / "gpu.jsonl"
    faster = {k: v / 2 if k.endswith("_s") else v for k, v in compare.H200_EPOCH.items()}
    rows.write_text("\n".join(json.dumps(row) for row in [dict(step="80 GB eager", **compare.H200_EPOCH),
                                                         dict(step="80 GB compiled", error="out of memory"),
                                                         dict(step="48 GB compiled", **faster)]) + "\n")
    assert compare.measured_costs(rows)[0] == compare.unit_costs(compare.H200_EPOCH)
    assert compare.measured_costs(rows, "48 GB compiled")[0] == compare.unit_costs(faster)
    with pytest.raises(ValueError, match="--gpu-epoch .*'80 GB compiled' .--gpu-step"):
        compare.measured_costs(rows, "80 GB compiled")


def test_an_epochs_sampling_does_not_grow_with_its_prompts(pipe, random_model, prompt_file, tmp_path, monkeypatch):
    """Sampling, decoding and scoring go one chunk of --rollout-prompts prompts at a time: the largest tensor they
    create is the same at 2 and at 8 prompts per epoch, and an epoch keeps at most 32 images (its grid's)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.nbytes = max([self.nbytes, *sizes])
            return out

    largest, sample_chunk = Largest(), tg.sample_chunk

    def measured(*args, **kwargs):
        with largest:
            return sample_chunk(*args, **kwargs)
    monkeypatch.setattr(tg, "sample_chunk", measured)
    seen = []
    for prompts in (2, 8):
        args = quick_args(random_model, prompt_file, tmp_path, "--prompts-per-epoch", str(prompts),
                          "--rollout-prompts", "2", "--image-every", "1")
        largest.nbytes, sigmas = 0, tg.sigma_grid(pipe.scheduler, args.steps)
        batch, _, metrics, (images, captions) = tg.collect(
            pipe, args, ["a red circle", "two blue squares"], reward.load_reward("color"), sigmas,
            plumbing.parse_steps("", args.steps), torch.Generator().manual_seed(0), tg.Timer(torch.device("cpu")))
        seen.append((largest.nbytes, metrics["images"]))
        assert len(images) == len(captions) == min(32, metrics["images"])
    assert seen[0][0] == seen[1][0] and seen[1][1] == 4 * seen[0][1]


def test_resume_continues_exactly(random_model, prompt_file, tmp_path):
    """4 epochs straight, and 2 epochs then --resume to 4, give the same LoRA, the same EMA and the same metrics
    rows."""
    straight = tg.train(quick_args(random_model, prompt_file, tmp_path / "a", "--epochs", "4"))
    tg.train(quick_args(random_model, prompt_file, tmp_path / "b", "--epochs", "2"))
    tg.train(quick_args(random_model, prompt_file, tmp_path / "b", "--epochs", "4", "--resume"))
    a, b = lora_of(tmp_path / "a"), lora_of(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "the LoRA never moved: the test would prove nothing"
    ema_a, ema_b = exported_lora(tmp_path / "a"), exported_lora(tmp_path / "b")  # the EMA, moved at step 7 of 8
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert ema_a.keys() == a.keys()  # both in diffusers' format
    assert not all(torch.equal(ema_a[k], a[k]) for k in a), "the EMA equals the live weights: the test is empty"
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_b) == 4
    for x, y in zip(straight, rows_b):  # every number but the seconds
        assert {k: v for k, v in x.items() if not k.endswith("_s")} == \
            {k: v for k, v in y.items() if not k.endswith("_s")}


def test_resume_of_a_run_that_spent_its_nfe_budget_trains_no_further(random_model, prompt_file, tmp_path):
    """--max-nfe ends a run after the epoch that reaches it; resuming that run adds no epoch."""
    tg.train(quick_args(random_model, prompt_file, tmp_path / "a", "--epochs", "5", "--max-nfe", "1"))
    assert tg.train(quick_args(random_model, prompt_file, tmp_path / "a", "--epochs", "5", "--max-nfe", "1",
                               "--resume")) == []
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 1


def test_out_folder_of_another_run_is_refused(random_model, prompt_file, tmp_path):
    """An --out holding a run of another configuration, or this run without --resume, is refused."""
    tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1"))
    with pytest.raises(SystemExit, match="--lr"):
        tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1", "--lr", "1e-3"))
    with pytest.raises(SystemExit, match="--resume"):
        tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1"))


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one(random_model, prompt_file, tmp_path, monkeypatch):
    """A crash while writing a checkpoint (here a failed write, then what a kill -9 mid-write leaves: a partial
    .tmp folder) leaves the previous complete checkpoint loadable by --resume."""
    tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1"))
    before = lora_of(tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(tg.torch, "save", crash)
    with pytest.raises(SystemExit, match="epoch_000001, is intact"):
        tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "2", "--resume"))
    monkeypatch.undo()
    (tmp_path / "checkpoints" / "epoch_000002.tmp").mkdir()  # a kill -9 mid-write
    (tmp_path / "checkpoints" / "epoch_000002.tmp" / plumbing.LORA_FILE).write_bytes(b"half")
    pipe = tiny_world.build_tiny_pipeline(0)
    tg.add_lora(pipe.transformer, json.loads((tmp_path / "config.json").read_text())["lora_rank"])
    optimizer = torch.optim.AdamW([p for p in pipe.transformer.parameters() if p.requires_grad])
    state = plumbing.load_checkpoint(tmp_path, pipe.transformer, optimizer, None, torch.Generator())
    assert state["epoch"] == 1 and lora_of(tmp_path).keys() == before.keys()


def test_sigint_saves_a_checkpoint_and_exits_non_zero(random_model, prompt_file, tmp_path):
    """SIGINT during a run: the epoch finishes, a checkpoint is written, the exit status is 128 + SIGINT."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "tempflow_grpo.py"] + [a for a in sys_argv_of(random_model, prompt_file, tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT, proc.stderr.read()
    state = json.loads(next((tmp_path / "checkpoints").glob("epoch_*")).joinpath("state.json").read_text())
    assert 1 <= state["epoch"] < 1000 and state["metrics_rows"] == len(metrics.read_text().splitlines())
    assert (tmp_path / "lora" / plumbing.LORA_FILE).exists()  # the adapter of a stopped run, as of its checkpoint


def test_a_full_disk_is_one_line_with_the_last_checkpoint_intact_and_the_command_that_resumes(
        random_model, prompt_file, tmp_path, monkeypatch):
    """A checkpoint whose write fails on a full disk (torch.save's 28-line RuntimeError) ends the run with one line
    that says so, names the intact last checkpoint and the resume command, and leaves no partial folder; with room
    again that command finishes the run. Too little room for a checkpoint is one line before the first epoch, and a
    config.json left empty by a full disk one line at the next start, fresh or resumed."""
    import shutil

    usage, save, full = shutil.disk_usage, torch.save, []

    def saving(obj, path, *args, **kwargs):
        if "epoch_000002" in str(path):
            full.append(True)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore lines")
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", saving)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=0) if full else usage(path))
    with pytest.raises(SystemExit) as err:
        tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "3"))
    message = str(err.value)
    assert "\n" not in message and "the disk is full" in message and "epoch_000001" in message and "intact" in message
    assert "--resume" in message and "--epochs 3" in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"]
    assert not (tmp_path / "lora.tmp").exists() and (tmp_path / "lora" / plumbing.LORA_FILE).exists()
    monkeypatch.undo()
    rows = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "3", "--resume"))
    assert [row["epoch"] for row in rows] == [1, 2]

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=2**20))
    with pytest.raises(SystemExit, match="1 MiB free, and a checkpoint needs"):
        tg.train(quick_args(random_model, prompt_file, tmp_path / "small", "--epochs", "1"))
    assert not (tmp_path / "small" / "metrics.jsonl").exists()
    monkeypatch.undo()
    (tmp_path / "config.json").write_text("")
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit, match="config.json cannot be read") as err:
            tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "4", *resume))
        assert "\n" not in str(err.value)


def test_kill_9_loses_at_most_one_epoch(random_model, prompt_file, tmp_path):
    """SIGKILL in the middle of a run with the default --save-every: the last complete checkpoint is at most one
    epoch behind the last logged epoch, and --resume continues from it."""
    import signal
    import subprocess
    import sys
    import time

    argv = sys_argv_of(random_model, prompt_file, tmp_path)
    del argv[argv.index("--save-every"):argv.index("--save-every") + 2]  # the default
    proc = subprocess.Popen([sys.executable, "tempflow_grpo.py", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=Path(tg.__file__).parent)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    logged = len(metrics.read_text().splitlines())
    done = max(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("epoch_*") if p.suffix != ".tmp")
    assert logged - 1 <= done <= logged
    argv[argv.index("--epochs") + 1] = str(done + 1)
    subprocess.run([sys.executable, "tempflow_grpo.py", *argv, "--resume"], check=True, capture_output=True,
                   cwd=Path(tg.__file__).parent)
    assert len(metrics.read_text().splitlines()) == done + 1


def sys_argv_of(model, prompts, out):
    return ["--tiny", "--model", model, "--prompt-file", prompts, "--out", str(out), "--reward", "color",
            "--steps", "4", "--branches", "2", "--seeds-per-prompt", "1", "--prompts-per-epoch", "1",
            "--epochs", "1000", "--save-every", "1000", "--eval-prompt-file", ""]


def test_run_writes_config_metrics_evaluations_images_and_lora(random_model, prompt_file, tmp_path):
    """A run leaves config.json, one metrics row per epoch with the logged fields and eval rewards, image grids
    and the final LoRA."""
    rows = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "2", "--eval-prompt-file",
                               prompt_file, "--eval-every", "1", "--eval-steps", "3", "--image-every", "1"))
    fields = {"epoch", "reward_mean", "reward_std", "nfe", "wall_s", "loss", "policy_loss", "kl", "clipfrac",
              "ratio_mean", "zero_std_frac", "eval_reward"}
    assert all(fields <= row.keys() for row in rows) and rows[1]["nfe"] > rows[0]["nfe"] > 0
    assert "base_eval_reward" in rows[0] and "base_eval_reward" not in rows[1]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rollout"] == "branch" and config["ran_with"]["torch"] == torch.__version__  # and what ran it
    assert len(list((tmp_path / "images").glob("*.png"))) == 5  # base, 2 evaluations, 2 sample grids
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    from PIL import Image
    assert Image.open(tmp_path / "curves.png").size == (1200, 600)


def test_evaluation_can_score_with_another_reward_than_training(random_model, prompt_file, tmp_path):
    """--eval-reward: training rewards with --reward, evaluation with the other spec (so that reward hacking shows as
    a gap between the two)."""
    rows = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1", "--eval-prompt-file",
                               prompt_file, "--eval-steps", "3", "--eval-reward", "geneval_toy"))
    assert "reward_color" in rows[0] and "reward_geneval_toy" not in rows[0]
    assert "eval_geneval_toy" in rows[0] and "eval_color" not in rows[0] and "base_eval_geneval_toy" in rows[0]


def test_a_log_written_to_a_file_is_one_line_per_epoch(random_model, tmp_path):
    """`python tempflow_grpo.py ... > train.log 2>&1` with a 600-word prompt: one note naming the prompts the text
    encoders cut, the epoch's size, one fixed-format line per epoch and the run's summary; no progress-bar redraw
    and no cut text."""
    import subprocess
    import sys

    log, prompts = tmp_path / "train.log", tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n" + " ".join(["two blue squares"] * 200) + "\n")
    argv = sys_argv_of(random_model, str(prompts), tmp_path / "run")
    argv[argv.index("--epochs") + 1] = "3"
    with log.open("w") as file:
        subprocess.run([sys.executable, "tempflow_grpo.py", *argv], stdout=file, stderr=subprocess.STDOUT, check=True,
                       cwd=Path(tg.__file__).parent)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("note: --prompt-file: 1 longer than CLIP's") and "(line 2)" in lines[0], lines
    assert lines[1].startswith("epoch: ") and [line.split(" | ")[0] for line in lines[2:-1]] == [
        "epoch 0", "epoch 1", "epoch 2"], lines
    assert lines[-1].startswith("done: 3 epochs") and str(tmp_path / "run" / "lora") in lines[-1]
    assert "\r" not in log.read_text() and len(log.read_text()) < 2000


def test_progress_in_a_log_file_is_a_plain_line_now_and_then(monkeypatch):
    """Off a terminal, a long loop's bar becomes a whole line every every_s seconds (none before), with no carriage
    return or escape code."""
    import io
    import sys
    import time

    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    monkeypatch.setattr(sys, "stderr", log)
    for _ in tg.progress(range(2), every_s=0.05, desc="epochs"):
        for _ in tg.progress(range(4), every_s=0.05, desc="sample", leave=False):
            time.sleep(0.03)
    lines = log.getvalue().splitlines()
    assert any(line.startswith("sample: ") for line in lines)
    assert all(line.startswith(("epochs: ", "sample: ")) for line in lines)
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    log.truncate(0)
    for _ in tg.progress(range(5), every_s=60, desc="train"):
        pass
    assert log.getvalue() == ""


def test_wandb_missing_is_one_line_naming_the_flag_and_the_install(tmp_path, monkeypatch):
    """Without the wandb package, --wandb stops with one line that names the flag and the pip command."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, installed or not
    with pytest.raises(SystemExit) as stop:
        plumbing.open_tracker("p", {}, tmp_path, resume=False)
    message = str(stop.value.code)
    assert "\n" not in message and "--wandb" in message and "pip install wandb" in message


def test_wandb_offline_run_logs_every_epoch_and_resume_continues_it(random_model, prompt_file, tmp_path,
                                                                    monkeypatch):
    """--wandb in wandb's offline mode: a run logs to out/wandb, and --resume continues the same wandb run."""
    pytest.importorskip("wandb")
    for key, value in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CACHE_DIR=tmp_path / "cache",
                           WANDB_CONFIG_DIR=tmp_path / "config", WANDB_DATA_DIR=tmp_path / "data").items():
        monkeypatch.setenv(key, str(value))
    tg.train(quick_args(random_model, prompt_file, tmp_path / "run", "--epochs", "1", "--wandb", "tempflow-test"))
    run_id = (tmp_path / "run" / "wandb_id").read_text()
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    tg.train(quick_args(random_model, prompt_file, tmp_path / "run", "--epochs", "2", "--wandb", "tempflow-test",
                        "--resume"))
    assert (tmp_path / "run" / "wandb_id").read_text() == run_id


def test_exported_lora_reproduces_the_trained_model():
    """save_lora writes diffusers' format: load_lora_weights on a fresh pipeline gives the trained ODE samples."""
    trained = tiny_world.build_tiny_pipeline(0)
    tg.add_lora(trained.transformer, 4)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    fresh = tiny_world.build_tiny_pipeline(0)

    def sample(pipe):
        noise = tg.initial_noise(pipe, 2, 64, torch.Generator().manual_seed(0))
        embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
        with torch.no_grad():
            return tg.ode_rollout(tg.sd3_velocity(pipe.transformer, embeds, 4.5), noise,
                                  tg.sigma_grid(pipe.scheduler, 4))
    base = sample(fresh)
    with tempfile.TemporaryDirectory() as folder:
        plumbing.save_lora(trained.transformer, Path(folder))
        fresh.load_lora_weights(folder)
    assert not torch.allclose(sample(trained), base, atol=1e-3), "the LoRA changes nothing: the test is empty"
    assert torch.allclose(sample(fresh), sample(trained), atol=1e-5)


@pytest.mark.parametrize("method", ["tempflow", "flow_grpo", "branch_grpo"])
def test_a_trunk_that_overflows_is_invalid_and_the_epoch_trains_on_the_rest(random_model, prompt_file, tmp_path,
                                                                         monkeypatch, method):
    """A rollout whose one trunk overflowed (NaN states, samples and log-probs from its first branch step on, as a
    bf16 velocity can): its images are scored NaN by every reward, counted invalid, and their transitions dropped,
    so that every optimizer step of the epoch trains on the rest (they were all skipped, and the NaN images scored
    as valid: jpeg_compressibility ranked them best)."""
    rollout, seen = tg.rollout, {}

    def overflowing(*args, **kwargs):
        out = rollout(*args, **kwargs)
        hit = out.image_noise == 0  # every image of trunk 0...
        rows = hit[out.image]       # ...and every transition that one of them scores
        seen.update(images=int(hit.sum()), transitions=int(rows.sum()), total=len(out.y))
        nan = lambda t, mask: torch.where(mask.view(-1, *[1] * (t.dim() - 1)), math.nan, t)  # noqa: E731
        return out._replace(latents=nan(out.latents, hit), y=nan(out.y, rows), log_prob=nan(out.log_prob, rows))
    monkeypatch.setattr(tg, "rollout", overflowing)
    extra = ["--method", method, *{"flow_grpo": ["--seeds-per-prompt", "2"], "branch_grpo": ["--split-steps", "0,1"]}
             .get(method, [])]
    row = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1", "--optimizer-steps", "2",
                              "--drop-zero-std", "--reward", "jpeg_compressibility", *extra))[0]
    assert row["invalid"] == seen["images"] > 0 and row["skipped_updates"] == 0
    assert 0 < row["transitions"] <= seen["total"] - seen["transitions"]
    assert math.isfinite(row["loss"]) and all(torch.isfinite(t).all() for t in lora_of(tmp_path).values())


def test_a_checkpoints_lora_loads_in_diffusers_as_trained(random_model, prompt_file, tmp_path, monkeypatch):
    """Every checkpoint holds its adapter in diffusers' format, alpha included: load_lora_weights(checkpoint) on a
    fresh pipeline gives the trainer's velocity (a checkpoint's peft file loaded as nothing, and by hand with alpha
    32 for 64), and a run stopped anywhere has lora/ too."""
    pipes, load = [], plumbing.load_pipeline
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *args: pipes.append(load(*args)) or pipes[-1])
    tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1", "--lora-rank", "4"))
    fresh = load(random_model)
    fresh.load_lora_weights(str(next((tmp_path / "checkpoints").glob("epoch_*"))))
    x = tg.initial_noise(fresh, 2, 64, torch.Generator().manual_seed(0))
    def velocity(pipe):
        embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
        with torch.no_grad():
            return tg.sd3_velocity(pipe.transformer, embeds, 4.5)(x, torch.tensor([0.8, 0.3]), torch.arange(2))
    base = velocity(load(random_model))
    assert not torch.allclose(velocity(pipes[0]), base, atol=1e-4), "the LoRA changes nothing: the test is empty"
    torch.testing.assert_close(velocity(fresh), velocity(pipes[0]), rtol=1e-5, atol=1e-6)
    t5 = f"max_sequence_length={tg.t5_length(pipes[0])}"  # the T5 length trained with, not the pipeline's default
    assert t5 in (tmp_path / "lora" / "README.md").read_text()
    lora, config = (tmp_path / "lora" / plumbing.LORA_FILE).stat(), (tmp_path / "config.json").stat()
    assert lora.st_mode == config.st_mode  # readable as every other output (safetensors writes 0600)


def test_a_bf16_pipeline_runs_cudas_dtype_path_on_the_cpu(random_model, prompt_file, tmp_path, monkeypatch):
    """A pipeline loaded in bf16 trains as on CUDA: under autocast, which follows the pipeline's dtype, every
    linear layer of the transformer, the float32 LoRA's included, computes in bf16 (CPU autocast leaves layer norms
    and softmax in bf16 where CUDA's computes them in float32); the LoRA and its gradients are float32 and finite,
    the first pass has ratio 1 and KL 0 (one optimizer step: every transition is scored by the sampling policy,
    B = 0), and the exported LoRA loads."""
    load, setup, seen = plumbing.load_pipeline, tg.setup, dict(outputs=set(), params=set(), grads=[])
    monkeypatch.setattr(plumbing, "load_pipeline", lambda model, dtype=None: load(model, torch.bfloat16))

    def watched_setup(args, device):
        pipe, params, *rest = setup(args, device)
        for module in pipe.transformer.modules():
            if type(module) is torch.nn.Linear:
                module.register_forward_hook(lambda m, i, out: seen["outputs"].add(out.dtype))
        for p in params:
            seen["params"].add(p.dtype)
            p.register_post_accumulate_grad_hook(lambda p: seen["grads"].append((p.grad.dtype, p.grad.isfinite())))
        return pipe, params, *rest
    monkeypatch.setattr(tg, "setup", watched_setup)
    row = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1", "--optimizer-steps", "1",
                              "--beta", "0.004"))[0]
    assert seen["outputs"] == {torch.bfloat16} and seen["params"] == {torch.float32}
    assert seen["grads"] and all(dtype == torch.float32 and finite.all() for dtype, finite in seen["grads"])
    assert abs(row["ratio_mean"] - 1) < 1e-6 and row["kl"] == 0 and math.isfinite(row["loss"])
    fresh = load(random_model, torch.bfloat16)
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = {name: p for name, p in fresh.transformer.named_parameters() if "lora_" in name}
    assert len(loaded) == len(exported_lora(tmp_path)) > 0


def test_non_finite_loss_skips_the_update(lora_pipe):
    """A NaN in the loss skips that optimizer step: the weights stay as they were and the skip is counted."""
    pipe, params = lora_pipe
    batch, sigmas = tiny_batch(pipe, 1.0)
    batch = batch._replace(advantage=torch.where(torch.arange(len(batch.x)) == 0, float("nan"), 1.0))
    before = [p.detach().clone() for p in params]
    args = tg.Args(guidance=4.5, beta=0.0, optimizer_steps=1, max_batch=1024)
    embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
    stats = tg.update(pipe.transformer, params, torch.optim.AdamW(params, lr=1e-2), batch, embeds, sigmas,
                      torch.ones(6), args, torch.Generator())
    assert stats["skipped_updates"] == 1 and all(torch.equal(a, b) for a, b in zip(before, params))


def test_cuda_out_of_memory_names_the_flags_that_fix_it(random_model, prompt_file, tmp_path, monkeypatch):
    """Out of GPU memory in an epoch ends the run with one line that names --max-batch and --gradient-checkpointing."""
    def collect(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tg, "collect", collect)
    with pytest.raises(SystemExit) as exit_info:
        tg.train(quick_args(random_model, prompt_file, tmp_path / "oom", "--epochs", "1"))
    message = str(exit_info.value.code)
    assert "\n" not in message and "--max-batch" in message and "--gradient-checkpointing" in message


@pytest.mark.parametrize("flags, content, flag", [
    ([], None, "--prompt-file"),                      # missing
    ([], b"", "--prompt-file"),                       # empty
    ([], b"\n  \n\n", "--prompt-file"),               # only blank lines
    ([], b"\xff\xfe a red ball\n", "--prompt-file"),  # not UTF-8
    (["--eval-prompt-file", "/no/such/file"], b"a", "--eval-prompt-file"),
    (["--branches", "1"], b"a", "--branches"),
    (["--branch-steps", "0-9"], b"a", "--branch-steps"),
    (["--branch-steps", "x"], b"a", "--branch-steps"),
    (["--steps", "1"], b"a", "--steps"),
    (["--noise-level", "0"], b"a", "--noise-level"),
    (["--sampler", "ddim"], b"a", "--sampler"),
    (["--sampler", "cps", "--noise-level", "1.5"], b"a", "--noise-level"),
    (["--finish-steps", "-1"], b"a", "--finish-steps"),
    (["--method", "flow_grpo", "--finish-steps", "2"], b"a", "--finish-steps"),
    (["--split-steps", "0,2"], b"a", "--split-steps"),                                  # TempFlow has no tree
    (["--method", "branch_grpo", "--split-steps", "9"], b"a", "--split-steps"),         # the last step is ODE
    (["--method", "branch_grpo", "--branch-steps", "0-3", "--split-steps", "0,6"], b"a", "--split-steps"),
    (["--method", "branch_grpo", "--split-factor", "1"], b"a", "--split-factor"),
    (["--method", "branch_grpo", "--prune-depth", "0-8"], b"a", "--prune-depth"),
    (["--method", "branch_grpo", "--prune-width", "-1"], b"a", "--prune-width"),
    (["--resolution", "500"], b"a", "--resolution"),
    (["--method", "ppo"], b"a", "--method"),
    (["--rollout", "sde", "--group", "seed"], b"a", "--group"),
    (["--reward", "aesthetic"], b"a", "--reward"),
    (["--eval-reward", "aesthetic"], b"a", "--eval-reward"),
    (["--out", "{tmp}/prompts.txt"], b"a", "--out"),      # an existing file
    (["--out", "{tmp}/prompts.txt/run"], b"a", "--out"),  # a folder below a file
    (["--out", "/sys/tempflow-run"], b"a", "--out"),      # a folder nobody may write in, root included
    (["--max-grad-norm", "-1"], b"a", "--max-grad-norm"),  # mirrors every update
    (["--max-grad-norm", "0"], b"a", "--max-grad-norm"),   # learns nothing
    (["--adv-clip", "-1"], b"a", "--adv-clip"),            # every advantage -1
    (["--adv-clip", "0"], b"a", "--adv-clip"),             # every advantage 0
    (["--weight-decay", "-1e-4"], b"a", "--weight-decay"),
    (["--weight-decay", "1e4"], b"a", "--weight-decay"),   # lr x decay >= 1: the LoRA shrinks past zero
    (["--lr", "nan"], b"a", "--lr"),
    (["--lr", "inf"], b"a", "--lr"),
    (["--clip-range", "0"], b"a", "--clip-range"),
    (["--beta", "nan"], b"a", "--beta"),
    (["--guidance", "0.5"], b"a", "--guidance"),           # below 1 the pipeline drops CFG: g = 1
    (["--noise-level", "inf"], b"a", "--noise-level"),
    (["--shift", "-3"], b"a", "--shift"),
    (["--reward-wait", "inf"], b"a", "--reward-wait"),
    (["--max-nfe", "-5"], b"a", "--max-nfe"),
])
def test_bad_input_fails_with_one_line_naming_the_flag(tmp_path, monkeypatch, flags, content, flag):
    """Each bad input exits with one line that names its flag, before any model is loaded."""
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as err:
        tg.main(["--prompt-file", str(path), "--out", str(tmp_path / "run"), *(f.format(tmp=tmp_path) for f in flags)])
    assert str(err.value).startswith("error:") and "\n" not in str(err.value) and flag in str(err.value)


@pytest.mark.parametrize("body, words", [
    ("def fn(images, prompts):\n    return torch.zeros(1)\n", "returned a Tensor of shape (1,) for 2 images"),
    ("def fn(images, prompts):\n    return 0.5\n", "returned a float for 2 images"),
    ("def fn(images, prompts):\n    return [0.1, 0.2, 0.3]\n", "returned a list of 3 for 2 images"),
    ("def fn(images, prompts):\n    return {'score': 1}\n", "fails on two grey 64 px images"),
    ("def fn(images, prompts):\n    raise KeyError('no model')\n", "KeyError: 'no model'"),
    ("def fn(images prompts):\n    pass\n", "does not load: SyntaxError at line 2"),
    ("import no_such_module\n", "does not load: ModuleNotFoundError"),
])
def test_a_reward_plugin_is_tried_before_anything_loads(tmp_path, monkeypatch, body, words):
    """A file.py:fn reward scores two small images before any model loads, as a server does: a wrong number of
    values, a wrong type, an exception or a file that does not import is one line naming the spec (it was an
    assert after the first rollout, gone under python -O)."""
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    plugin, prompts = tmp_path / "plugin.py", tmp_path / "p.txt"
    plugin.write_text("import torch\n" + body)
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit) as err:
        tg.main(["--tiny", "--prompt-file", str(prompts), "--out", str(tmp_path / "run"), "--reward", f"{plugin}:fn"])
    message = str(err.value)
    assert message.startswith("error: --reward") and f"{plugin}:fn" in message and "\n" not in message
    assert words in message, message


# ---------------------------------------------------------------- --compile: one compiled transformer for every call

def test_padded_calls_give_the_unpadded_velocities(pipe):
    """cfg_velocity with pad_to (a compiled transformer's one shape) returns the velocities of the real rows only,
    those of the unpadded call to float32 round-off, with and without CFG."""
    x, _ = random_latents(3, seed=4)
    embeds = tg.encode_prompts(pipe, ["a red circle", "two blue squares", "a green square"])
    sigma = torch.tensor([0.9, 0.5, 0.1])
    for guidance in (4.5, 1.0):
        plain = tg.cfg_velocity(pipe.transformer, x, sigma, embeds, guidance)
        padded = tg.cfg_velocity(pipe.transformer, x, sigma, embeds, guidance, pad_to=8)
        assert padded.shape == plain.shape == x.shape
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)


def test_a_compiled_run_trains_as_the_eager_one_and_compiles_only_before_its_first_epoch(
        random_model, prompt_file, tmp_path, monkeypatch):
    """--compile on (the CPU's inductor): every graph is compiled in the warm-up before the first epoch, none in the
    two epochs after it; the rollout's log-probs and rewards, the loss and its KL (the reference forward, adapter
    off) and the LoRA's update equal the eager run's to float32 round-off; after training, the compiled blocks'
    velocity equals the eager one's with the adapter on and off."""
    from torch._dynamo.utils import counters

    runs, graphs, pipes = {}, [], []
    rollout, trained_batch, add_lora, load = tg.rollout, tg.trained_batch, tg.add_lora, plumbing.load_pipeline
    compile_transformer = tg.compile_transformer
    def spy_rollout(*args, **kwargs):
        out = rollout(*args, **kwargs)
        runs[name]["log_prob"].append(out.log_prob.cpu())
        return out
    def spy_trained_batch(out, scores, *args):
        runs[name]["reward"].append(scores["reward"])
        return trained_batch(out, scores, *args)
    def spy_add_lora(*args):
        params = add_lora(*args)
        runs[name]["initial"] = [p.detach().clone() for p in params]
        runs[name]["params"] = params
        return params
    def counted(*args, **kwargs):
        seconds = compile_transformer(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return seconds
    monkeypatch.setattr(tg, "rollout", spy_rollout)
    monkeypatch.setattr(tg, "trained_batch", spy_trained_batch)
    monkeypatch.setattr(tg, "add_lora", spy_add_lora)
    monkeypatch.setattr(tg, "compile_transformer", counted)
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *args: pipes.append(load(*args)) or pipes[-1])
    for name, compile in (("eager", "off"), ("compiled", "on")):
        runs[name] = dict(log_prob=[], reward=[])
        runs[name]["rows"] = tg.train(quick_args(random_model, prompt_file, tmp_path / name, "--epochs", "2",
                                                 "--max-batch", "8", "--train-batch", "4", "--compile", compile))
    eager, compiled = runs["eager"], runs["compiled"]
    assert len(graphs) == 1 and counters["stats"]["unique_graphs"] == graphs[0] > 0  # nothing after the warm-up
    assert "compile_s" in compiled["rows"][0]
    assert "compile_s" not in compiled["rows"][1] and "compile_s" not in eager["rows"][0]
    for key in ("log_prob", "reward"):
        torch.testing.assert_close(torch.cat(compiled[key]), torch.cat(eager[key]), rtol=1e-5, atol=1e-6)
    for row_c, row_e in zip(compiled["rows"], eager["rows"]):
        for key in ("loss", "kl", "ratio_mean", "clipfrac", "grad_norm"):
            assert row_c[key] == pytest.approx(row_e[key], rel=1e-3, abs=1e-7), key
    # Adam divides by each gradient's size, so an update is round-off's only where a gradient is near 0: compare
    # the whole update's size
    update = {name: torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(run["params"], run["initial"])])
              for name, run in runs.items()}
    assert (update["compiled"] - update["eager"]).norm() < 1e-2 * update["eager"].norm()
    transformer = pipes[1].transformer
    x = tg.initial_noise(pipes[1], 4, 64, torch.Generator().manual_seed(5))  # the run's 64 px
    embeds = tg.encode_prompts(pipes[1], ["a red circle"]).take(torch.zeros(4, dtype=torch.long))
    sigma = torch.tensor([0.9, 0.6, 0.3, 0.1])
    def velocities():  # the adapter on at evaluation's shape, off at the reference's: both compiled in the warm-up
        with torch.no_grad():
            on = tg.sd3_velocity(transformer, embeds, 4.5, 8, pad=True)(x, sigma, torch.arange(4))
            with tg.lora_disabled(transformer):
                off = tg.sd3_velocity(transformer, embeds, 4.5, 4, pad=True)(x, sigma, torch.arange(4))
        return on, off
    on, off = velocities()
    assert counters["stats"]["unique_graphs"] == graphs[0]
    plumbing.eager(transformer)
    for v_compiled, v_eager in zip((on, off), velocities()):
        torch.testing.assert_close(v_compiled, v_eager, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(on, off, atol=1e-4)  # the trained adapter moves the velocity


def test_a_failed_compile_says_so_in_one_line_and_the_run_goes_on_eager(random_model, prompt_file, tmp_path,
                                                                      monkeypatch, capsys):
    """A torch that cannot compile (a backend that raises) costs one warning naming the error: the run trains on,
    eager and unpadded, exactly as with --compile off."""
    import functools

    def broken(graph, inputs):
        raise RuntimeError("this backend cannot compile")
    eager = tg.train(quick_args(random_model, prompt_file, tmp_path / "eager", "--epochs", "1", "--compile", "off"))
    monkeypatch.setattr(tg, "compile_transformer", functools.partial(tg.compile_transformer, backend=broken))
    rows = tg.train(quick_args(random_model, prompt_file, tmp_path / "broken", "--epochs", "1", "--compile", "on"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: --compile")]
    assert len(warnings) == 1 and "this backend cannot compile" in warnings[0] and "eager" in warnings[0]
    assert "compile_s" not in rows[0]
    assert {k: v for k, v in rows[0].items() if not k.endswith("_s")} == \
        {k: v for k, v in eager[0].items() if not k.endswith("_s")}
    assert all(torch.equal(a, b) for a, b in zip(lora_of(tmp_path / "broken").values(),
                                                 lora_of(tmp_path / "eager").values()))


def test_compile_is_a_lever_a_resume_may_switch_with_the_note(prompt_file, tmp_path):
    """--compile rounds differently, as the memory levers do: a resume may switch it, with the note line; auto is
    off on the CPU (the CUDA default is on)."""
    args = tg.finalize(tg.Args(prompt_file=prompt_file, out=str(tmp_path), compile="auto"))
    assert args.compile == ("on" if torch.cuda.is_available() else "off")
    prompts = plumbing.read_prompts(prompt_file)
    plumbing.write_config(tmp_path, plumbing.run_config(replace(args, compile="on"), prompts))
    resumed = replace(args, compile="off", resume=True)
    note = plumbing.check_out(resumed, plumbing.run_config(resumed, plumbing.read_prompts(prompt_file)))
    assert note and "--compile 'on' -> 'off'" in note
    with pytest.raises(SystemExit, match="--compile 'fast' is unknown"):
        tg.finalize(tg.Args(prompt_file=prompt_file, compile="fast"))


# ---------------------------------------------------------------- first contact: resume rules, inputs, what a run says

def same_lora(a, b):
    a, b = lora_of(a), lora_of(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_forgives_how_out_is_spelled_and_where_the_run_folder_is(random_model, prompt_file, tmp_path,
                                                                       monkeypatch):
    """--out is where a run is, not what it is: a run begun as `a`, resumed as `a/`, then copied and resumed by its
    absolute path, ends with the LoRA of the same run made in one go."""
    import shutil

    monkeypatch.chdir(tmp_path)
    tg.train(quick_args(random_model, prompt_file, "straight", "--epochs", "3"))
    tg.train(quick_args(random_model, prompt_file, "a", "--epochs", "1"))
    tg.train(quick_args(random_model, prompt_file, "a/", "--epochs", "2", "--resume"))
    shutil.copytree(tmp_path / "a", tmp_path / "moved")
    tg.train(quick_args(random_model, prompt_file, tmp_path / "moved", "--epochs", "3", "--resume"))
    assert same_lora(tmp_path / "straight", tmp_path / "moved")


def test_a_setting_missing_from_an_older_config_compares_as_its_default(random_model, prompt_file, tmp_path):
    """A config.json written before a setting existed resumes when the setting is at its default, and is refused,
    naming the setting, when it is not."""
    tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1"))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["shift"], config["prompts_sha256"]  # as a run of before --shift and the prompts' digest
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="--shift 0.0 -> 3.0"):
        tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "2", "--resume", "--shift", "3"))
    assert len(tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "2", "--resume"))) == 1


def test_an_epochs_prompts_are_one_shared_permutation_split_over_the_processes(random_model, prompt_file, tmp_path,
                                                                             monkeypatch):
    """The official prompt draw (--prompt-draw shared, the default): an epoch's prompts are distinct, the same
    permutation in every process whatever its own generator, split in rank order so that no two processes share one
    and together they are the one-process draw; another epoch or --seed, another permutation; a file shorter than
    the epoch gives every prompt before any twice. A run begun before the setting resumes with its independent draw."""
    args = tg.finalize(tg.Args(prompt_file=prompt_file, prompts_per_epoch=4))
    whole = tg.drawn_prompts(10, args, 3, torch.Generator().manual_seed(5))
    assert len(set(whole)) == 4 and all(0 <= j < 10 for j in whole)
    assert tg.drawn_prompts(10, args, 4, torch.Generator().manual_seed(5)) != whole
    assert tg.drawn_prompts(10, replace(args, seed=1), 3, torch.Generator().manual_seed(5)) != whole  # another seed
    shares = []
    for rank in range(2):
        monkeypatch.setattr(tg, "rank_and_world", lambda rank=rank: (rank, 2))
        shares.append(tg.drawn_prompts(10, args, 3, torch.Generator().manual_seed(rank)))
    assert shares[0] + shares[1] == whole
    monkeypatch.undo()
    short = tg.drawn_prompts(3, replace(args, prompts_per_epoch=6), 0, torch.Generator())
    assert sorted(short[:3]) == sorted(short[3:]) == [0, 1, 2]
    old = tg.finalize(tg.Args(prompt_file=prompt_file, model=random_model, reward="color", out=str(tmp_path)))
    config = plumbing.run_config(old, plumbing.read_prompts(prompt_file))
    del config["prompt_draw"]  # a config.json written before the setting existed
    plumbing.write_config(tmp_path, config)
    assert plumbing.preflight(replace(old, resume=True))[0].prompt_draw == "independent"


def test_resume_may_change_the_memory_levers_and_says_so(random_model, prompt_file, tmp_path, capsys):
    """Every memory lever the out-of-memory message recommends may change on --resume; the run goes on with one line
    saying it is not bit-identical to an uninterrupted one."""
    tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "1"))
    levers = ["--max-batch", "4", "--train-batch", "2", "--rollout-prompts", "1", "--gradient-checkpointing",
              "--offload-text-encoders", "--offload-reward", "--reward-dtype", "bfloat16"]
    rows = tg.train(quick_args(random_model, prompt_file, tmp_path, "--epochs", "2", "--resume", *levers))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: --resume")]
    assert len(rows) == 1 and len(notes) == 1 and "not bit-identical" in notes[0]
    assert all(flag in notes[0] for flag in levers if flag.startswith("--"))


def test_resume_refuses_other_data_and_names_at_most_three_differences(random_model, prompt_file, tmp_path):
    """The same prompts saved elsewhere (with a byte-order mark) resume; edited prompts do not; four changed settings
    are named three at a time."""
    tg.train(quick_args(random_model, prompt_file, tmp_path / "run", "--epochs", "1"))
    copy, edited = tmp_path / "copy.txt", tmp_path / "edited.txt"
    copy.write_text("\ufeff" + Path(prompt_file).read_text().replace("\n", "\r\n"), encoding="utf-8")
    edited.write_text(Path(prompt_file).read_text() + "a yellow square\n")
    assert len(tg.train(quick_args(random_model, str(copy), tmp_path / "run", "--epochs", "2", "--resume"))) == 1
    with pytest.raises(SystemExit, match="the prompts"):
        tg.train(quick_args(random_model, str(edited), tmp_path / "run", "--epochs", "3", "--resume"))
    with pytest.raises(SystemExit) as err:
        tg.train(quick_args(random_model, prompt_file, tmp_path / "run", "--epochs", "3", "--resume", "--lr", "1",
                            "--beta", "1", "--seed", "1", "--steps", "5"))
    assert str(err.value).count(" -> ") == 3 and ", ...)" in str(err.value) and "\n" not in str(err.value)


def test_resume_with_nothing_to_resume_is_one_line(tmp_path, monkeypatch):
    """--resume on an --out that holds no run (a mistyped path) stops with one line; nothing is created."""
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit, match="--resume: --out .* holds no run"):
        tg.main(["--tiny", "--prompt-file", str(prompts), "--out", str(tmp_path / "typo"), "--resume"])
    assert not (tmp_path / "typo").exists()


def test_a_start_that_fails_before_training_leaves_out_as_it_was(prompt_file, tmp_path):
    """A model that cannot be loaded stops the run before --out is created, so the same command fails the same way
    twice (and not with "already holds this run")."""
    (tmp_path / "broken").mkdir()  # a folder, so it passes the search, but holds no pipeline
    argv = ["--tiny", "--prompt-file", prompt_file, "--out", str(tmp_path / "run"), "--model", str(tmp_path / "broken")]
    errors = []
    for _ in range(2):
        with pytest.raises(SystemExit) as err:
            tg.main(argv)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "--model" in errors[0] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text", ["\ufefftwo blue squares\na red circle\n",          # a byte-order mark
                                  "\ufefftwo blue squares\r\na red circle\r\n",      # and Windows line ends
                                  "two blue squares\u200b\n\u200ba red circle\n"])    # zero-width spaces
def test_a_prompt_file_reads_as_its_plain_utf8_twin(tmp_path, text):
    """Invisible marks that editors write reach neither the tokenizers nor the rewards: the file reads as the same
    text saved plainly, and the caption scores as it does there."""
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode("utf-8"))
    prompts = plumbing.read_prompts(str(path))
    assert prompts == ["two blue squares", "a red circle"]
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 10:20, 10:20], image[:, :, 40:50, 40:50] = torch.tensor(reward.COLORS["blue"])[:, None, None], \
        torch.tensor(reward.COLORS["blue"])[:, None, None]
    assert reward.geneval_toy(image, prompts[:1]).item() == reward.geneval_toy(image, ["two blue squares"]).item() > 0


def test_a_prompt_is_a_line_ended_by_a_newline_and_nothing_else(tmp_path):
    """Only "\n" ends a prompt (an "\r" before it dropped): the line separators that str.splitlines also breaks
    at (U+2028, U+0085, form feed, vertical tab, \x1c-\x1e) stay inside their line, so a 3-line file is 3 prompts
    and their line numbers are the editor's. A folder given as the file is named as a folder."""
    path = tmp_path / "p.txt"
    path.write_bytes("a red circle\u2028on the left\r\ntwo\x0cblue\x0bsquares\x1c\x1d\x1e\n\nthree\x85green "
                     "circles\n".encode("utf-8"))
    numbered = plumbing.numbered_prompts(str(path))
    assert [n for n, _ in numbered] == [1, 2, 4]
    assert numbered[0][1] == "a red circle\u2028on the left" and numbered[2][1] == "three\x85green circles"
    with pytest.raises(SystemExit, match="is a folder"):
        plumbing.numbered_prompts(str(tmp_path))


def test_prompts_longer_than_the_encoders_are_named_once(pipe, tmp_path):
    """A prompt longer than CLIP's or T5's tokens is named by its line in one note; encoding it says nothing more."""
    import logging

    path = tmp_path / "p.txt"
    path.write_text("a red circle\n\n" + " ".join(["two blue squares"] * 200) + "\n")
    note = plumbing.prompt_cuts(pipe, plumbing.numbered_prompts(str(path)), "--prompt-file", tg.t5_length(pipe))
    assert "\n" not in note and "CLIP" in note and "T5" in note and "(line 3)" in note
    assert plumbing.prompt_cuts(pipe, [(1, "a red circle")], "--prompt-file", tg.t5_length(pipe)) is None
    loggers = [logging.getLogger(type(pipe).encode_prompt.__module__),
               logging.getLogger("transformers.tokenization_utils_base")]
    records, handler, filters = [], logging.Handler(), [list(logger.filters) for logger in loggers]
    handler.emit = records.append
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe.encode_prompt(plumbing.read_prompts(str(path)), None, None, max_sequence_length=tg.t5_length(pipe))
        assert records, "the pipeline no longer warns: the test would prove nothing"
        records.clear()
        tg.encode_prompts(pipe, plumbing.read_prompts(str(path)))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not records, [r.getMessage()[:100] for r in records]
    assert [logger.filters for logger in loggers] == filters  # the caller's logging is as it was


def test_an_epoch_without_a_finite_reward_stops_after_saving_it(random_model, tmp_path):
    """--reward color on prompts that name no colour: the run stops after the first epoch with one line naming the
    reward, its checkpoint written, and metrics.jsonl strict JSON (null, not NaN)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle on the left\ntwo squares\n")
    with pytest.raises(SystemExit) as err:
        tg.train(quick_args(random_model, str(prompts), tmp_path / "run", "--epochs", "5"))
    message = str(err.value)
    assert "\n" not in message and "--reward 'color'" in message and "epoch 0" in message and "NaN" in message

    def strict(token):
        raise ValueError(f"{token} is not JSON")
    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 1 and rows[0]["reward_mean"] is None and rows[0]["invalid"] == rows[0]["images"]
    assert json.loads(next((tmp_path / "run" / "checkpoints").glob("epoch_*")).joinpath("state.json").read_text())[
        "epoch"] == 1


def test_python_and_the_command_line_resolve_and_fail_alike(prompt_file, tmp_path, capsys):
    """train(Args(**TINY, tiny=True, ...)) and the command line's --tiny write the same config.json (the method's
    presets filled in), and a bad setting fails with the same line in both."""
    small = dict(reward="color", steps=3, branches=2, seeds_per_prompt=1, prompts_per_epoch=1, epochs=1,
                 eval_prompt_file="")
    tg.train(tg.Args(**{**tg.TINY, **small}, tiny=True, prompt_file=prompt_file, out=str(tmp_path / "py")))
    flags = [word for key, value in small.items() for word in ("--" + key.replace("_", "-"), str(value))]
    tg.main(["--tiny", "--prompt-file", prompt_file, "--out", str(tmp_path / "cli"), *flags])
    configs = [json.loads((tmp_path / run / "config.json").read_text()) for run in ("py", "cli")]
    assert configs[0].pop("out") != configs[1].pop("out") and configs[0] == configs[1]
    assert configs[0]["rollout"] == "branch" and configs[0]["weighting"] == "noise"
    errors = []
    for run in (lambda: tg.train(tg.Args(**{**tg.TINY, "branches": 1}, tiny=True, prompt_file=prompt_file)),
                lambda: tg.main(["--tiny", "--prompt-file", prompt_file, "--branches", "1"])):
        with pytest.raises(SystemExit) as err:
            run()
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "--branches" in errors[0]


def test_evaluation_brings_the_offloaded_models_over_only_for_their_work(random_model, prompt_file, monkeypatch):
    """With --offload-text-encoders and --offload-reward, evaluation brings the text encoders once, for all its
    prompts, and the reward model only to score; neither is on the device during a transformer call. Training's
    chunks bring the reward model only to score too."""
    pipe = tiny_world.build_tiny_pipeline(seed=0)
    reward_model, events, held = torch.nn.Linear(1, 1), [], set()
    real_offload_models = tg.offload_models

    @contextmanager
    def offload_models(*modules, device, offload):
        name = "reward" if reward_model in modules else "text" if pipe.text_encoder in modules else "other"
        if offload:
            held.add(name)
        events.append(f"+{name}")
        with real_offload_models(*modules, device=device, offload=offload):
            yield
        held.discard(name)
    monkeypatch.setattr(tg, "offload_models", offload_models)
    monkeypatch.setattr(plumbing, "offload_models", offload_models)  # evaluation's scoring
    pipe.transformer.register_forward_hook(lambda *a: events.append("transformer " + ",".join(sorted(held))))
    reward_fn = reward.load_reward("color")
    scored = reward_fn

    def score(images, prompts):
        events.append("score " + ",".join(sorted(held)))
        return scored(images, prompts)
    score.models = [reward_model]
    args = tg.parse_args(["--tiny", "--model", random_model, "--prompt-file", prompt_file, "--offload-text-encoders",
                          "--offload-reward", "--max-batch", "4", "--eval-steps", "2", "--steps", "3", "--branches",
                          "2", "--seeds-per-prompt", "1", "--prompts-per-epoch", "2", "--rollout-prompts", "1"])
    prompts = ["a red circle", "two blue squares", "a green circle", "a yellow square"]
    tg.evaluate(pipe, prompts, score, args, Path(tempfile.mkdtemp()) / "grid.png")
    assert events.count("+text") == 1 and events.index("+text") == 0
    assert set(e for e in events if e.startswith("transformer")) == {"transformer "}
    assert events.count("score reward") == 2 == events.count("+reward")  # 4 prompts, 2 per transformer call
    events.clear()
    tg.collect(pipe, args, prompts, score, tg.sigma_grid(pipe.scheduler, 3), [0, 1], torch.Generator().manual_seed(0),
               tg.Timer(torch.device("cpu")))
    assert set(e for e in events if e.startswith("transformer")) == {"transformer "}
    assert events.count("score reward") == 2 == events.count("+reward")  # one chunk per prompt


def test_the_resume_command_resumes_the_same_configuration(prompt_file):
    """The command printed after a signal, parsed as the command line, gives this run's settings, with --resume."""
    import shlex

    argv = ["--tiny", "--prompt-file", prompt_file, "--out", "runs/my run", "--method", "flow_grpo", "--lr", "0.002",
            "--no-ema", "--eval-prompt-file", "", "--branch-steps", "0,2", "--gradient-checkpointing"]
    args = tg.parse_args(argv)
    for world, launcher in ((1, ["python"]), (2, ["torchrun", "--nproc_per_node", "2"])):
        default = tg.defaults(args.tiny) | tg.METHODS[args.method] | {"compile": tg.AUTO_COMPILE}
        words = shlex.split(plumbing.resume_command(args, world, default, tg.__file__))
        assert words[:len(launcher)] == launcher and Path(words[len(launcher)]).name == "tempflow_grpo.py"
        again = tg.parse_args(words[len(launcher) + 1:])
        assert again.resume and asdict(again) == {**asdict(args), "resume": True}


def test_every_missing_model_is_named_in_one_line_before_any_loads(prompt_file, tmp_path, monkeypatch):
    """The pipeline and every reward model that cannot be had are named together, each with its way out (the flag
    or the variable for a local copy; the license for a gated one), before anything loads or --out is made."""
    import httpx2
    import huggingface_hub
    import huggingface_hub.constants
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PICKSCORE_MODEL", str(tmp_path / "no-such-folder"))
    argv = ["--prompt-file", prompt_file, "--out", str(tmp_path / "run"), "--model", "no-such-org/no-such-sd3",
            "--reward", "pickscore", "--eval-reward", "clipscore"]
    with pytest.raises(SystemExit) as err:
        tg.main(argv)
    message = str(err.value)
    assert "\n" not in message and message.startswith("error: 4 model")
    for needed in ("--model", "no-such-org/no-such-sd3", "PICKSCORE_MODEL", "no-such-folder", "PICKSCORE_PROCESSOR",
                   "--eval-reward clipscore", "CLIPSCORE_MODEL"):
        assert needed in message
    assert not (tmp_path / "run").exists()

    def gated(repo_id, **kwargs):
        response = httpx2.Response(403, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise GatedRepoError("gated", response=response)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "auth_check", gated)
    assert "accept its license at https://huggingface.co/no-such-org/no-such-sd3" in plumbing.model_problem(
        "no-such-org/no-such-sd3", "model_index.json")


# ---------------------------------------------------------------- rewards from a server (reward.py serve)

# Plug-ins for the server tests. A server receives 8-bit PNGs, so the in-process twin of `serve color` rounds the
# images to 8 bits first; `dying` exits its server at the request numbered DIE_AT (the first check is request 1).
SERVED_PLUGINS = '''
import os

import reward

CALLS = [0]


def color_8bit(images, prompts):
    return reward.color(reward.from_png_base64(reward.png_base64(images)), prompts)


def dying(images, prompts):
    CALLS[0] += 1
    if CALLS[0] == int(os.environ.get("DIE_AT", 0)):
        os._exit(1)
    return reward.color(images, prompts)
'''


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def reward_server(spec: str, port: int, **env):
    """`python reward.py serve REWARD --port PORT` on 127.0.0.1, once it accepts connections; killed on leaving."""
    import os
    import socket
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "reward.py", "serve", spec, "--port", str(port), "--device", "cpu"],
                            cwd=Path(reward.__file__).parent, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]
    try:
        yield f"http://127.0.0.1:{port}/score"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugins") / "served.py"
    path.write_text(SERVED_PLUGINS)
    return str(path)


def test_a_server_scores_the_8_bit_images_as_the_reward_in_process(plugins):
    """`serve color,geneval_toy:0.5` answers the in-process rewards of the images rounded to 8 bits, bit for bit,
    with each component; its sum is weighted like any reward of a spec, and an unscorable image is NaN."""
    images, prompts = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["a red circle",
                                                                                            "two blue squares", "a dog"]
    local = reward.load_reward("color,geneval_toy:0.5")(reward.from_png_base64(reward.png_base64(images)), prompts)
    with reward_server("color,geneval_toy:0.5", free_port()) as url:
        served = reward.load_reward(f"{url}:2")(images, prompts)
    identical = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    identical(served[url], local["reward"])
    identical(served["color"], local["color"])
    identical(served["geneval_toy"], local["geneval_toy"])
    identical(served["reward"], 2 * served[url])
    assert torch.isnan(served[url][2]) and set(served) == {url, "color", "geneval_toy", "reward"}
    assert (served["color"] - reward.color(images, prompts))[:2].abs().max() <= 1 / 510  # 8 bits: half a level


def test_a_run_against_a_reward_server_is_the_run_with_its_reward_in_process(random_model, prompt_file, plugins,
                                                                            tmp_path):
    """--reward http://... of `serve color`, for training and evaluation, trains the LoRA that the in-process
    reward of the same 8-bit images trains, bit for bit, and its epoch-0 rewards are color's to 8 bits."""
    extra = ["--epochs", "2", "--eval-prompt-file", prompt_file, "--eval-every", "1", "--eval-steps", "2"]
    with reward_server("color", free_port()) as url:
        served = tg.train(quick_args(random_model, prompt_file, tmp_path / "served", "--reward", url, *extra))
    local = tg.train(quick_args(random_model, prompt_file, tmp_path / "local", "--reward", f"{plugins}:color_8bit",
                                *extra))
    plain = tg.train(quick_args(random_model, prompt_file, tmp_path / "plain", *extra))
    same = lambda row: {k: v for k, v in row.items() if not k.endswith("_s") and "color" not in k and "http" not in k}
    assert [same(row) for row in served] == [same(row) for row in local] and same_lora(tmp_path / "served",
                                                                                     tmp_path / "local")
    assert served[0][f"reward_{url}"] == served[0]["reward_mean"] and served[0]["eval_reward"] == local[0][
        "eval_reward"]
    assert abs(served[0]["reward_mean"] - plain[0]["reward_mean"]) <= 1 / 510


@pytest.mark.parametrize("die_at, where", [(5, "in epoch 1"), (6, "in epoch 1's evaluation")])
def test_a_reward_server_that_dies_mid_run_stops_it_saved_and_resume_finishes_it_exactly(
        random_model, prompt_file, plugins, tmp_path, die_at, where):
    """The server dies while it scores epoch 1's samples, or its evaluation: the run retries for --reward-wait,
    then stops with one line, saved (before the epoch, or after it with its row waiting for the evaluation); once
    the server is back, --resume ends with the LoRA, the EMA and the metrics rows of an uninterrupted run."""
    port, run = free_port(), tmp_path / "run"
    extra = ["--epochs", "3", "--eval-prompt-file", prompt_file, "--eval-every", "1", "--eval-steps", "2",
             "--reward-wait", "1", "--image-every", "1"]
    with reward_server(f"{plugins}:dying", port, DIE_AT=str(die_at)) as url:
        with pytest.raises(SystemExit) as err:
            tg.train(quick_args(random_model, prompt_file, run, "--reward", url, *extra))
    message = str(err.value)
    assert "\n" not in message and f"{where};" in message and "--resume" in message
    assert message.startswith(f"error: --reward {url}: no answer within 1 s (--reward-wait)")
    with reward_server(f"{plugins}:dying", port) as url:
        tg.train(quick_args(random_model, prompt_file, run, "--reward", url, *extra, "--resume"))
    straight = tg.train(quick_args(random_model, prompt_file, tmp_path / "straight", "--reward",
                                   f"{plugins}:color_8bit", *extra))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    same = lambda row: {k: v for k, v in row.items() if not k.endswith("_s") and "color" not in k and "http" not in k
                        and "dying" not in k}
    assert [same(row) for row in rows] == [same(row) for row in straight] and len(rows) == 3
    assert same_lora(run, tmp_path / "straight")
    ema_a, ema_b = exported_lora(run), exported_lora(tmp_path / "straight")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert sorted(p.name for p in (run / "images").glob("*.png")) == sorted(
        p.name for p in (tmp_path / "straight" / "images").glob("*.png"))


@contextmanager
def misbehaving_server():
    """An HTTP server in a thread that breaks the protocol one way per path."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
            status, body = 200, {
                "/short": lambda: json.dumps({"rewards": [0.5] * (n - 1)}),
                "/garbage": lambda: "<html>a proxy's error page</html>",
                "/words": lambda: json.dumps({"rewards": ["high"] * n}),
                "/huge": lambda: json.dumps({"rewards": [0.5] * n, "detail": "x" * (5 << 20)}),
                "/slow": lambda: time.sleep(3) or json.dumps({"rewards": [0.5] * n}),
                "/nulls": lambda: json.dumps({"rewards": [None] + [0.5] * (n - 1), "strict": [1] * n, "tag": "v1",
                                              "boxes": [[1, 2]] * n}),
            }.get(self.path, lambda: "")()
            status = {"/busy": 503, "/missing": 404}.get(self.path, status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body.encode())))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("path, says", [("/short", "2 rewards for 3 images"), ("/garbage", "not JSON"),
                                        ("/words", "not all numbers"), ("/huge", "over 4 MiB"),
                                        ("/slow", "ReadTimeout"),
                                        ("/busy", "within 1 s (--reward-wait), retries included (HTTP 503)"),
                                        ("/missing", "HTTP 404")])
def test_an_answer_that_breaks_the_protocol_is_one_line_naming_the_url(path, says):
    images, prompts = torch.rand(3, 3, 16, 16), ["a red circle"] * 3
    with misbehaving_server() as root:
        with pytest.raises(reward.RewardServerError) as err:
            reward.load_reward(root + path, wait=1)(images, prompts)
    assert str(err.value).startswith(root + path + ":") and says in str(err.value) and "\n" not in str(err.value)


def test_null_is_an_invalid_reward_and_other_lists_of_numbers_are_components():
    with misbehaving_server() as root:
        scores = reward.load_reward(root + "/nulls", wait=1)(torch.rand(3, 3, 16, 16), ["a red circle"] * 3)
    assert set(scores) == {root + "/nulls", "strict", "reward"} and torch.isnan(scores["reward"][0])
    assert scores["reward"][1:].tolist() == [0.5, 0.5] and scores["strict"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("path, says", [("/garbage", "not JSON"), ("/slow", "no answer (ReadTimeout"),
                                        ("closed", "is the server running?")])
def test_every_reward_server_is_asked_before_any_model_loads(prompt_file, tmp_path, monkeypatch, path, says):
    """Before anything loads, each reward server scores one small image, or one line names the flag, the URL and
    what went wrong (a closed port at once, without retries)."""
    import time

    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    with misbehaving_server() as root:
        url = f"http://127.0.0.1:{free_port()}/score" if path == "closed" else root + path
        start = time.time()
        with pytest.raises(SystemExit) as err:
            tg.main(["--tiny", "--prompt-file", prompt_file, "--out", str(tmp_path / "run"), "--eval-reward", url,
                     "--reward-wait", "1"])
    message = str(err.value)
    assert message.startswith(f"error: --eval-reward {url}:") and says in message and "\n" not in message
    assert time.time() - start < 10 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- several processes (torchrun, gloo on the CPU)

def one_step_world(seed=0):
    """A LoRA'd tiny pipeline (B != 0, so every LoRA weight has a gradient) and a batch of transitions with varied
    advantages: the same on every process that builds it."""
    pipe = tiny_world.build_tiny_pipeline(seed)
    torch.manual_seed(seed)
    params = tg.add_lora(pipe.transformer, rank=4)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    batch, sigmas = tiny_batch(pipe, 1.0)
    batch = batch._replace(advantage=torch.linspace(-1, 1, len(batch.x)))
    embeds = tg.encode_prompts(pipe, ["a red circle on the left", "two blue squares"])
    return pipe, params, batch, sigmas, embeds


def one_sgd_step(pipe, params, batch, sigmas, embeds, rows):
    args = tg.Args(guidance=4.5, beta=0.004, clip_range=0.2, optimizer_steps=1, max_batch=1024, train_batch=8)
    tg.update(pipe.transformer, params, torch.optim.SGD(params, lr=1e-2), tg.Batch(*(t[rows] for t in batch)),
              embeds, sigmas, torch.ones(6), args, torch.Generator())
    return [p.detach().clone() for p in params]


def test_gradient_checkpointing_changes_memory_not_the_update():
    """One update with --gradient-checkpointing equals one without (the frozen base's inputs need no gradient, yet
    the LoRA's gradients flow through the recomputed blocks)."""
    plain = one_sgd_step(*one_step_world(), rows=torch.arange(12))
    pipe, params, batch, sigmas, embeds = one_step_world()
    pipe.transformer.enable_gradient_checkpointing()
    checkpointed = one_sgd_step(pipe, params, batch, sigmas, embeds, torch.arange(12))
    before = one_step_world()[1]
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(plain, checkpointed))
    assert any(not torch.equal(a, b) for a, b in zip(checkpointed, before))  # the update is not empty


def one_step_on_two_processes(rank, store, splits, folder):
    """A process of the test below: one SGD step on its rows of the batch, for each split; its weights to a file."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = []
    for split in splits:
        pipe, params, batch, sigmas, embeds = one_step_world()
        results.append(one_sgd_step(pipe, params, batch, sigmas, embeds, split[rank]))
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_one_step_on_two_processes_is_the_step_on_the_union_of_their_transitions(tmp_path):
    """Under torchrun each optimizer step is the single-process step on the union of every process's transitions
    (the mean over all of them), also when they are spread unevenly or one process has none; the weights of both
    processes stay identical."""
    pipe, params, batch, sigmas, embeds = one_step_world()
    k = len(batch.x)
    everything = torch.arange(k)
    splits = [(everything[:3 * k // 4], everything[3 * k // 4:]),   # uneven
              (everything, everything[:0])]                         # the second process has nothing to train
    torch.multiprocessing.spawn(one_step_on_two_processes, args=(str(tmp_path / "store"), splits, str(tmp_path)),
                                nprocs=2)
    single = one_sgd_step(pipe, params, batch, sigmas, embeds, everything)
    before = one_step_world()[1]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for case in range(len(splits)):
        first, second = ranks[0][case], ranks[1][case]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(first, single))
        assert any(not torch.equal(a, b) for a, b in zip(first, before))  # the step moved the weights


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "tempflow_grpo.py", *argv], capture_output=True, text=True, cwd=Path(tg.__file__).parent)


def test_torchrun_two_processes_resume_exactly_and_the_first_writes(random_model, prompt_file, tmp_path):
    """torchrun --nproc_per_node 2 --tiny: 2 epochs, then --resume to 4, equals 4 straight (LoRA, metrics and
    evaluations); the first process writes one metrics row per epoch; resuming with another number of processes
    is refused."""
    def argv(out, epochs, *extra):
        args = sys_argv_of(random_model, prompt_file, out)
        args[args.index("--epochs") + 1], args[args.index("--save-every") + 1] = str(epochs), "1"
        args[args.index("--eval-prompt-file") + 1] = prompt_file
        return [*args, "--prompts-per-epoch", "2", "--lr", "3e-2", "--clip-range", "0.2", "--eval-every", "2",
                "--eval-steps", "3", *extra]
    for out, epochs, extra in ((tmp_path / "a", 4, []), (tmp_path / "b", 2, []), (tmp_path / "b", 4, ["--resume"])):
        done = torchrun(argv(out, epochs, *extra))
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = lora_of(tmp_path / "a"), lora_of(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(tmp_path / out / "metrics.jsonl").read_text().splitlines() for out in "ab"]
    assert len(rows[0]) == 4 and [json.loads(r)["reward_mean"] for r in rows[0]] == [
        json.loads(r)["reward_mean"] for r in rows[1]]
    assert [json.loads(r).get("eval_reward") for r in rows[0]] == [json.loads(r).get("eval_reward") for r in rows[1]]
    assert len(list((tmp_path / "a" / "images").glob("eval_*.png"))) == 3  # base, after epochs 2 and 4
    with pytest.raises(SystemExit, match="2 process"):
        tg.train(tg.parse_args(argv(tmp_path / "b", 5, "--resume")))


def test_a_bad_setting_under_torchrun_is_said_once(prompt_file):
    """Every process meets the same bad setting; the first says it, the others exit without a word."""
    done = torchrun(["--tiny", "--prompt-file", prompt_file, "--branches", "1", "--prompts-per-epoch", "2"])
    assert done.returncode != 0 and done.stderr.count("error: --branches 1") == 1, done.stderr[-2000:]


def test_ctrl_c_under_torchrun_finishes_the_epoch_and_saves_it(random_model, prompt_file, tmp_path):
    """Ctrl-C under torchrun (SIGINT to the terminal's process group, then relayed by torchrun's agent): the epoch
    finishes and its checkpoint is written, as in one process, and the first process prints the command that
    resumes the run."""
    import os
    import signal
    import sys
    import time

    argv = sys_argv_of(random_model, prompt_file, tmp_path)
    argv[argv.index("--prompts-per-epoch") + 1] = "2"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "tempflow_grpo.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(tg.__file__).parent, start_new_session=True)  # its own group, as a terminal's
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    state = json.loads(next((tmp_path / "checkpoints").glob("epoch_*")).joinpath("state.json").read_text())
    assert state["epoch"] >= 1 and state["metrics_rows"] == len(metrics.read_text().splitlines()), output[-3000:]
    assert "KeyboardInterrupt" not in output and output.count("to continue: torchrun --nproc_per_node 2") == 1


def test_prompts_that_do_not_split_over_the_processes_fail_before_any_model_loads(tmp_path, monkeypatch):
    """--prompts-per-epoch not divisible by torchrun's WORLD_SIZE is one line naming the flag, before loading."""
    monkeypatch.setattr(plumbing, "load_pipeline", lambda *a: pytest.fail("a model was loaded"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    with pytest.raises(SystemExit, match="--prompts-per-epoch 6 .* 4 processes"):
        tg.main(["--prompt-file", str(prompts), "--prompts-per-epoch", "6"])

# ---------------------------------------------------------------- SD3.5-medium with random weights (bench/sd35m.py)

def test_sd35m_architecture_has_sd35_mediums_shapes():
    """On the meta device, the transformer, VAE and text encoders have SD3.5-medium's configs, and the prompt is 77
    CLIP + 128 T5 tokens of width 4096 with a 2048-wide pooled embedding."""
    pipe = sd35m.build_sd35m("meta")
    t = pipe.transformer.config
    assert (t.sample_size, t.patch_size, t.in_channels, t.out_channels, t.num_layers, t.attention_head_dim,
            t.num_attention_heads, t.joint_attention_dim, t.caption_projection_dim, t.pooled_projection_dim,
            t.pos_embed_max_size, tuple(t.dual_attention_layers), t.qk_norm) == (
        128, 2, 16, 16, 24, 64, 24, 4096, 1536, 2048, 384, tuple(range(13)), "rms_norm")
    v = pipe.vae.config
    assert (v.latent_channels, pipe.vae_scale_factor, tuple(v.block_out_channels), v.scaling_factor,
            v.shift_factor, v.use_quant_conv, v.use_post_quant_conv) == (16, 8, (128, 256, 512, 512), 1.5305, 0.0609,
                                                                         False, False)
    widths = [(e.config.hidden_size, e.config.num_hidden_layers, e.config.projection_dim)
              for e in (pipe.text_encoder, pipe.text_encoder_2)]
    t5 = pipe.text_encoder_3.config
    assert widths == [(768, 12, 768), (1280, 32, 1280)]
    assert (t5.d_model, t5.num_layers, t5.d_ff, t5.num_heads, t5.d_kv, t5.vocab_size, t5.feed_forward_proj) == (
        4096, 24, 10240, 64, 64, 32128, "gated-gelu")
    embeds = tg.encode_prompts(pipe, ["a red circle"])
    assert embeds.embeds.shape == (1, 77 + 128, 4096) and embeds.pooled.shape == (1, 2048)


def test_sd35m_is_built_frozen_in_its_dtype_and_restores_the_default_dtype():
    """build_sd35m gives every model in eval mode, without gradients, with all its tensors in the dtype asked for,
    and leaves torch's default dtype as it found it."""
    default = torch.get_default_dtype()
    pipe = sd35m.build_sd35m(reduced=True, dtype=torch.bfloat16)
    models = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    tensors = [t for m in models for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()]
    assert not any(m.training for m in models) and not any(t.requires_grad for t in tensors)
    assert {t.dtype for t in tensors} == {torch.bfloat16} and torch.get_default_dtype() == default


def test_reduced_sd35m_and_pickscore_run_one_epoch(tmp_path, monkeypatch):
    """The miniature SD3.5-medium and PickScore, saved as model folders, train one epoch through tg.train with
    --reward pickscore: a finite reward and a saved LoRA."""
    sd35m.save_sd35m(tmp_path / "model", reduced=True)
    sd35m.build_pickscore(tmp_path / "pickscore", reduced=True)
    sd35m.pickscore_env(tmp_path / "pickscore", monkeypatch.setenv)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\ntwo blue squares\n")
    rows = tg.train(tg.parse_args([
        "--model", str(tmp_path / "model"), "--prompt-file", str(prompts), "--out", str(tmp_path / "run"),
        "--reward", "pickscore", "--resolution", "64", "--steps", "3", "--branches", "2", "--seeds-per-prompt", "1",
        "--prompts-per-epoch", "1", "--epochs", "1", "--lora-rank", "4"]))
    assert len(rows) == 1 and math.isfinite(rows[0]["reward_mean"])
    assert (tmp_path / "run" / "lora").is_dir()



def test_gpu_script_dry_run_measures_every_cap_and_the_rollout(tmp_path):
    """bench/gpu.py --dry-run (its reduced models on the CPU) runs one epoch of train() per row, 80 GB eager and
    compiled, 48 and 24 GB compiled, then the rollout benchmark; it writes each step's result to the .jsonl beside
    the report and a table with each row's seconds, compile seconds and first pass, the compiled/eager speed-up,
    the SDPA kernels of the 80 GB rows and the rollout's counted evaluations."""
    import sys

    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(out), "--folder", str(tmp_path / "work")],
                   check=True, capture_output=True, cwd=Path(tg.__file__).parent)
    steps = {r["step"]: r for r in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines())}
    assert list(steps) == ["80 GB eager", "80 GB compiled", "48 GB compiled", "24 GB compiled", "rollout"]
    rows = [steps[name] for name in list(steps)[:4]]
    assert all(r["train_s"] > 0 and r["predicted_gb"] > 0 for r in rows), rows  # the epoch ran under every cap
    assert all(r["first_pass_n"] > 0 and 0 <= r["first_pass_max"] < 1e-3 and r["first_pass_clipfrac"] == 0
               for r in rows)  # the first pass: the rollout's log-probs, up to the batching's round-off
    assert ["compile_s" in r for r in rows] == [False, True, True, True]
    assert all(steps[name]["sdpa"] for name in ("80 GB eager", "80 GB compiled"))  # the CPU's flash op
    table = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
    caps = [(row[0].strip(), row[1].strip()) for row in table if row[0].strip().endswith("GB")]
    assert caps == [("80 GB", "off"), ("80 GB", "on"), ("48 GB", "on"), ("24 GB", "on")]
    assert "eager / compiled: " in out.read_text() and "_scaled_dot_product_" in out.read_text()
    branch = next(row for row in table if row[0].strip() == "branch")
    assert branch[1] == branch[2]  # NFE counted == the cost formula


def test_gpu_script_caps_memory_on_an_indexed_device(monkeypatch):
    """bench/gpu.py's memory cap hands torch.cuda.set_per_process_memory_fraction the current device's index, as
    torch requires (a torch.device("cuda") without one raises), and the cap's fraction of the card, at most 1."""
    from types import SimpleNamespace

    from bench import gpu

    fractions = []

    def set_per_process_memory_fraction(fraction, device=None):
        torch._utils._get_device_index(device, optional=False)  # torch's own check of the device
        fractions.append(fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=96 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_per_process_memory_fraction)
    with pytest.raises(ValueError, match="specified index"):  # what the script's first version passed
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
    gpu.cap_memory(24)
    gpu.cap_memory(80)
    gpu.cap_memory(141)
    assert fractions == [0.25, pytest.approx(80 / 96), 1.0]


def test_the_plan_counts_a_small_model_as_by_hand():
    """bench/plan.py's meter, on the meta device under CUDA's autocast rules, gives a count by hand. A chain of N
    frozen bf16 linear layers, each followed by GELU, after a float32 scale that trains: at its peak (the end of
    forward) it holds its weights and input, the N GELU inputs in bf16 (a linear layer with a frozen weight saves
    only that weight), the last output and the float32 copy that autocast makes for the sum; its matmuls cost
    2 B D^2 N FLOPs forward and as many backward (no weight gradients). Fused attention keeps its bf16 output and
    float32 log-sum-exp, where the math path keeps L x L probabilities."""
    from bench import plan

    B, D, N = 64, 256, 5
    with torch.device("meta"):
        weights = [torch.empty(D, D, dtype=torch.bfloat16) for _ in range(N)]
        scale, x = torch.nn.Parameter(torch.empty(D)), torch.empty(B, D)
    with plan.metered(*weights, scale, x) as chain:
        with plan.CudaAutocast():
            h = x * scale
            for w in weights:
                h = torch.nn.functional.gelu(torch.nn.functional.linear(h, w))
            loss = h.sum()
        loss.backward()
    resident = N * D * D * 2 + D * 4 + B * D * 4
    assert chain["resident"] == resident
    assert abs(chain["peak"] - (resident + N * B * D * 2 + B * D * 2 + B * D * 4)) <= 16  # + a scalar or two
    assert chain["flops"] == 2 * (2 * B * D * D * N)
    heads, L = 4, 512
    with torch.device("meta"):
        qkv = [torch.empty(2, heads, L, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    with plan.metered(*qkv) as fused, plan.CudaAutocast():
        torch.nn.functional.scaled_dot_product_attention(*qkv)
    with plan.metered(*qkv) as math_path:
        torch.nn.functional.scaled_dot_product_attention(*qkv)
    output_and_lse = 2 * heads * L * (64 * 2 + 4)
    assert 0 <= fused["peak"] - fused["resident"] - output_and_lse <= 64  # + the kernel's seed and offset
    assert math_path["peak"] - math_path["resident"] > 2 * heads * L * L * 2


def test_the_plan_of_the_reduced_pipeline_moves_as_it_must(capsys):
    """bench/plan.py on SD3.5-M's miniature: a training micro-batch of more latents takes more memory, gradient
    checkpointing less; offloading the text encoders lowers what sampling sits on, not what encoding needs; the
    command line prints every phase and that compiled is not yet measured; a card's time is the FLOPs over its
    rate, the H200's measured one (the reference epoch's 419 PFLOP in 47.5 min) or, for other cards, that rate
    scaled by their datasheet peaks. It replaces a private part of torch's MemTracker and FlopCounterMode (their
    module trackers): this fails loudly when torch moves it."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    from bench import plan

    assert hasattr(MemTracker(), "_mod_tracker") and hasattr(FlopCounterMode(), "mod_tracker"), \
        "torch moved the module trackers that bench/plan.py replaces (NoModules)"

    def phases(*flags):
        return plan.plan(plan.parse(["--resolution", "64", *flags]), reduced=True)["phases"]
    base, more = phases("--train-batch", "2"), phases("--train-batch", "8")
    checkpointed = phases("--train-batch", "8", "--gradient-checkpointing")
    offloaded = phases("--train-batch", "2", "--offload-text-encoders")
    assert more["train"]["peak"] > base["train"]["peak"] > 0
    assert checkpointed["train"]["peak"] < more["train"]["peak"]
    assert offloaded["sample"]["resident"] < base["sample"]["resident"]
    assert offloaded["encode"]["resident"] == base["encode"]["resident"]
    plan.main(["--reduced", "--resolution", "64"])
    printed = capsys.readouterr().out
    assert all(name in printed for name in plan.PHASES.values()) and "run's peak" in printed
    assert "compiled: not yet measured" in printed
    times = {card: (rate, seconds) for card, rate, seconds in plan.card_times(419e15)}
    assert all(seconds == pytest.approx(419e15 / (rate * 1e12)) for rate, seconds in times.values())
    assert times[plan.MEASURED][0] == plan.EPOCH_RATE and times[plan.MEASURED][1] / 60 == pytest.approx(47.5, abs=0.05)
    assert all(rate / plan.EPOCH_RATE == pytest.approx(plan.CARDS[card] / plan.CARDS[plan.MEASURED])
               for card, (rate, _) in times.items())


# ---------------------------------------------------------------- the tiny world

from tiny_world import build as world  # noqa: E402


def test_captioned_set_is_deterministic_and_its_captions_describe_its_pixels():
    """The same seed draws the same set; the asked colour lies wholly in the asked half, and a counting caption's
    colour forms as many connected shapes as it says."""
    from scipy import ndimage

    images, captions = world.make_dataset(64, seed=3)
    again, _ = world.make_dataset(64, seed=3)
    other, _ = world.make_dataset(64, seed=4)
    assert torch.equal(images, again) and not torch.equal(images, other)
    for image, caption in zip(images.permute(0, 2, 3, 1).numpy(), captions):
        want = reward.parse_caption(caption)
        mask = (abs(image - reward.COLORS[want["color"]]).max(-1) < 0.05)  # pixels fully of the asked colour
        ys, xs = mask.nonzero()
        assert len(xs) > 0, caption
        if want["position"]:
            inside = {"left": xs < 32, "right": xs >= 32, "top": ys < 32, "bottom": ys >= 32}[want["position"]]
            assert inside.all(), caption
        else:
            assert ndimage.label(mask)[1] == want["count"], caption


def test_the_reward_passes_every_drawn_caption():
    """geneval_toy's checks all pass on the set's own images: the reward reads captions as the set draws them."""
    images, captions = world.make_dataset(64, seed=5)
    for image, caption in zip(images.permute(0, 2, 3, 1).numpy(), captions):
        assert all(reward.geneval_checks(image, caption).values()), caption
    assert reward.geneval_toy(images, captions).min() > 0.9


@pytest.fixture(scope="module")
def world_samples():
    """ODE samples (10 steps, guidance 4.5) of the shipped tiny world: every caption of the grammar, two seeds."""
    pipe = tiny_world.build_tiny_pipeline(pretrained=True)
    captions = [c for cs in world.all_captions().values() for c in cs for _ in range(2)]
    noise = tg.initial_noise(pipe, len(captions), world.SIZE, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = tg.ode_rollout(tg.sd3_velocity(pipe.transformer, tg.encode_prompts(pipe, captions), 4.5), noise,
                                 tg.sigma_grid(pipe.scheduler, 10))
    images = tg.decode_latents(pipe, latents).permute(0, 2, 3, 1).numpy()
    return [reward.geneval_checks(image, caption) for image, caption in zip(images, captions)], captions


def test_the_tiny_world_beats_chance_on_colour_and_position(world_samples):
    """The asked colour appears far more often than chance (1 in 4 colours), and where it appears, its largest
    blob sits in the asked half far more often than chance (1 in 2): by three binomial standard errors."""
    checks, captions = world_samples
    colour = np.mean([c["color"] for c in checks])
    assert colour > 0.25 + 3 * math.sqrt(0.25 * 0.75 / len(checks)), colour
    placed = [c["position"] for c in checks if "position" in c and c["color"]]
    assert np.mean(placed) > 0.5 + 3 * math.sqrt(0.25 / len(placed)), np.mean(placed)


def test_the_tiny_world_leaves_room_to_fine_tune(world_samples):
    """It half follows its captions: well under all of its samples pass every check."""
    checks, _ = world_samples
    assert np.mean([all(c.values()) for c in checks]) < 0.75


def test_a_shortened_world_build_runs_end_to_end(tmp_path):
    """`python -m tiny_world.build` with a few steps writes a pipeline that loads and samples."""
    world.main(["--out", str(tmp_path), "--images", "32", "--vae-steps", "2", "--steps", "2", "--batch", "4",
                "--eval-seeds", "0"])
    pipe = plumbing.load_pipeline(str(tmp_path))
    assert pipe.vae.config.scaling_factor != 1.0  # measured on the set, not the default
    noise = tg.initial_noise(pipe, 1, world.SIZE, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = tg.ode_rollout(tg.sd3_velocity(pipe.transformer, tg.encode_prompts(pipe, ["two red circles"]), 4.5),
                                 noise, tg.sigma_grid(pipe.scheduler, 2))
    assert tg.decode_latents(pipe, latents).shape == (1, 3, 64, 64)


# ---------------------------------------------------------------- learning

def test_a_short_tiny_run_raises_the_reward_above_the_base_model(tmp_path):
    """30 epochs of --tiny TempFlow-GRPO raise the evaluation reward (one ODE sample per caption of the grammar,
    fixed noise), averaged over the evaluations after epochs 20 and 30, clearly above the base model's: by
    0.087 (seed 0, this test's) and 0.162 (seed 1) when it was written, with --prompt-draw independent; it asks for
    0.05."""
    rows = tg.train(tg.parse_args(["--tiny", "--prompt-file", str(tg.TINY_WORLD.parent / "prompts.txt"),
                                   "--out", str(tmp_path), "--epochs", "30", "--eval-every", "10",
                                   "--eval-steps", "10"]))
    base, late = rows[0]["base_eval_reward"], np.mean([row["eval_reward"] for row in rows[19::10]])
    assert late > base + 0.05, (base, [row["eval_reward"] for row in rows[9::10]])
