"""Configs: the library is the schema. Every config default is the library signature's default, every library
keyword is reachable from the command line, every shipped option composes and validates, bad values fail naming
the field (with the library's own rule), and the plain objects built from a config are the ones it describes."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

import scoresde.config as C
from scoresde import build, samplers
from scoresde.losses import class_conditional, get_loss_fn
from scoresde.runs import RunConfig
from scoresde.sde import VESDE, VPSDE, SubVPSDE
from scoresde.train import TrainOptions

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "scoresde" / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_module("scoresde.configs", version_base="1.3"):
        yield


def make(app: str = "train", overrides=()):
    return compose(app, overrides=list(overrides))


def _schema_defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f.name] = tuple(d) if isinstance(d, list) else d
    return out


def _signature_defaults(fn, exclude=()) -> dict:
    target = fn.__init__ if inspect.isclass(fn) else fn
    return {n: p.default for n, p in inspect.signature(target).parameters.items()
            if n not in ("self", *exclude) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


# ------------------------------------------------------------------------------------------------
# one source of truth
# ------------------------------------------------------------------------------------------------
def test_config_defaults_equal_the_library_signature_defaults():
    for name, cls in build.SDES.items():
        d = _schema_defaults(C.SDE_SCHEMAS[name])
        assert d.pop("name") == name and d == _signature_defaults(cls)
    for name, cls in build.NETWORKS.items():
        d = _schema_defaults(C.MODEL_SCHEMAS[name])
        assert d.pop("name") == name and d.pop("parameterization") == "auto"
        assert d == _signature_defaults(cls, (*build.DATA_ARGS, *build.SDE_ARGS))
    for method, fn in samplers.SAMPLERS.items():
        d = _schema_defaults(C.SAMPLER_SCHEMAS[method])
        assert d.pop("method") == method
        sig = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY and n in d}
        assert d == sig == dict(samplers.METHOD_OPTIONS[method])
    d = _schema_defaults(C.TrainSchema)
    lib = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.name != "seed"}
    lib.update(_signature_defaults(get_loss_fn, ("sde",)))
    lib.update(_signature_defaults(class_conditional, ("loss_fn", "num_classes")))  # label dropout: train.p_uncond
    assert d == lib


def test_every_library_keyword_is_reachable_from_the_command_line(hydra_ctx):
    """Every keyword of every SDE, network, sampler, ``TrainOptions`` (``seed`` is the top-level key) and the loss is
    a key of its config group; a non-default value given on the command line arrives in the plain objects."""
    for name, cls in build.SDES.items():
        assert set(_signature_defaults(cls)) <= {f.name for f in dataclasses.fields(C.SDE_SCHEMAS[name])}
    for name, cls in build.NETWORKS.items():
        assert set(_signature_defaults(cls, (*build.DATA_ARGS, *build.SDE_ARGS))) <= {f.name for f in dataclasses.fields(C.MODEL_SCHEMAS[name])}
    for method in samplers.METHODS:
        assert set(samplers.METHOD_OPTIONS[method]) <= {f.name for f in dataclasses.fields(C.SAMPLER_SCHEMAS[method])}
    train_keys = {f.name for f in dataclasses.fields(C.TrainSchema)}
    assert {f.name for f in dataclasses.fields(TrainOptions)} - {"seed"} <= train_keys
    assert set(_signature_defaults(get_loss_fn, ("sde",))) <= train_keys
    # options the old hand-written schemas could not set, now set from the command line
    r = C.to_run(C.validate(make("train", ["sampler=pc", "sampler.schedule=logSNR", "sampler.rho=5.0", "sampler.langevin_norm=sample",
                                           "train.ema_warmup=false", "train.select_mode=max", "train.weighting=likelihood",
                                           "train.reduce=sum", "model.embed_dim=32", "seed=5"])))
    assert (r.sampler["schedule"], r.sampler["rho"], r.sampler["langevin_norm"]) == ("logSNR", 5.0, "sample")
    assert (r.train.ema_warmup, r.train.select_mode, r.loss["weighting"], r.loss["reduce"]) == (False, "max", "likelihood", "sum")
    assert r.net["kwargs"]["embed_dim"] == 32 and r.seed == 5


def test_old_field_names_are_refused_naming_the_new_one():
    assert "train.n_steps" in C.legacy_override_error(["train.n_iters=5"])
    assert "train.weighting" in C.legacy_override_error(["train.likelihood_weighting=true"])
    assert C.legacy_override_error(["train.n_steps=5", "sde=ve"]) is None


# ------------------------------------------------------------------------------------------------
# every shipped option composes and validates
# ------------------------------------------------------------------------------------------------
def test_config_tree_has_the_specified_options():
    assert {"vp", "vp_cosine", "subvp", "ve"} == set(options("sde"))
    assert {"mlp", "mlp_wide", "unet", "unet_tiny", "ddpmpp", "ddpmpp_deep", "oracle"} <= set(options("model"))
    assert {"gmm", "swissroll", "moons", "eight_gaussians", "checkerboard", "digits", "mnist", "cifar10"} <= set(options("data"))
    assert set(options("sampler")) == {"pc", "langevin", "ode", "ddim", "dpm_solver", "heun", "ancestral",
                                       "dpm_solver_pp", "unipc", "dpm_solver_adaptive", "edm"}
    assert {"quickstart", "quickstart_mlp", "ddpm_vs_sde", "cifar10_ddpmpp_vp", "cifar10_ddpmpp_subvp", "cifar10_ddpmpp_deep_vp",
            "cifar10_ncsnpp_ve", "cifar10_ddpm"} <= set(options("experiment"))
    assert (CONFIG_DIR / "__init__.py").is_file()  # importable as a package resource when installed


@pytest.mark.parametrize("group", ["sde", "model", "data", "sampler", "train", "eval"])
def test_every_group_option_validates(hydra_ctx, group):
    for opt in options(group):
        if group == "data" and opt == "tensor_file":
            continue  # needs a file (tests/test_tensor_file.py)
        ov = [f"{group}={opt}"]
        if group == "model" and opt == "oracle":
            ov.append("data=gmm")
        elif group == "model" and opt not in ("mlp", "mlp_wide"):
            ov.append("data=cifar10" if opt in ("ddpmpp", "ddpmpp_deep", "unet", "ncsnpp", "ncsnpp_deep", "ddpm") else "data=digits")
        if group == "model" and opt in ("ncsnpp", "ncsnpp_deep"):
            ov.append("sde=ve")
        obj = C.validate(make("train", ov))
        assert isinstance(obj, C.TrainAppConfig)


@pytest.mark.parametrize("exp", options("experiment"))
def test_every_experiment_validates(hydra_ctx, exp):
    app = "compare" if exp.startswith("ddpm_vs_sde") else "train"
    C.to_run(C.validate(make(app, [f"experiment={exp}"])))


def test_experiment_presets(hydra_ctx):
    q = C.to_run(C.validate(make("train", ["experiment=quickstart"])))
    assert (q.data.name, q.sde["name"], q.sampler["method"], q.net["name"]) == ("digits", "vp", "ddim", "convnet")
    assert q.sampler["eta"] == 1.0 and q.sampler["steps"] == 100
    assert q.train.n_steps == 2500 and q.train.lr_schedule == "cosine" and q.data.noise_mixture_prob == 0
    assert q.eval.n_samples == 300 and q.eval.fd
    old = C.to_run(C.validate(make("train", ["experiment=quickstart_mlp"])))
    assert old.net["name"] == "mlp" and old.train.n_steps == 3000 and old.train.select_metric == "val_loss"
    assert old.data.noise_mixture_prob == 0.2
    ddpm = C.to_run(C.validate(make("train", ["experiment=cifar10_ddpm"])))
    assert ddpm.loss["continuous"] is False and ddpm.sampler["predictor"] == "ancestral"
    ve = C.to_run(C.validate(make("train", ["experiment=cifar10_ncsnpp_ve"])))
    assert ve.sde["name"] == "ve" and ve.train.ema_rate == 0.999


@pytest.mark.parametrize("model", ["unet_tiny", "mlp", "oracle"])
def test_presets_compose_with_any_model_group(hydra_ctx, model):
    """``experiment=quickstart model=unet_tiny`` failed with "Key 'hidden' not in 'UNetModelConfig'"."""
    ov = ["experiment=quickstart", f"model={model}"] + (["data=gmm"] if model == "oracle" else [])
    r = C.to_run(C.validate(make("train", ov)))
    assert (r.net or {"name": "oracle"})["name"] == {"unet_tiny": "unet"}.get(model, model)


def test_sample_nll_compare_apps_compose(hydra_ctx):
    s = C.to_run(C.validate(make("sample", ["ckpt=/some/run", "sampler=heun"])))
    assert s.ckpt == "/some/run" and s.sampler["method"] == "heun"
    n = C.validate(make("nll", ["ckpt=/some/run", "eval.splits=[val,test]"]))
    assert n.eval.splits == ["val", "test"]
    c = C.to_run(C.validate(make("compare", ["experiment=ddpm_vs_sde"])))
    assert c.compare.variants == ["ddpm", "vp", "subvp", "ve"]
    assert set(c.compare.samplers) == {"ancestral", "pc", "ode", "fast", "heun"}
    e = C.to_run(C.validate(make("export", ["ckpt=/some/run", "format=safetensors"])))
    assert (type(e).__name__, e.format, e.opset) == ("ExportOptions", "safetensors", 17)
    d = C.to_run(C.validate(make("distill", ["method=consistency_distillation"])))
    assert (type(d).__name__, d.method, d.final_steps) == ("DistillOptions", "consistency_distillation", 1)


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
        ("train.n_steps=1.5", r"train\.n_steps"),
        ("sampler.eta=0.5", r"sampler\.eta"),  # eta is not a key of the ode sampler
    ],
)
def test_composition_errors_name_the_field(hydra_ctx, override, pattern):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError), match=pattern):
        make("train", [override])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.lr=-1e-3"], "train.lr"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.ema_rate=1.0"], "train.ema_rate"),
        (["train.importance_sampling=true"], "train.importance_sampling"),
        (["train.patience=2"], "train.patience"),
        (["sde.beta_min=25"], "sde.beta_min"),
        (["sde=ve", "sde.sigma_min=60"], "sde.sigma_min"),
        (["sde.N=0"], "sde.N"),
        (["sde.N=20"], "sde.N"),
        (["sde.schedule=quadratic"], "sde.schedule"),
        (["sde.beta_max=-1"], "sde.beta_max"),
        (["sde=subvp", "sde.N=0"], "sde.N"),
        (["sde=ve", "sde.sigma_max=-2"], "sde.sigma_max"),
        (["train.n_steps=-1"], "train.n_steps"),
        (["train.warmup=-1"], "train.warmup"),
        (["train.beta2=1.0"], "train.beta2"),
        (["train.lr_schedule=step"], "train.lr_schedule"),
        (["train.weighting=sigma"], "train.weighting"),
        (["model.dropout=1.5"], "model.dropout"),
        (["model.hidden=0"], "model.hidden"),
        (["model.parameterization=v"], "model.parameterization"),
        (["model.parameterization=sigma_scaled"], "model.parameterization"),  # needs a VE SDE
        (["sampler=pc", "sampler.snr=0"], "sampler.snr"),
        (["sampler=pc", "sampler.predictor=leapfrog"], "sampler.predictor"),
        (["sampler=pc", "sampler.corrector=mala"], "sampler.corrector"),
        (["sampler=ddim", "sampler.eta=2"], "sampler.eta"),
        (["sampler.steps=10"], "sampler.steps"),  # the adaptive ODE solver picks its steps
        (["sampler=dpm_solver", "sampler.order=4"], "sampler.order"),
        (["sampler.error_norm=l2"], "sampler.error_norm"),
        (["sampler=heun", "sampler.rho=0"], "sampler.rho"),
        (["eval.splits=[train,dev]"], "eval.splits"),
        (["eval.divergence=trace"], "eval.divergence"),
        (["eval.rtol=0"], "eval.rtol"),
        (["eval.divergence=exact", "eval.probes=2"], "eval.probes"),
        (["data.name=imagenet"], "data.name"),
        (["data.noise_mixture_prob=1.5"], "data.noise_mixture_prob"),
        (["data.noise_mixture_std_min=0.5"], "data.noise_mixture_std_min"),
        (["device=tpu"], "device"),
        (["dtype=float16"], "dtype"),
    ],
)
def test_range_errors_name_the_field(hydra_ctx, overrides, key):
    with pytest.raises(C.ConfigError, match=re.escape(key)):
        C.validate(make("train", overrides))


@pytest.mark.parametrize(
    "overrides, key, check",
    [
        (["sde.beta_min=25"], "sde.beta_min", lambda: VPSDE(beta_min=25)),
        (["train.lr=-1e-3"], "train.lr", lambda: TrainOptions(lr=-1e-3)),
        (["sampler=heun", "sampler.rho=0"], "sampler.rho", lambda: samplers.check_method_options("heun", {"rho": 0.0})),
        (["sampler=ddim", "sde=ve"], "sampler.method", lambda: samplers.check_sample_options(VESDE(), "ddim")),
        (["model=oracle", "data=digits"], "data=gmm", None),
        (["sde=subvp", "train.continuous=false"], "continuous", lambda: build.build_model(
            build.model_spec(SubVPSDE(), "mlp", {}, (2,), continuous=False))),
    ],
)
def test_the_library_rule_is_the_config_rule(hydra_ctx, overrides, key, check):
    """Validation builds the library objects: the config reports the library's own message under the config key."""
    with pytest.raises(C.ConfigError, match=re.escape(key)) as config_err:
        C.validate(make("train", overrides))
    if check is not None:
        with pytest.raises(ValueError) as library_err:
            check()
        plain = re.sub(r"\b(sde|train|sampler|model|eval)\.", "", str(config_err.value))
        assert plain == str(library_err.value)


def test_compare_config_errors(hydra_ctx):
    with pytest.raises(C.ConfigError, match=r"compare\.variants"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.variants=[ddpm,ncsn]"]))
    with pytest.raises(C.ConfigError, match=r"stepz"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "+compare.samplers.fast.stepz=3"]))
    with pytest.raises(C.ConfigError, match=r"rtol"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.samplers.ode.rtol=-1"]))
    with pytest.raises(C.ConfigError, match=r"beta_min"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "+compare.sde_overrides.ve.beta_min=0.1"]))
    with pytest.raises(C.ConfigError, match=r"sigma_min"):
        C.validate(make("compare", ["experiment=ddpm_vs_sde", "compare.sde_overrides.ve.sigma_min=20.0"]))


# ------------------------------------------------------------------------------------------------
# plain objects
# ------------------------------------------------------------------------------------------------
def test_run_config_builds_the_library_objects(hydra_ctx):
    r = C.to_run(C.validate(make("train", ["sde=vp", "sde.beta_max=12.5", "sde.N=100", "data=digits", "model=unet_tiny",
                                           "model.ch=8", "train.n_steps=7", "train.checkpoint_every=3", "train.grad_clip=null"])))
    assert isinstance(r, RunConfig)
    sde = build.build_sde(r.sde["name"], **r.sde["kwargs"])
    assert isinstance(sde, VPSDE) and (sde.beta_min, sde.beta_max, sde.N, sde.schedule) == (0.1, 12.5, 100, "linear")
    assert (r.train.n_steps, r.train.checkpoint_every, r.train.grad_clip) == (7, 3, None)
    model = build.build_model(build.model_spec(sde, r.net["name"], r.net["kwargs"], (1, 8, 8)))
    assert model.parameterization == "eps" and type(model.net).__name__ == "UNet" and model.net.ch_mult == (1, 2)
    x = torch.randn(3, 1, 8, 8)
    assert model.score_fn(x, torch.full((3,), 0.5)).shape == x.shape
    ve = C.to_run(C.validate(make("train", ["sde=ve", "sde.sigma_max=7.0"])))
    assert build.build_sde(ve.sde["name"], **ve.sde["kwargs"]).prior_std == 7.0 and ve.parameterization is None
    assert build.default_parameterization(VESDE()) == "sigma_scaled"


@pytest.mark.parametrize("opt", options("sampler"))
def test_every_sampler_config_is_accepted_by_the_library(hydra_ctx, opt):
    """The sampler configs' keys are exactly options of ``scoresde.sample`` (checked on the oracle)."""
    from scoresde.data import default_gmm

    sde_name = "ve" if opt == "langevin" else "vp"
    ov = [f"sampler={opt}", f"sde={sde_name}", "sde.N=30"]
    if opt in ("ddim", "dpm_solver", "heun"):
        ov.append("sampler.steps=4")
    if opt == "ode":
        ov += ["sampler.rtol=1e-3", "sampler.atol=1e-3"]
    if opt == "langevin":
        ov += ["sampler.steps=5", "sampler.n_steps=1"]
    r = C.to_run(C.validate(make("train", ov)))
    sde = build.build_sde(r.sde["name"], **r.sde["kwargs"])
    kw = dict(r.sampler)
    res = samplers.sample(default_gmm(2).score_fn(sde), sde, (8, 2), method=kw.pop("method"),
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64, **kw)
    assert res.x.shape == (8, 2) and torch.isfinite(res.x).all() and res.nfe >= 1


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
