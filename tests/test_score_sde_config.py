"""The score_sde bridge: a score_sde-style config file (ml-collections, the paper's field names) becomes the
equivalent run, including NCSN++ / DDPM++ / DDPM with every architecture field (the same networks), and fields we
do not implement or do not know fail naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import scoresde.config as C
from scoresde.interop.score_sde_config import expand_score_sde_argv, load_score_sde_config, score_sde_overrides

ROOT = Path(__file__).resolve().parents[1]
SCORE_SDE_DIR = ROOT / "experiments" / "score_sde_configs"


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module("scoresde.configs", version_base="1.3"):
        yield


def run_of(overrides):
    return C.to_run(C.validate(compose("train", overrides=list(overrides))))


def test_score_sde_cifar10_config_maps_to_the_equivalent_run(hydra_ctx):
    r = run_of(score_sde_overrides(load_score_sde_config(str(SCORE_SDE_DIR / "ddpmpp_continuous_vp_cifar10.py"))))
    assert r.sde == {"name": "vp", "kwargs": {"beta_min": 0.1, "beta_max": 20.0, "N": 1000, "schedule": "linear"}}
    assert r.net["name"] == "ncsnpp" and r.parameterization == "eps"
    k = r.net["kwargs"]
    assert (k["nf"], k["ch_mult"], k["num_res_blocks"], k["attn_resolutions"]) == (128, (1, 2, 2, 2), 4, (16,))
    assert (k["dropout"], k["embedding_type"], k["resblock_type"], k["skip_rescale"]) == (0.1, "positional", "biggan", True)
    assert (r.train.lr, r.train.warmup, r.train.grad_clip, r.train.ema_rate) == (2e-4, 5000, 1.0, 0.9999)
    assert (r.train.n_steps, r.train.batch_size) == (1300001, 128)
    assert r.loss == {"continuous": True, "weighting": "default", "importance_sampling": False, "reduce": "mean", "eps": 1e-5,
                      "p_uncond": 0.1}  # label dropout, used by class-conditional networks only
    assert (r.sampler["method"], r.sampler["predictor"], r.sampler["corrector"], r.sampler["snr"]) == ("pc", "reverse_diffusion", "langevin", 0.16)
    assert (r.data.name, r.data.centered, r.data.random_flip, r.seed) == ("cifar10", True, True, 42)


def _cd(**sections):
    import ml_collections

    cd = ml_collections.ConfigDict()
    for name, fields in sections.items():
        sub = ml_collections.ConfigDict()
        for k, v in fields.items():
            sub[k] = v
        cd[name] = sub
    return cd


def test_score_sde_ncsnpp_ve_config_builds_ncsnpp(hydra_ctx):
    """NCSN++ (FIR, residual input pyramid, Fourier features, scale_by_sigma) was rejected before; it now builds the
    same network, with the output read as the score (score_sde's VE convention) and sampling_eps applied."""
    cd = _cd(training={"sde": "vesde", "continuous": True, "likelihood_weighting": True},
             model={"name": "ncsnpp", "sigma_min": 0.01, "sigma_max": 348.0, "num_scales": 2000, "scale_by_sigma": True,
                    "embedding_type": "fourier", "fourier_scale": 16, "fir": True, "fir_kernel": [1, 3, 3, 1],
                    "progressive": "output_skip", "progressive_input": "input_skip", "nf": 32, "ch_mult": (1, 2),
                    "num_res_blocks": 1, "attn_resolutions": (4,)},
             sampling={"method": "pc", "predictor": "reverse_diffusion", "corrector": "ald", "sampling_eps": 1e-4},
             data={"dataset": "digits", "centered": False})
    r = run_of(score_sde_overrides(cd))
    assert r.sde["name"] == "ve" and (r.sde["kwargs"]["sigma_max"], r.sde["kwargs"]["N"]) == (348.0, 2000)
    k = r.net["kwargs"]
    assert r.net["name"] == "ncsnpp" and k["fir"] and k["progressive"] == "output_skip" and k["progressive_input"] == "input_skip"
    assert r.parameterization == "score" and r.loss["weighting"] == "likelihood"
    assert r.sampler["corrector"] == "annealed_langevin" and r.sampler["eps"] == 1e-4 and r.data.centered is False


@pytest.mark.parametrize(
    "section, field, value, pattern",
    [
        ("training", "unknown_knob", 3, r"unknown field\(s\): \['training\.unknown_knob'\]"),
        ("optim", "optimizer", "SGD", r"optim\.optimizer='SGD'"),
        ("training", "sde", "cld", r"training\.sde='cld'"),
        ("data", "dataset", "LSUN", r"data\.dataset='LSUN'"),
        ("sampling", "method", "ddim", r"sampling\.method='ddim'"),
        ("data", "image_size", 64, r"data\.image_size=64"),
        ("model", "name", "ncsnv2", r"model\.name='ncsnv2'"),
        ("model", "hidden", 64, r"model\.hidden \(not an argument"),
    ],
)
def test_score_sde_unsupported_fields_fail_naming_them(section, field, value, pattern):
    cd = load_score_sde_config(str(SCORE_SDE_DIR / "ddpmpp_continuous_vp_cifar10.py"))
    with cd.unlocked():
        cd[section][field] = value
    with pytest.raises(ValueError, match=pattern):
        score_sde_overrides(cd)


def test_expand_argv_user_overrides_win(tmp_path):
    argv = [f"score_sde_config={SCORE_SDE_DIR / 'ddpm_digits_tiny.py'}", "train.lr=0.5", "model=unet_tiny"]
    out = expand_score_sde_argv(argv)
    assert out[-3:] == argv  # the user's come last, so they win
    assert "model=ddpm" not in out  # a group the user chose is not chosen twice
    assert "sde=vp" in out and "train.continuous=false" in out
    assert expand_score_sde_argv(["train.lr=1"]) == ["train.lr=1"]
    with pytest.raises(ValueError, match="file not found"):
        expand_score_sde_argv(["score_sde_config=/nonexistent/file.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_score_sde_config(str(bad))
