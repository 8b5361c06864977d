"""scoresde.interop.diffusers: diffusers U-Nets as ScoreModels, checked against diffusers' own schedulers.

Small randomly initialised ``UNet2DModel`` s (seeded) stand in for trained checkpoints: the conventions (which
time the network sees, what its output means, which coefficients a step uses) are what is tested.
"""

import builtins
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, DDPMScheduler, ScoreSdeVeScheduler, UNet2DModel  # noqa: E402

from scoresde import log_likelihood, sample  # noqa: E402
from scoresde.interop.diffusers import DiscreteVPSDE, from_unet, sde_from_scheduler  # noqa: E402
from scoresde.model import ScoreModel  # noqa: E402
from scoresde.samplers import Noise, ddim_step, denoise, reverse_diffusion_step  # noqa: E402
from scoresde.sde import VESDE, VPSDE  # noqa: E402

N = 1000
SHAPE = (2, 3, 8, 8)


def small_unet(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
               norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D"))
    cfg.update(kw)
    return UNet2DModel(**cfg).eval()


@pytest.fixture(scope="module")
def unet():
    return small_unet()


def noise(seed=1, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the DDPM-style (discrete VP) U-Net ----------------------------------------------------------
def test_eps_is_the_unet_output_at_ddpm_steps(unet):
    model, sde = from_unet(unet, DDPMScheduler())
    assert isinstance(model, ScoreModel) and not model.continuous and model.parameterization == "eps"
    assert isinstance(sde, VPSDE) and (sde.beta_min, sde.beta_max, sde.N, sde.schedule) == (0.1, 20.0, N, "linear")
    x, i = noise(), torch.tensor([3, 640])
    with torch.no_grad():
        ref = unet(x, i).sample
        assert torch.equal(model.eps_fn(x, i / (N - 1)), ref)  # at t = i T / (N - 1) the U-Net sees step i
        assert torch.equal(model.ddpm_eps_fn()(x, i), ref)
        s = torch.sqrt(1 - sde.alphas_cumprod[i]).float().reshape(-1, 1, 1, 1)
        # rtol: ScoreModel.coefs forms 1 - abar_i in float32 (abar_3 = 0.9994: ~1e-4 relative error in s)
        torch.testing.assert_close(model.score_fn(x, i / (N - 1)), -ref / s, rtol=2e-4, atol=0)


def test_sde_from_scheduler_linear_cosine_and_other_betas():
    assert repr(sde_from_scheduler(DDPMScheduler(beta_start=2e-4, beta_end=0.03, num_train_timesteps=500))) == \
        "VPSDE(beta_min=0.1, beta_max=15.0, N=500, schedule='linear')"
    trained = DDPMScheduler(trained_betas=torch.linspace(1e-4, 0.02, N).tolist())  # linear, without a beta_start
    assert sde_from_scheduler(trained).schedule == "linear"
    assert sde_from_scheduler(DDPMScheduler(beta_schedule="squaredcos_cap_v2")).schedule == "cosine"
    sched = DDPMScheduler(beta_schedule="scaled_linear")
    sde = sde_from_scheduler(sched)
    assert isinstance(sde, DiscreteVPSDE)
    torch.testing.assert_close(sde.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=0)
    assert isinstance(sde_from_scheduler(DDPMScheduler(), chain=True), DiscreteVPSDE)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sde_from_scheduler(DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="scheduler must be"):
        sde_from_scheduler(object())


def test_discrete_vp_sde_hits_the_chain_at_every_step():
    sched = DDPMScheduler(beta_schedule="scaled_linear", num_train_timesteps=50)
    sde = DiscreteVPSDE(sched.alphas_cumprod)
    t = torch.arange(50, dtype=torch.float64) / 49
    m, s = sde.marginal_coef(t)
    torch.testing.assert_close(m**2, sde.alphas_cumprod, rtol=1e-13, atol=0)
    torch.testing.assert_close(m**2 + s**2, torch.ones_like(m), rtol=1e-14, atol=0)
    torch.testing.assert_close(sde.discrete_timestep(t), torch.arange(50))
    u = torch.linspace(0, 1, 301, dtype=torch.float64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(u)), u, rtol=0, atol=1e-12)
    # beta(t) = -2 d log m / dt (piecewise constant): check by finite differences inside a segment
    tm, h = torch.tensor([0.3012], dtype=torch.float64), 1e-6
    fd = -2 * (sde.log_mean_coeff(tm + h) - sde.log_mean_coeff(tm - h)) / (2 * h)
    torch.testing.assert_close(sde.beta(tm), fd, rtol=1e-6, atol=0)
    same = DiscreteVPSDE(betas=sched.betas)
    torch.testing.assert_close(same.alphas_cumprod, sde.alphas_cumprod, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVPSDE(torch.tensor([0.9, 0.9, 0.5]))


def diffusers_ddim(unet, sched, x, steps):
    sched.set_timesteps(steps)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_equals_diffusers_ddim_trailing(unet, prediction_type):
    """diffusers' trailing grid of 5 steps is 999, 799, ..., 199, then a last step to alpha = 1 (set_alpha_to_one):
    scoresde's ``sample(method="ddim")`` on the chain's SDE with steps = 4 from T to eps = 199 / 999, then the
    final Tweedie denoising."""
    sched = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, prediction_type=prediction_type)
    model, sde = from_unet(unet, sched, sde=sde_from_scheduler(sched, chain=True))
    x_T = noise()
    ref = diffusers_ddim(unet, sched, x_T.clone(), 5)
    assert sched.timesteps.tolist() == list(range(999, 0, -200))
    out = sample(model.score_fn, sde, SHAPE, method="ddim", steps=4, eps=199 / (N - 1), denoise=True, x_T=x_T)
    assert out.nfe == 5
    torch.testing.assert_close(out.x, ref, rtol=1e-4, atol=1e-4)  # float32; x0 = (x - s eps) / m at m(T) = 0.006


def test_ddim_equals_diffusers_ddim_leading(unet):
    """The leading grid 800, 600, ..., 0 starts below T, which ``sample`` cannot express: scoresde's ``ddim_step``
    over that grid, and the last step of diffusers (0 -> alpha = 1) is the denoising at t = 0, where the chain still
    has s(0) = sqrt(beta_0)."""
    sched = DDIMScheduler(clip_sample=False)  # leading, set_alpha_to_one=True, steps_offset=0
    model, sde = from_unet(unet, sched, sde=sde_from_scheduler(sched, chain=True))
    x_T = noise(2)
    ref = diffusers_ddim(unet, sched, x_T.clone(), 5)
    ts = sched.timesteps.double() / (N - 1)
    assert ts[0] < 1 and ts[-1] == 0
    with torch.no_grad():
        x, tl = x_T.clone(), ts.tolist()
        for t, s in zip(tl[:-1], tl[1:]):
            x = ddim_step(model.score_fn, sde, x, t, s, 0.0, Noise(None, SHAPE[0], "cpu", torch.float32))
        x = denoise(model.score_fn, sde, x, 0.0)
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


def test_log_likelihood_runs_on_the_wrapped_unet():
    model, sde = from_unet(small_unet(3).double(), DDPMScheduler())
    x = noise(4, dtype=torch.float64).clamp(-1, 1)
    res = log_likelihood(model.score_fn, sde, x, method="euler", options={"step_size": 0.25}, eps=1e-3,
                         generator=torch.Generator().manual_seed(0))
    assert res.logp.shape == (2,) and bool(torch.isfinite(res.logp).all())
    assert res.nfe >= 4


# --- the score-SDE VE U-Net with Fourier features ------------------------------------------------
@pytest.fixture(scope="module")
def ve_unet():
    return small_unet(5, time_embedding_type="fourier")


def test_ve_fourier_unet_output_is_the_score(ve_unet):
    sched = ScoreSdeVeScheduler(num_train_timesteps=17, sigma_min=0.01, sigma_max=50.0)
    model, sde = from_unet(ve_unet, sched)
    assert isinstance(sde, VESDE) and (sde.sigma_min, sde.sigma_max, sde.N) == (0.01, 50.0, 17)
    assert model.continuous and model.parameterization == "score"
    sched.set_timesteps(17)
    sched.set_sigmas(17)
    torch.testing.assert_close(sde.discrete_sigmas.float(), sched.discrete_sigmas)
    x = noise(6) * 3
    with torch.no_grad():
        # ScoreSdeVePipeline calls the U-Net with sigma(t) at the continuous times of the scheduler
        for t, sig in zip(sched.timesteps[::5], sched.sigmas[::5]):
            torch.testing.assert_close(model.score_fn(x, t), ve_unet(x, sig.expand(2)).sample, rtol=1e-6, atol=1e-6)
        # its predictor step x + (sigma_i^2 - sigma_{i-1}^2) output + g z is scoresde's reverse-diffusion step with the
        # score: at t = 12/16 (exact in float32, so diffusers' floor index is 12) from sigma_12 to sigma_11
        t = torch.tensor(12 / 16)
        sig = sched.config.sigma_min * (sched.config.sigma_max / sched.config.sigma_min) ** t  # diffusers' sigma(t)
        out = sched.step_pred(ve_unet(x, sig.expand(2)).sample, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        t = float(t)
        ours = reverse_diffusion_step(model.score_fn, sde, x, t, 11 / 16, Noise(torch.Generator().manual_seed(7), 2, "cpu", torch.float32))
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-4)


def test_ve_needs_its_noise_range_and_matching_sde(ve_unet):
    with pytest.raises(ValueError, match="sigma_min, sigma_max is not in the UNet config"):
        from_unet(ve_unet)
    model, sde = from_unet(ve_unet, sde=VESDE(0.01, 50.0))
    assert model.parameterization == "score"
    with pytest.raises(ValueError, match="does not match the scheduler"):
        from_unet(ve_unet, ScoreSdeVeScheduler(sigma_max=348.0), sde=VESDE(0.01, 50.0))
    with pytest.raises(ValueError, match="needs a ScoreSdeVeScheduler"):
        from_unet(ve_unet, DDPMScheduler())


# --- refusals -----------------------------------------------------------------------------------
def test_refusals(unet):
    with pytest.raises(ValueError, match="goes with a Fourier-time"):
        from_unet(unet, ScoreSdeVeScheduler())
    with pytest.raises(ValueError, match="does not match the scheduler's alphas_cumprod"):
        from_unet(unet, DDPMScheduler(beta_schedule="scaled_linear"), sde=VPSDE())
    with pytest.raises(ValueError, match="sde must be a VPSDE"):
        from_unet(unet, sde=VESDE())
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        from_unet(unet, prediction_type="flow")
    with pytest.raises(ValueError, match="differs from the scheduler"):
        from_unet(unet, DDPMScheduler(), prediction_type="sample")
    with pytest.raises(TypeError, match="UNet2DModel"):
        from_unet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="class-conditional"):
        from_unet(small_unet(num_class_embeds=3))


def test_missing_diffusers_says_how_to_install(monkeypatch, unet):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "diffusers", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[diffusers\]'"):
        from_unet(unet)
