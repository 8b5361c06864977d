"""Configs: every option composes and validates, bad values fail naming the field, builders give the
library objects the configs describe, and the score_sde (ml-collections) bridge maps the paper's fields."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

import scoresde.config as C
from scoresde.sde import VESDE, VPSDE, SubVPSDE

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "scoresde" / "configs"
SCORE_SDE_DIR = ROOT / "experiments" / "score_sde_configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module("scoresde.configs", version_base="1.3"):
        yield


def make(app: str = "train", overrides=()):
    return compose(app, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------
# every shipped option composes and validates
# ------------------------------------------------------------------------------------------------
def test_config_tree_has_the_specified_options():
    assert set(options("sde")) == {"vp", "vp_cosine", "subvp", "ve"}
    assert set(options("model")) == {"mlp", "unet_tiny", "ddpmpp", "oracle"}
    assert set(options("data")) == {"gmm", "swissroll", "moons", "eight_gaussians", "checkerboard", "digits", "mnist", "cifar10"}
    assert set(options("sampler")) == {"pc", "langevin", "ode", "ddim", "dpm_solver", "heun", "ancestral"}
    assert {"quickstart", "ddpm_vs_sde", "cifar10_ddpmpp_vp", "cifar10_ddpmpp_subvp", "cifar10_ddpmpp_deep_vp",
            "cifar10_ncsnpp_ve", "cifar10_ddpm"} <= set(options("experiment"))
    assert (CONFIG_DIR / "__init__.py").is_file()  # importable as a package resource when installed


@pytest.mark.parametrize("group", ["sde", "model", "data", "sampler", "train", "eval"])
def test_every_group_option_validates(hydra_ctx, group):
    for opt in options(group):
        ov = [f"{group}={opt}"]
        if group == "model" and opt == "oracle":
            ov.append("data=gmm")
        if group == "model" and opt in ("unet_tiny", "ddpmpp"):
            ov.append("data=digits")
        if group == "sampler" and opt in ("ddim", "dpm_solver"):
            ov.append("sde=vp")
        obj = C.validate(make("train", ov))
        assert isinstance(obj, C.TrainAppConfig)


def test_every_experiment_validates(hydra_ctx):
    for exp in options("experiment"):
        app = "compare" if exp.startswith("ddpm_vs_sde") else "train"
        obj = C.validate(make(app, [f"experiment={exp}"]))
        if app == "train":
            C.build_sde(obj.sde)  # the library accepts it too
    q = C.validate(make("train", ["experiment=quickstart"]))
    assert (q.data.name, q.sde.name, q.sampler.method) == ("digits", "vp", "dpm_solver")
    ddpm = C.validate(make("train", ["experiment=cifar10_ddpm"]))
    assert ddpm.train.continuous is False and ddpm.sampler.predictor == "ancestral" and ddpm.model.num_res_blocks == 2
    ve = C.validate(make("train", ["experiment=cifar10_ncsnpp_ve"]))
    assert C.default_parameterization(ve.sde, ve.model) == "sigma_scaled" and ve.train.ema_rate == 0.999


def test_sample_nll_compare_apps_compose(hydra_ctx):
    s = C.validate(make("sample", ["ckpt=/some/run", "sampler=heun"]))
    assert s.ckpt == "/some/run" and isinstance(s.sampler, C.HeunSamplerConfig)
    n = C.validate(make("nll", ["ckpt=/some/run", "eval.splits=[val,test]"]))
    assert n.eval.splits == ["val", "test"]
    c = C.validate(make("compare", ["experiment=ddpm_vs_sde"]))
    assert c.compare.variants == ["ddpm", "vp", "subvp", "ve"]
    assert set(c.compare.samplers) == {"ancestral", "pc", "ode", "fast"}


def test_sample_without_ckpt_is_missing(hydra_ctx):
    with pytest.raises(Exception, match="ckpt"):
        C.validate(make("sample", []))


# ------------------------------------------------------------------------------------------------
# bad overrides fail at composition / validation, naming the field
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, pattern",
    [
        ("sde=foo", r"sde/foo"),  # unknown group option
        ("sampler=rk45", r"sampler/rk45"),
        ("sde.sigma_max=3", r"sde\.sigma_max"),  # key of another schema
        ("train.lrr=0.1", r"train\.lrr"),  # misspelt key
        ("train.lr=abc", r"train\.lr"),  # wrong type
        ("train.n_iters=1.5", r"train\.n_iters"),
        ("sampler.eta=0.5", r"sampler\.eta"),  # eta is not a key of the ode sampler
    ],
)
def test_composition_errors_name_the_field(hydra_ctx, override, pattern):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError), match=pattern):
        make("train", [override])


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.lr=-1e-3"], r"train\.lr must be a finite number > 0"),
        (["train.batch_size=0"], r"train\.batch_size must be an integer >= 1"),
        (["train.ema_rate=1.0"], r"train\.ema_rate must lie in \[0, 1\)"),
        (["train.importance_sampling=true"], r"train\.importance_sampling=true needs train\.likelihood_weighting"),
        (["sde.beta_min=25"], r"sde\.beta_min must be < sde\.beta_max"),
        (["sde=ve", "sde.sigma_min=60"], r"sde\.sigma_min must be < sde\.sigma_max"),
        (["sde.N=0"], r"sde\.N must be an integer >= 1"),
        (["sde.N=20"], r"sde\.N must be > sde\.beta_max"),
        (["sde.schedule=quadratic"], r"sde\.schedule must be one of"),
        (["model.dropout=1.5"], r"model\.dropout must lie in \[0, 1\)"),
        (["model.parameterization=v"], r"model\.parameterization must be one of"),
        (["model=oracle", "data=digits"], r"model=oracle needs data=gmm"),
        (["sampler=pc", "sampler.snr=0"], r"sampler\.snr must be a finite number > 0"),
        (["sampler=pc", "sampler.predictor=leapfrog"], r"sampler\.predictor must be one of"),
        (["sampler=ddim", "sde=ve"], r"sampler=ddim supports sde=vp"),
        (["sampler=ddim", "sampler.eta=2"], r"sampler\.eta must lie in \[0, 1\]"),
        (["sampler.steps=10"], r"sampler\.steps must be null for the adaptive"),
        (["sampler.ode_method=rk4"], r"sampler\.steps must be set"),
        (["sampler=dpm_solver", "sampler.order=4"], r"sampler\.order must be one of"),
        (["sampler=ancestral", "sde=subvp"], r"needs sde=vp or sde=ve"),
        (["sde=subvp", "train.continuous=false"], r"sub-VP has no discrete chain"),
        (["eval.splits=[train,dev]"], r"eval\.splits\[i\] must be one of"),
        (["eval.divergence=trace"], r"eval\.divergence must be one of"),
        (["data.name=imagenet"], r"data\.name must be one of"),
        (["data.noise_mixture_prob=1.5"], r"data\.noise_mixture_prob must lie in \[0, 1\]"),
        (["data.noise_mixture_std_min=0.5"], r"data\.noise_mixture_std_min must be <= data\.noise_mixture_std_max"),
        (["device=tpu"], r"device must be one of"),
        (["dtype=float16"], r"dtype must be one of"),
    ],
)
def test_range_errors_name_the_field(hydra_ctx, overrides, pattern):
    cfg = make("train", overrides)
    with pytest.raises(C.ConfigError, match=pattern):
        C.validate(cfg)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["sde.beta_max=-1"], "sde.beta_max"),
        (["sde=vp_cosine", "sde.beta_min=0"], "sde.beta_min"),
        (["sde=subvp", "sde.N=0"], "sde.N"),
        (["sde=ve", "sde.sigma_max=-2"], "sde.sigma_max"),
        (["train.n_iters=-1"], "train.n_iters"),
        (["train.warmup=-1"], "train.warmup"),
        (["train.beta2=1.0"], "train.beta2"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["train.lr_schedule=step"], "train.lr_schedule"),
        (["train.lr_final_ratio=2"], "train.lr_final_ratio"),
        (["train.eval_every=-1"], "train.eval_every"),
        (["sampler=pc", "sampler.corrector=mala"], "sampler.corrector"),
        (["sampler=ddim", "sampler.eta=-0.5"], "sampler.eta"),
        (["sampler.error_norm=l2"], "sampler.error_norm"),
        (["sampler=heun", "sampler.rho=0"], "sampler.rho"),
        (["eval.rtol=0"], "eval.rtol"),
        (["eval.eps=1.5"], "eval.eps"),
        (["eval.divergence=exact", "eval.probes=2"], "eval.probes"),
    ],
)
def test_library_validation_is_reported_under_the_config_key(hydra_ctx, overrides, key):
    """The SDE, optimisation, sampler-option and likelihood-solver groups are validated by the library
    (building the SDE / ``TrainOptions``; ``samplers.check_method_options``; ``likelihood.check_likelihood_options``):
    the config reports the library's own rule, under the full config key."""
    from scoresde.likelihood import check_likelihood_options
    from scoresde.samplers import check_method_options

    cfg = make("train", overrides)
    with pytest.raises(C.ConfigError, match=rf"^{re.escape(key)} ") as config_err:
        C.validate(cfg)
    obj = OmegaConf.to_object(cfg)
    with pytest.raises(ValueError) as library_err:
        if key.startswith("sde."):
            C.build_sde(obj.sde)
        elif key.startswith("train."):
            C.build_train_options(obj.train, seed=0)
        elif key.startswith("eval."):
            e = obj.eval
            check_likelihood_options(divergence=e.divergence, probes=e.probes, rtol=e.rtol, atol=e.atol, eps=e.eps)
        else:
            kw = C.sampler_kwargs(obj.sampler)
            check_method_options(kw.pop("method"), {k: v for k, v in kw.items() if k not in ("steps", "denoise", "eps")})
    # the library's message, with its argument names as full config keys (``n_steps`` is ``train.n_iters``)
    plain = re.sub(r"\b(sde|train|sampler|eval)\.", "", str(config_err.value)).replace("n_iters", "n_steps")
    assert plain == str(library_err.value)


def test_compare_config_errors(hydra_ctx):
    with pytest.raises(C.ConfigError, match=r"compare\.variants\[i\] must be one of"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.variants=[ddpm,ncsn]"]))
    with pytest.raises(C.ConfigError, match=r"compare\.samplers\.fast: unknown key\(s\) \['stepz'\]"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "+compare.samplers.fast.stepz=3"]))
    with pytest.raises(C.ConfigError, match=r"compare\.samplers\.ode\.rtol must be a finite number > 0"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.samplers.ode.rtol=-1"]))
    with pytest.raises(C.ConfigError, match=r"compare\.sde_overrides\.ve: unknown field\(s\) \['beta_min'\]"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "+compare.sde_overrides.ve.beta_min=0.1"]))
    with pytest.raises(C.ConfigError, match=r"compare\.sde_overrides\.ve\.sigma_min must be < "):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.sde_overrides.ve.sigma_min=20.0"]))


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def test_build_sde_matches_config(hydra_ctx):
    vp = C.build_sde(C.validate(make("train", ["sde=vp", "sde.beta_max=12.5", "sde.N=100"])).sde)
    assert vp.discrete_betas.max() < 1
    assert isinstance(vp, VPSDE) and (vp.beta_min, vp.beta_max, vp.N, vp.schedule) == (0.1, 12.5, 100, "linear")
    assert torch.allclose(vp.discrete_betas, torch.linspace(0.1 / 100, 12.5 / 100, 100, dtype=torch.float64))
    cos = C.build_sde(C.validate(make("train", ["sde=vp_cosine"])).sde)
    assert isinstance(cos, VPSDE) and cos.schedule == "cosine"
    sub = C.build_sde(C.validate(make("train", ["sde=subvp"])).sde)
    assert isinstance(sub, SubVPSDE)
    ve = C.build_sde(C.validate(make("train", ["sde=ve", "sde.sigma_max=7.0"])).sde)
    assert isinstance(ve, VESDE) and ve.sigma_max == 7.0 and ve.prior_std == 7.0


def test_config_yaml_round_trip_builds_the_same_objects(hydra_ctx, tmp_path):
    obj = C.validate(make("train", ["sde=ve", "sde.sigma_max=9.0", "model.hidden=24", "sampler=heun", "train.lr=3e-4"]))
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(obj)))
    from scoresde.cli import load_run

    # load_run re-types the saved YAML by the schemas; for the oracle it needs no checkpoint
    obj2 = C.validate(make("train", ["model=oracle", "sde=ve", "sde.sigma_max=9.0"]))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(obj2)))
    run = load_run(str(run_dir), "cpu", torch.float64)
    assert run.cfg == obj2
    assert isinstance(run.sde, VESDE) and run.sde.sigma_max == 9.0
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(C.TrainAppConfig), {"sde": OmegaConf.structured(C.VESDEConfig),
                                                                                         "model": OmegaConf.structured(C.MLPModelConfig),
                                                                                         "sampler": OmegaConf.structured(C.HeunSamplerConfig)},
                                                   OmegaConf.load(path)))
    assert back == obj


def test_build_model_and_loss(hydra_ctx):
    obj = C.validate(make("train", ["data=digits", "model=unet_tiny", "sde=ve", "model.ch=8", "train.likelihood_weighting=true"]))
    sde = C.build_sde(obj.sde)
    model = C.build_model(obj.model, obj.sde, sde, (1, 8, 8), continuous=True).double()
    assert model.parameterization == "sigma_scaled" and model.continuous
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert model.score_fn(x, torch.full((3,), 0.5, dtype=torch.float64)).shape == x.shape
    mlp = C.validate(make("train", ["data=digits", "model=mlp", "model.hidden=16", "model.depth=1"]))
    m2 = C.build_model(mlp.model, mlp.sde, C.build_sde(mlp.sde), (1, 8, 8), continuous=True)
    assert m2.parameterization == "eps"
    assert m2.score_fn(x.float(), torch.full((3,), 0.5)).shape == x.shape  # MLP on images: flattened
    loss_fn = C.build_loss(obj.train, sde)
    g = torch.Generator().manual_seed(0)
    val = loss_fn(model, x, g)
    assert val.dim() == 0 and torch.isfinite(val)


def test_build_train_options_maps_fields(hydra_ctx):
    obj = C.validate(make("train", ["train.n_iters=7", "train.ckpt_every=3", "train.lr=5e-4", "train.grad_clip=0", "seed=11"]))
    o = C.build_train_options(obj.train, obj.seed)
    assert (o.n_steps, o.checkpoint_every, o.lr, o.grad_clip, o.seed, o.ema_rate) == (7, 3, 5e-4, None, 11, obj.train.ema_rate)


@pytest.mark.parametrize("opt", options("sampler"))
def test_every_sampler_config_is_accepted_by_the_library(hydra_ctx, opt):
    """The sampler configs' keys are exactly options of ``scoresde.samplers.sample`` (checked on the oracle)."""
    from scoresde.data import default_gmm
    from scoresde.samplers import sample

    sde_name = "ve" if opt in ("langevin",) else "vp"
    ov = [f"sampler={opt}", f"sde={sde_name}", "sde.N=30"]
    if opt in ("ddim", "dpm_solver", "heun"):
        ov.append("sampler.steps=4")
    if opt == "ode":
        ov += ["sampler.rtol=1e-3", "sampler.atol=1e-3"]
    if opt == "langevin":
        ov += ["sampler.steps=5", "sampler.n_steps=1"]
    obj = C.validate(make("train", ov))
    sde = C.build_sde(obj.sde)
    gm = default_gmm(2)
    kw = C.sampler_kwargs(obj.sampler)
    method, steps = kw.pop("method"), kw.pop("steps")
    res = sample(gm.score_fn(sde), sde, (8, 2), method=method, steps=steps, generator=torch.Generator().manual_seed(0),
                 dtype=torch.float64, **kw)
    assert res.x.shape == (8, 2) and torch.isfinite(res.x).all() and res.nfe >= 1


# ------------------------------------------------------------------------------------------------
# score_sde (ml-collections) bridge
# ------------------------------------------------------------------------------------------------
def test_score_sde_cifar10_config_maps_to_the_equivalent_run(hydra_ctx):
    cd = C.load_score_sde_config(str(SCORE_SDE_DIR / "ddpmpp_continuous_vp_cifar10.py"))
    ov = C.score_sde_overrides(cd)
    obj = C.validate(make("train", ov))
    assert isinstance(obj.sde, C.VPSDEConfig) and (obj.sde.beta_min, obj.sde.beta_max, obj.sde.N) == (0.1, 20.0, 1000)
    assert isinstance(obj.model, C.UNetModelConfig)
    assert (obj.model.ch, obj.model.ch_mult, obj.model.num_res_blocks, obj.model.attn_resolutions) == (128, [1, 2, 2, 2], 4, [16])
    assert (obj.model.dropout, obj.model.time_embedding, obj.model.parameterization) == (0.1, "sinusoidal", "eps")
    assert (obj.train.lr, obj.train.warmup, obj.train.grad_clip, obj.train.ema_rate) == (2e-4, 5000, 1.0, 0.9999)
    assert (obj.train.n_iters, obj.train.batch_size, obj.train.continuous, obj.train.reduce_mean) == (1300001, 128, True, True)
    assert obj.train.likelihood_weighting is False
    assert isinstance(obj.sampler, C.PCSamplerConfig)
    assert (obj.sampler.predictor, obj.sampler.corrector, obj.sampler.snr, obj.sampler.n_steps) == ("reverse_diffusion", "langevin", 0.16, 1)
    assert (obj.data.name, obj.data.centered, obj.data.random_flip) == ("cifar10", True, True)
    assert obj.seed == 42


def _cd(**sections):
    import ml_collections

    cd = ml_collections.ConfigDict()
    for name, fields in sections.items():
        if isinstance(fields, dict):
            sub = ml_collections.ConfigDict()
            for k, v in fields.items():
                sub[k] = v
            cd[name] = sub
        else:
            cd[name] = fields
    return cd


def test_score_sde_ve_and_likelihood_weighting(hydra_ctx):
    cd = _cd(training={"sde": "vesde", "continuous": True, "likelihood_weighting": True},
             model={"name": "ncsnpp", "sigma_min": 0.01, "sigma_max": 348.0, "num_scales": 2000, "beta_min": 0.1,
                    "scale_by_sigma": True, "embedding_type": "fourier", "fourier_scale": 16},
             sampling={"method": "pc", "predictor": "reverse_diffusion", "corrector": "ald"},
             data={"dataset": "CIFAR10"})
    obj = C.validate(make("train", C.score_sde_overrides(cd)))
    assert isinstance(obj.sde, C.VESDEConfig) and (obj.sde.sigma_max, obj.sde.N) == (348.0, 2000)
    assert obj.model.parameterization == "sigma_scaled" and obj.model.time_embedding == "fourier"
    assert obj.train.likelihood_weighting is True and obj.sampler.corrector == "annealed_langevin"


@pytest.mark.parametrize(
    "section, field, value, pattern",
    [
        ("training", "unknown_knob", 3, r"unknown field\(s\): \['training\.unknown_knob'\]"),
        ("model", "fir", True, r"model\.fir=True"),
        ("model", "progressive", "output_skip", r"model\.progressive='output_skip'"),
        ("optim", "optimizer", "SGD", r"optim\.optimizer='SGD'"),
        ("training", "sde", "cld", r"training\.sde='cld'"),
        ("data", "dataset", "LSUN", r"data\.dataset='LSUN'"),
        ("sampling", "method", "ddim", r"sampling\.method='ddim'"),
        ("data", "image_size", 64, r"data\.image_size=64"),
    ],
)
def test_score_sde_unsupported_fields_fail_naming_them(section, field, value, pattern):
    cd = C.load_score_sde_config(str(SCORE_SDE_DIR / "ddpmpp_continuous_vp_cifar10.py"))
    with cd.unlocked():
        cd[section][field] = value
    with pytest.raises(C.ConfigError, match=pattern):
        C.score_sde_overrides(cd)


def test_expand_argv_user_overrides_win(tmp_path):
    argv = [f"score_sde_config={SCORE_SDE_DIR / 'ddpm_digits_tiny.py'}", "train.lr=0.5", "model=unet_tiny"]
    out = C.expand_score_sde_argv(argv)
    assert out[-3:] == argv  # the user's come last, so they win
    assert "model=ddpmpp" not in out  # a group the user chose is not chosen twice
    assert "sde=vp" in out and "train.continuous=false" in out
    assert C.expand_score_sde_argv(["train.lr=1"]) == ["train.lr=1"]
    with pytest.raises(C.ConfigError, match="file not found"):
        C.expand_score_sde_argv(["score_sde_config=/nonexistent/file.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(C.ConfigError, match="defines no get_config"):
        C.load_score_sde_config(str(bad))


def test_library_never_imports_hydra():
    """Only config.py and cli.py may import Hydra/OmegaConf."""
    pkg = ROOT / "scoresde"
    offenders = []
    for p in pkg.rglob("*.py"):
        if p.name in ("config.py", "cli.py"):
            continue
        text = p.read_text()
        if "import hydra" in text or "from hydra" in text or "omegaconf" in text:
            offenders.append(str(p.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize("launcher, target", [("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher"),
                                              ("submitit_slurm", "SlurmLauncher")])
def test_launcher_plugins_are_selectable_by_config(hydra_ctx, launcher, target):
    """Sweeps go beyond one process through Hydra's own launcher plugins, chosen by a config option."""
    cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.callbacks.collate._target_ == "scoresde.cli.CollateCallback"
