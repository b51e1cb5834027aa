"""diffusers' documented scheduler contract, driven on every score_toolkit scheduler and, as controls, on
diffusers' own DDPMScheduler, DPMSolverMultistepScheduler and EulerAncestralDiscreteScheduler: save/load round
trip with identical step outputs, from_config both ways, shapes, return_dict=False, set_timesteps idempotence,
custom timesteps, generator determinism (single and per sample), fp16/bf16, a full loop and loops that start
mid-schedule (img2img strengths 0.3 / 0.6 / 0.9), checked against the exact moments of Gaussian data."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

from score_toolkit import diffusers_schedulers as ds
from score_toolkit.processes import DiscreteVP

# an SD-like table with few entries (fast) and a v-free epsilon model
BASE = dict(num_train_timesteps=200, beta_start=0.00085 * 5, beta_end=0.012 * 5, beta_schedule="scaled_linear")
OURS = [ds.ScoreAncestralScheduler, ds.ScoreEulerMaruyamaScheduler, ds.ScoreDPMSolverScheduler]
CONTROLS = [DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler]
ALL = OURS + CONTROLS
STOCHASTIC = {ds.ScoreAncestralScheduler, ds.ScoreEulerMaruyamaScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler}
MEAN, VAR = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([0.05, 0.02], dtype=torch.float64)


def make(cls, **extra):
    cfg = dict(BASE, **extra)
    if cls is DDPMScheduler:
        cfg.setdefault("clip_sample", False)  # diffusers' default clamps x0 to [-1, 1]
    return cls(**cfg)


class GaussianEps:
    """The exact epsilon prediction for N(MEAN, diag(VAR)) data on the table, at any (fractional) table index:
    a perfect network."""

    def __init__(self):
        self.process = DiscreteVP(**{k: BASE[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                        "beta_schedule")})

    def __call__(self, x, timestep):
        t = (torch.as_tensor(timestep, dtype=torch.float64).reshape(-1) + 1) / BASE["num_train_timesteps"]
        t = self.process.clamp_t(t)
        alpha, sigma = self.process.marginal(t)
        xd = x.to(torch.float64)
        score = -(xd - alpha * MEAN) / (alpha**2 * VAR + sigma**2)
        return (-sigma * score).to(x.dtype)


def loop(sched, x, model, timesteps, generator=None):
    for t in timesteps:
        inp = sched.scale_model_input(x, t)
        x = sched.step(model(inp, t), t, x, generator=generator).prev_sample
    return x


def img2img(sched, x0, strength, n, generator, model):
    """What StableDiffusionImg2ImgPipeline does with a scheduler (get_timesteps, set_begin_index, add_noise)."""
    sched.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x = sched.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    return loop(sched, x, model, timesteps, generator)


def step_once(sched, shape=(4, 2), seed=0, dtype=torch.float32, n=8, generator="one"):
    sched.set_timesteps(n)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(100)).to(dtype)
    out = torch.randn(shape, generator=torch.Generator().manual_seed(101)).to(dtype)
    gen = ([torch.Generator().manual_seed(seed + i) for i in range(shape[0])] if generator == "list"
           else torch.Generator().manual_seed(seed))
    t = sched.timesteps[1]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(1)
    return sched.step(out, t, x, generator=gen)


# ------------------------------------------------------------------------------------ config contract
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_save_load_round_trip_gives_identical_step_outputs(tmp_path, cls):
    sched = make(cls)
    sched.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert dict(again.config) == dict(sched.config) or {k: v for k, v in again.config.items() if k != "_use_default_values"} == {
        k: v for k, v in sched.config.items() if k != "_use_default_values"}
    a, b = step_once(sched), step_once(again)
    assert torch.equal(a.prev_sample, b.prev_sample)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_from_config_both_ways_keeps_every_value(cls):
    """diffusers' test_compatibles: to every scheduler in ``compatibles`` and back, the config is unchanged, and
    the outputs are identical."""
    sched = make(cls)
    comps = sched.compatibles
    assert set(OURS) <= set(comps) and DPMSolverMultistepScheduler in comps
    for other in comps:
        there = other.from_config(sched.config)
        back = cls.from_config(there.config)
        kept = {k: v for k, v in back.config.items() if k in sched.config and k != "_use_default_values"}
        assert kept == {k: v for k, v in sched.config.items() if k != "_use_default_values"}, other.__name__
        init_keys = set(inspect.signature(cls.__init__).parameters)
        assert not ({k for k in back.config if k not in sched.config} & init_keys), other.__name__
        assert torch.equal(step_once(back).prev_sample, step_once(make(cls)).prev_sample), other.__name__


@pytest.mark.parametrize("cls", CONTROLS, ids=lambda c: c.__name__)
def test_from_config_of_a_diffusers_scheduler_and_back(cls):
    """A diffusers scheduler -> each of ours -> back: the diffusers config is unchanged and its outputs identical."""
    src = make(cls)
    for ours in OURS:
        mid = ours.from_config(src.config)
        back = cls.from_config(mid.config)
        init_keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
        assert {k: back.config[k] for k in init_keys} == {k: src.config[k] for k in init_keys}, ours.__name__
        assert torch.equal(step_once(back).prev_sample, step_once(make(cls)).prev_sample)


def test_compatibles_are_exactly_the_round_trips():
    """``compatibles`` lists the diffusers schedulers whose round trip keeps every value, per config family."""
    from diffusers import ScoreSdeVeScheduler

    vp = ds.ScoreAncestralScheduler(**BASE)
    ve = ds.ScoreAncestralScheduler.from_config(ScoreSdeVeScheduler(sigma_max=5.0).config)
    proc = ds.ScoreAncestralScheduler(process={"_class_name": "VPSDE"}, prediction_type="epsilon", time_input="t")
    assert ScoreSdeVeScheduler not in vp.compatibles and ScoreSdeVeScheduler in ve.compatibles
    assert DDPMScheduler not in ve.compatibles and DDPMScheduler not in proc.compatibles
    for sched in (vp, ve):
        for other in sched.compatibles:
            back = type(sched).from_config(other.from_config(sched.config).config)
            assert back.process == sched.process and back.prediction_type == sched.prediction_type, other.__name__
    # and the ones left out really do not round-trip: a VP config through ScoreSdeVeScheduler comes back VE, a VE
    # config through DDPMScheduler cannot be read back
    back = ds.ScoreAncestralScheduler.from_config(ScoreSdeVeScheduler.from_config(vp.config).config)
    assert back.process != vp.process
    with pytest.raises(ValueError, match="sigma_min/sigma_max"):
        ds.ScoreAncestralScheduler.from_config(DDPMScheduler.from_config(ve.config).config)


# ------------------------------------------------------------------------------------ step contract
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("shape", [(4, 2), (2, 3, 4, 4)])
def test_step_shapes_and_return_dict(cls, shape):
    a = step_once(make(cls), shape)
    assert a.prev_sample.shape == shape
    sched = make(cls)
    b = step_once(sched, shape)
    sched.set_timesteps(8)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(100))
    out = torch.randn(shape, generator=torch.Generator().manual_seed(101))
    tup = sched.step(out, sched.timesteps[1], x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], b.prev_sample)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_set_timesteps_is_idempotent(cls):
    sched = make(cls)
    sched.set_timesteps(7)
    first = sched.timesteps.clone()
    x1 = loop(sched, torch.ones(3, 2), GaussianEps(), sched.timesteps, torch.Generator().manual_seed(0))
    sched.set_timesteps(7)
    sched.set_timesteps(7)
    assert torch.equal(sched.timesteps, first)
    assert getattr(sched, "step_index", None) is None
    x2 = loop(sched, torch.ones(3, 2), GaussianEps(), sched.timesteps, torch.Generator().manual_seed(0))
    assert torch.equal(x1, x2)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_custom_timesteps(cls):
    if "timesteps" not in inspect.signature(cls.set_timesteps).parameters:
        pytest.skip(f"{cls.__name__}.set_timesteps has no timesteps argument (retrieve_timesteps refuses it too)")
    sched = make(cls)
    custom = [180, 120, 60, 20, 5]
    sched.set_timesteps(timesteps=custom)
    assert sched.timesteps.tolist() == custom
    x = loop(sched, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), GaussianEps(), sched.timesteps,
             torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    if cls in OURS:
        with pytest.raises(ValueError, match="decreasing"):
            sched.set_timesteps(timesteps=[5, 20])


def test_custom_sigmas_on_ours():
    """``sigmas=`` (k-diffusion's noise-to-signal ratios, with the final one) as EulerDiscreteScheduler takes them."""
    from diffusers import EulerDiscreteScheduler

    theirs = EulerDiscreteScheduler(**BASE)
    sig = sorted((float(s) for s in theirs.sigmas[[150, 100, 40, 10]]), reverse=True) + [0.0]
    theirs.set_timesteps(sigmas=sig)
    ours = ds.ScoreDPMSolverScheduler(**BASE)
    ours.set_timesteps(sigmas=sig)
    assert torch.allclose(ours.sigmas, theirs.sigmas, rtol=1e-5)
    assert torch.allclose(ours.timesteps, theirs.timesteps.float(), atol=1e-3)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_generator_determinism_single_and_per_sample(cls):
    a, b = step_once(make(cls), seed=0), step_once(make(cls), seed=0)
    c = step_once(make(cls), seed=1)
    assert torch.equal(a.prev_sample, b.prev_sample)
    assert torch.equal(a.prev_sample, c.prev_sample) != (cls in STOCHASTIC)
    full = step_once(make(cls), shape=(4, 2), generator="list").prev_sample
    again = step_once(make(cls), shape=(4, 2), generator="list").prev_sample
    assert torch.equal(full, again)
    if cls in STOCHASTIC:  # per-sample generators: sample i's noise comes from generator i only
        other = step_once(make(cls), shape=(4, 2), seed=7, generator="list").prev_sample
        assert not torch.equal(full[0], other[0])


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps(cls, dtype):
    ref = step_once(make(cls), dtype=torch.float32).prev_sample
    half = step_once(make(cls), dtype=dtype).prev_sample
    assert half.dtype == dtype and half.shape == ref.shape
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    assert torch.allclose(half.float(), ref, atol=tol * (1 + ref.abs().max().item()), rtol=0)


# ------------------------------------------------------------------------------------ loops against exact moments
def _ends_denoised(sched) -> bool:
    """Whether the loop's last step returns the denoised sample (diffusers' final sigma 0 / alpha 1), or ends at
    the first table entry (our default ``final_sigmas_type="sigma_min"``)."""
    return not ds.is_score_scheduler(sched) or sched.config.final_sigmas_type == "zero"


def _expected(sched):
    """The exact law after the loop, given an exact law before the last step: with final sigma 0 the last step
    returns E[x_0 | x_t] at the last timestep, N(m, a^2 v^2 / (a^2 v + s^2)); else the marginal at t_min."""
    proc = GaussianEps().process
    if _ends_denoised(sched):
        t = (float(sched.timesteps[-1]) + 1) / BASE["num_train_timesteps"]
        a, s = (float(v) for v in proc.marginal(torch.tensor(t, dtype=torch.float64)))
        return MEAN, a**2 * VAR**2 / (a**2 * VAR + s**2)
    a, s = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=torch.float64)))
    return a * MEAN, a**2 * VAR + s**2


def _moments_ok(x, sched, label):
    mean, var = _expected(sched)
    x = x.to(torch.float64)
    n = x.shape[0]
    se = (var / n).sqrt()
    assert torch.isfinite(x).all(), label
    assert ((x.mean(0) - mean).abs() < 5 * se + 0.01).all(), (label, x.mean(0), mean)
    assert ((x.var(0) / var - 1).abs() < 5 * (2 / n) ** 0.5 + 0.05).all(), (label, x.var(0), var)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_full_loop_samples_the_data(cls):
    sched = make(cls)
    n_steps = 200 if cls in STOCHASTIC else 20  # stochastic samplers lose variance on coarse grids
    sched.set_timesteps(n_steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64) * sched.init_noise_sigma
    _moments_ok(loop(sched, x, GaussianEps(), sched.timesteps, g), sched, cls.__name__)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
def test_mid_schedule_starts_sample_the_data(cls, strength):
    """SDEdit / img2img from data samples: noising to timesteps[t_start] and denoising from there returns the
    data distribution (exact model), at every solver order."""
    n_steps = 200 if cls in STOCHASTIC else 15
    g = torch.Generator().manual_seed(1)
    x0 = MEAN + VAR.sqrt() * torch.randn(2000, 2, generator=g, dtype=torch.float64)
    orders = [1, 2, 3] if cls in (ds.ScoreDPMSolverScheduler, DPMSolverMultistepScheduler) else [None]
    for order in orders:
        sched = make(cls, **({"solver_order": order} if order else {}))
        out = img2img(sched, x0, strength, n_steps, g, GaussianEps())
        _moments_ok(out, sched, f"{cls.__name__} order {order}")


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9, 1.0])
def test_ours_matches_diffusers_dpm_solver_mid_schedule(order, strength):
    """Same config, same noise: ScoreDPMSolverScheduler with DPMSolverMultistepScheduler's settings gives its
    img2img result (its coefficients in float32 vs ours in float64: 1e-5)."""
    cfg = DPMSolverMultistepScheduler(**BASE, solver_order=order, timestep_spacing="linspace",
                                      final_sigmas_type="zero", solver_type="midpoint").config
    theirs, ours = DPMSolverMultistepScheduler.from_config(cfg), ds.ScoreDPMSolverScheduler.from_config(cfg)
    x0 = MEAN + VAR.sqrt() * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = img2img(theirs, x0.float(), strength, 10, torch.Generator().manual_seed(4), GaussianEps())
    b = img2img(ours, x0.float(), strength, 10, torch.Generator().manual_seed(4), GaussianEps())
    assert torch.equal(ours.timesteps, theirs.timesteps.float())
    tol = 1e-5 if order < 3 else 1e-3  # 3M: diffusers weights the second difference by phi_3, ours exactly (1.4e-4)
    assert (a - b).abs().max() < tol, (a - b).abs().max()
    assert math.isfinite(float(b.abs().max()))


# ------------------------------------------------------------------------------------ diffusers' settings: mapped or warned
def _diffusers_scheduler_classes():
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    names = {e.name for e in KarrasDiffusionSchedulers} | {
        "ScoreSdeVeScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler", "TCDScheduler", "LCMScheduler",
        "EDMEulerScheduler", "SASolverScheduler", "DDIMInverseScheduler", "DPMSolverSDEScheduler"}
    return [getattr(diffusers, n) for n in sorted(names) if hasattr(diffusers, n)]


def test_every_diffusers_setting_is_classified():
    keys = set()
    for cls in _diffusers_scheduler_classes():
        keys |= set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    assert keys - set(ds.DIFFUSERS_KNOBS) == set()


def _warned(cls, **cfg):
    import warnings

    src = dict(BASE, **cfg)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        sched = cls.from_config(src)
    return sched, [str(w.message) for w in rec if issubclass(w.category, ds.SchedulerConfigWarning)]


# (setting, a value that changes diffusers' sampling, the settings named with it)
WARNED = [(k, v) for k, v in [
    ("thresholding", True), ("clip_sample", True), ("use_beta_sigmas", True), ("use_flow_sigmas", True),
    ("flow_shift", 3.0), ("use_dynamic_shifting", True), ("shift_terminal", 0.1), ("skip_prk_steps", False),
    ("predictor_order", 3), ("corrector_order", 1), ("disable_corrector", [0]), ("solver_p", "x"),
    ("predict_x0", False), ("tau_func", "x"), ("noise_sampler_seed", 3), ("snr", 0.16), ("correct_steps", 2),
    ("interpolation_type", "log_linear"), ("timestep_scaling", 5.0), ("original_inference_steps", 30),
    ("sigma_data", 1.0), ("sigma_schedule", "exponential")]]
CHILDREN = {"thresholding": {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0},
            "clip_sample": {"clip_sample_range": 2.0}, "use_dynamic_shifting": {"time_shift_type": "linear"}}


def test_the_warned_list_is_the_table():
    warned = {k for k, v in ds.DIFFUSERS_KNOBS.items() if v == "warned"}
    children = {c for d in CHILDREN.values() for c in d}
    assert warned == {k for k, _ in WARNED} | children


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("key, value", WARNED)
def test_settings_not_applied_are_warned_about_by_name(cls, key, value):
    extra = CHILDREN.get(key, {})
    sched, msgs = _warned(cls, **{key: value}, **extra)
    assert any(f"{key}={value!r}" in m for m in msgs), msgs
    for child, v in extra.items():
        assert any(f"{child}={v!r}" in m for m in msgs), msgs
        _, quiet = _warned(cls, **{child: v})  # alone, a child setting changes nothing
        assert quiet == []
    assert sched.config[key] == value  # kept in the config
    _, quiet = _warned(cls)  # the defaults say nothing
    assert quiet == []


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_setting_warnings_name_the_callers_line(cls, tmp_path):
    """A warned setting names the line that made the scheduler, through ``from_config`` (diffusers' wrapper) or the
    constructor, not a line inside score_toolkit or diffusers."""
    import warnings

    # a setting each scheduler warns about, through the constructor and through from_config
    key, value = ("algorithm_type", "sde-dpmsolver++") if cls is ds.ScoreDPMSolverScheduler else \
        ("variance_type", "learned_range")
    made = [lambda: cls.from_config(dict(BASE, thresholding=True)), lambda: cls(**BASE, **{key: value}),
            lambda: cls.from_config(dict(BASE, **{key: value}))]
    cls.from_config(dict(BASE)).save_config(tmp_path)  # a folder whose config has the setting: from_pretrained
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**config, key: value}))
    made.append(lambda: cls.from_pretrained(tmp_path))  # through diffusers' and huggingface_hub's wrappers
    if cls is not ds.ScoreDPMSolverScheduler:
        made.append(lambda: cls.from_config(dict(BASE, solver_order=3)))
    for make in made:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            make()
        where = {w.filename for w in rec if issubclass(w.category, ds.SchedulerConfigWarning)}
        assert where == {__file__}, where


@pytest.mark.parametrize("key, value", [("solver_order", 3), ("euler_at_final", True), ("solver_type", "bogus"),
                                        ("algorithm_type", "sde-dpmsolver++"), ("lambda_min_clipped", -5.1)])
def test_multistep_settings_are_warned_about_by_the_single_step_schedulers(key, value):
    for cls in (ds.ScoreAncestralScheduler, ds.ScoreEulerMaruyamaScheduler):
        _, msgs = _warned(cls, **{key: value})
        assert any(key in m for m in msgs), (cls, msgs)


def test_dpm_settings_are_mapped_or_warned():
    _, msgs = _warned(ds.ScoreDPMSolverScheduler, algorithm_type="sde-dpmsolver++")
    assert any("algorithm_type='sde-dpmsolver++'" in m for m in msgs)
    # lambda_min_clipped clips timestep_spacing's indices: on another grid it was ignored without a word
    for grid in ({}, {"use_karras_sigmas": True}, {"timestep_spacing": "linspace", "use_lu_lambdas": True}):
        _, msgs = _warned(ds.ScoreDPMSolverScheduler, lambda_min_clipped=-2.0, **grid)
        assert any("lambda_min_clipped=-2.0 on a grid not built from timestep_spacing" in m for m in msgs), (grid, msgs)
    assert _warned(ds.ScoreDPMSolverScheduler, lambda_min_clipped=-2.0, timestep_spacing="linspace")[1] == []
    assert _warned(ds.ScoreDPMSolverScheduler, lambda_min_clipped=-math.inf)[1] == []
    with pytest.raises(TypeError, match="'lambda_min_clipped': expected a number, found nan"):
        ds.ScoreDPMSolverScheduler(lambda_min_clipped=math.nan)
    for value in ("deis", "data_prediction"):
        assert _warned(ds.ScoreDPMSolverScheduler, algorithm_type=value)[1] == []
    # euler_at_final: the last step is first order; lower_order_final off: full order to the end
    x, out = torch.randn(4, 2), torch.randn(4, 2)

    def last_step(**cfg):
        sched = ds.ScoreDPMSolverScheduler(**BASE, lower_order_final=False, **cfg)
        sched.set_timesteps(20)
        for t in sched.timesteps[:-1]:
            sched.step(out, t, x)
        return sched.step(out, sched.timesteps[-1], x).prev_sample

    first = ds.ScoreDPMSolverScheduler(**BASE, solver_order=1)
    first.set_timesteps(20)
    first.set_begin_index(19)
    ref = first.step(out, first.timesteps[-1], x).prev_sample
    assert torch.equal(last_step(euler_at_final=True), ref)
    assert not torch.allclose(last_step(), ref)
    # solver_type: heun and midpoint differ at order 2 only; logrho (UniPC) reads as midpoint
    a = ds.ScoreDPMSolverScheduler(**BASE, solver_type="midpoint")
    b = ds.ScoreDPMSolverScheduler(**BASE, solver_type="logrho")
    c = ds.ScoreDPMSolverScheduler(**BASE)
    ra, rb, rc = (img2img(s, x, 0.6, 10, torch.Generator().manual_seed(0), GaussianEps()) for s in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    # lambda_min_clipped: with timestep_spacing, the schedule stops where the log-SNR is clipped
    clipped = ds.ScoreDPMSolverScheduler(**BASE, timestep_spacing="linspace", lambda_min_clipped=-2.0)
    theirs = DPMSolverMultistepScheduler(**BASE, timestep_spacing="linspace", lambda_min_clipped=-2.0)
    clipped.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(clipped.timesteps, theirs.timesteps.float()) and clipped.timesteps[0] < 199


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timestep_spacing_and_steps_offset_are_diffusers_indices(spacing, offset):
    for ours, theirs in ((ds.ScoreAncestralScheduler, DDPMScheduler), (ds.ScoreEulerMaruyamaScheduler, DDPMScheduler),
                         (ds.ScoreDPMSolverScheduler, DPMSolverMultistepScheduler)):
        a = ours(**BASE, timestep_spacing=spacing, steps_offset=offset)
        b = theirs(**BASE, timestep_spacing=spacing, steps_offset=offset)
        a.set_timesteps(9)
        b.set_timesteps(9)
        assert torch.equal(a.timesteps, b.timesteps.float()), (ours.__name__, a.timesteps, b.timesteps)


def test_final_sigmas_type_and_set_alpha_to_one():
    from diffusers import DDIMScheduler

    x, out = torch.randn(4, 2), torch.randn(4, 2)
    for cls in OURS:
        zero = make(cls, final_sigmas_type="zero")
        zero.set_timesteps(5)
        zero.set_begin_index(4)
        res = zero.step(out, zero.timesteps[-1], x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(res.prev_sample, res.pred_original_sample)  # the last step returns the denoised sample
        assert float(zero.sigmas[-1]) == 0.0 and float(zero.time_grid[-1]) == 0.0
        low = make(cls)
        low.set_timesteps(5)
        assert float(low.sigmas[-1]) == pytest.approx(float(low.process.noise_to_signal(low.process.t_min)), rel=1e-5)
        for flag, final in ((True, "zero"), (False, "sigma_min")):
            sched = cls.from_config(DDIMScheduler(**BASE, set_alpha_to_one=flag).config)
            assert sched.config.final_sigmas_type == final


@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas"])
def test_sigma_grid_settings_are_diffusers_sigma_grids(key):
    """The n evaluation sigmas are diffusers' (its timesteps are those sigmas' times rounded to integers; ours
    keep the exact times)."""
    theirs = make(DPMSolverMultistepScheduler, **{key: True})
    theirs.set_timesteps(8)
    for cls in OURS:
        ours = make(cls, **{key: True})
        ours.set_timesteps(8)
        assert torch.allclose(ours.sigmas[:-1], theirs.sigmas[:-1], rtol=2e-4), (cls.__name__, ours.sigmas)
        plain = make(cls)
        plain.set_timesteps(8)
        assert not torch.allclose(plain.sigmas, ours.sigmas)


def test_variance_type_is_mapped():
    assert ds.ScoreAncestralScheduler.from_config(DDPMScheduler(**BASE, variance_type="fixed_large").config
                                                  ).config.variance == "forward"
    assert ds.ScoreAncestralScheduler.from_config(DDPMScheduler(**BASE, variance_type="fixed_small").config
                                                  ).config.variance == "posterior"
    # learned variance: the prediction is the first half of the channels
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    plain = ds.ScoreDPMSolverScheduler(**BASE)
    learned = ds.ScoreDPMSolverScheduler(**BASE, variance_type="learned_range")
    r = [step_once(s, (2, 3, 4, 4)) for s in (plain,)]
    learned.set_timesteps(8)
    learned.set_begin_index(1)
    x = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(100))
    out = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(101))
    got = learned.step(torch.cat([out, torch.randn_like(out)], 1), learned.timesteps[1], x).prev_sample
    assert torch.equal(got, r[0].prev_sample)
    _, msgs = _warned(ds.ScoreAncestralScheduler, variance_type="learned")
    assert any("variance_type='learned'" in m for m in msgs)


# ------------------------------------------------------------------------------------ zero terminal SNR
ZSNR = dict(num_train_timesteps=200, beta_start=0.00085 * 5, beta_end=0.012 * 5, beta_schedule="scaled_linear",
            rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")


class GaussianV:
    """The exact v prediction for N(MEAN, diag(VAR)) data on the zero-terminal-SNR table (alpha(1) = 0)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, x, timestep):
        t = self.process.clamp_t((torch.as_tensor(timestep, dtype=torch.float64).reshape(-1) + 1)
                                 / ZSNR["num_train_timesteps"])
        alpha, sigma = self.process.marginal(t)
        xd = x.to(torch.float64)
        gain = (xd - alpha * MEAN) / (alpha**2 * VAR + sigma**2)
        x0 = MEAN + alpha * VAR * gain
        eps = sigma * gain
        return (alpha * eps - sigma * x0).to(x.dtype)


def test_zero_terminal_snr_tables_are_a_process_reaching_alpha_zero():
    src = DDPMScheduler(**ZSNR)
    for cls in OURS:
        sched = cls.from_config(src.config)
        assert sched.process.zero_terminal_snr
        assert float(sched.process.alpha(torch.tensor(1.0, dtype=torch.float64))) == 0.0
        assert torch.equal(sched.alphas_cumprod, src.alphas_cumprod)  # diffusers' table, entry for entry
        assert torch.allclose(sched.betas, src.betas, atol=1e-6)
    with pytest.raises(ValueError, match="v_prediction"):
        ds.ScoreDPMSolverScheduler.from_config(DDPMScheduler(**{**ZSNR, "prediction_type": "epsilon"}).config)
    with pytest.raises(ValueError, match="timestep_spacing"):
        ds.ScoreDPMSolverScheduler(**{k: v for k, v in ZSNR.items() if k != "timestep_spacing"}).set_timesteps(5)


@pytest.mark.parametrize("cls", OURS + [DDPMScheduler], ids=lambda c: c.__name__)
def test_zero_terminal_snr_full_loop_from_pure_noise_samples_the_data(cls):
    """From t = 1 (alpha = 0: x_T is pure noise, independent of the data) to the data, with an exact v model."""
    sched = cls.from_config(DDPMScheduler(**ZSNR).config) if cls in OURS else DDPMScheduler(**ZSNR, clip_sample=False)
    proc = ds.ScoreAncestralScheduler.from_config(DDPMScheduler(**ZSNR).config).process
    sched.set_timesteps(200 if cls in STOCHASTIC else 100)  # trailing spacing is coarse at low noise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float32)  # float32: alpha(1) = 0 is found on the grid
    out = loop(sched, x, GaussianV(proc), sched.timesteps, g)
    assert torch.isfinite(out).all()
    out = out.double()
    if _ends_denoised(sched):
        t = (float(sched.timesteps[-1]) + 1) / ZSNR["num_train_timesteps"]
        a, s = (float(v) for v in proc.marginal(torch.tensor(t, dtype=torch.float64)))
        mean, var = MEAN, a**2 * VAR**2 / (a**2 * VAR + s**2)
    else:
        a, s = (float(v) for v in proc.marginal(torch.tensor(proc.t_min, dtype=torch.float64)))
        mean, var = a * MEAN, a**2 * VAR + s**2
    se = (var / 2000).sqrt()
    assert ((out.mean(0) - mean).abs() < 5 * se + 0.01).all(), (out.mean(0), mean)
    assert ((out.var(0) / var - 1).abs() < 5 * (2 / 2000) ** 0.5 + 0.05).all(), (out.var(0), var)


# ------------------------------------------------------------------------------------ ScoreSDEScheduler (no step)
def test_score_sde_scheduler_has_the_contract_except_step(tmp_path):
    """The config carrier of ScorePipeline folders: everything but ``step``, which points to the stepping classes."""
    from score_toolkit.processes import VPSDE
    from score_toolkit.schedulers import ScoreSDEScheduler, scheduler_for

    sched = scheduler_for(VPSDE(), "epsilon", "t")
    assert isinstance(sched, ScoreSDEScheduler)
    sched.set_timesteps(6)
    first = sched.timesteps.clone()
    sched.set_timesteps(6)
    assert torch.equal(sched.timesteps, first) and sched.time_grid[-1] == pytest.approx(1e-3)
    sched.save_pretrained(tmp_path)
    again = ScoreSDEScheduler.from_pretrained(tmp_path)
    again.set_timesteps(6)
    assert torch.equal(again.timesteps, first)
    sched.set_timesteps(timesteps=[0.9, 0.5, 0.1])
    assert sched.timesteps.tolist() == pytest.approx([0.9, 0.5, 0.1])
    sched.set_begin_index(1)
    assert sched.begin_index == 1 and sched.index_for_timestep(sched.timesteps[2]) == 2
    x0, noise = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    a, s = VPSDE().marginal(torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(sched.add_noise(x0, noise, sched.timesteps[1]), a * x0 + s * noise, atol=1e-6)
    assert torch.allclose(sched.get_velocity(x0, noise, sched.timesteps[1]), a * noise - s * x0, atol=1e-6)
    with pytest.raises(TypeError, match="ScoreDPMSolverScheduler.from_config"):
        sched.step(x0, sched.timesteps[0], x0)
    stepping = ds.ScoreDPMSolverScheduler.from_config(sched.config)
    assert stepping.process == sched.process


def test_a_swap_through_dpm_solver_singlestep_keeps_lower_order_final():
    """diffusers' DPMSolverSinglestepScheduler defaults lower_order_final to False, ours to True: a round trip keeps
    the value whether it was set or left at the default (the default stays a default on both sides)."""
    from diffusers import DPMSolverSinglestepScheduler

    for kwargs in ({}, {"lower_order_final": True}, {"lower_order_final": False}):
        ours = ds.ScoreDPMSolverScheduler(**BASE, **kwargs)
        there = DPMSolverSinglestepScheduler.from_config(ours.config)
        back = ds.ScoreDPMSolverScheduler.from_config(there.config)
        assert back.config.lower_order_final == ours.config.lower_order_final, kwargs
        if kwargs:  # an explicit value travels; the default takes each class's own default
            assert there.config.lower_order_final == kwargs["lower_order_final"]
        else:
            assert there.config.lower_order_final is DPMSolverSinglestepScheduler().config.lower_order_final
