"""Properties of tempflow_grpo.py, one per test. CPU only, offline, on tiny pipelines built in code."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tempflow_grpo as tg

# SPEC section 1 and 5: the reference grid (T = 10, shift 3) and its noise-aware weights for k = 0..8.
SPEC_GRID = [1.0000, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
SPEC_WEIGHTS = [1.577, 1.673, 1.208, 1.004, 0.882, 0.795, 0.719, 0.635, 0.508]


@pytest.fixture(scope="module")
def pipe():
    return tg.build_tiny_pipeline(seed=0)


def reference_grid(steps=10, shift=3.0):
    return tg.sigma_grid(FlowMatchEulerDiscreteScheduler(shift=shift), steps)


def random_latents(batch, seed, shape=(4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape, generator=gen)


# ---------------------------------------------------------------- the grid and one step

def test_grid_is_the_schedulers():
    """The T-step grid comes from diffusers' scheduler: s_0 = 1 > ... > s_T = 0, SPEC's values for T = 10."""
    sigmas = reference_grid()
    assert sigmas.shape == (11,)
    assert torch.allclose(sigmas, torch.tensor(SPEC_GRID), atol=1e-4)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


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
        _, _, mean, std = tg.sde_step(x.double(), v.double(), sigmas.double(), 1, 0.7, prev_sample=x)
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
    _, log_prob, mean, std = tg.sde_step(x, v, sigmas, i, 0.7, prev_sample=y)
    x_next = tg.ode_step(x, v, sigmas, i)
    for row, k in enumerate(i.tolist()):
        r = slice(row, row + 1)
        _, lp_k, mean_k, std_k = tg.sde_step(x[r], v[r], sigmas, k, 0.7, prev_sample=y[r])
        assert torch.allclose(log_prob[r], lp_k) and torch.allclose(mean[r], mean_k) and torch.allclose(std[r], std_k)
        assert torch.allclose(x_next[r], tg.ode_step(x[r], v[r], sigmas, k))


# ---------------------------------------------------------------- noise-aware weighting

def test_noise_aware_weights_match_the_spec_table_and_average_one():
    """On the reference grid the weights are SPEC's table, mean exactly 1, largest early and smallest late."""
    weights = tg.noise_aware_weights(reference_grid(), 0.7, list(range(9)))
    assert torch.allclose(weights, torch.tensor(SPEC_WEIGHTS), atol=1e-3)
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
        ours = tg.ode_rollout(pipe.transformer, x, sigmas, embeds, guidance)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()


def test_tiny_pipeline_is_deterministic_and_in_eval_mode(pipe):
    """The same seed builds the same weights; every component is in eval mode (T5's dropout is off)."""
    again, other = tg.build_tiny_pipeline(seed=0), tg.build_tiny_pipeline(seed=1)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b, c = (getattr(p, name).state_dict() for p in (pipe, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs between two builds with seed 0"
        assert not all(torch.equal(a[k], c[k]) for k in a), f"{name} does not depend on the seed"
        assert not any(m.training for m in getattr(pipe, name).modules()), f"{name} is in train mode"


def test_missing_model_fails_with_one_line_naming_it():
    """Offline and without the files, loading a model exits with one line naming the model and --model."""
    with pytest.raises(SystemExit) as err:
        tg.load_pipeline("no-such-org/no-such-model")
    message = str(err.value)
    assert "\n" not in message and "no-such-org/no-such-model" in message and "--model" in message
