"""Fuzzing the public entry points (the UNet's boundary check, schedulers, metrics) with random shapes, dtypes,
labels and timesteps.

The property, for every call: an input with no problem gives a finite result of the right shape; an input
with a problem raises a ValueError from our own guard rails (never a traceback from deep inside torch) whose
message names one of the problems the input really has. Each test builds the input and, beside it, the list
of its problems (a regex for the message that names each); `works_or_refuses` checks the property.
Hypothesis runs derandomized (fixed seeds) and without an example database, so CI is reproducible.
"""
import math
import os
import re
import traceback

import numpy as np
import pytest
import torch

from invdiff_min.config import get_preset
from invdiff_min.metrics import (auroc, bias_score, fairness_discrepancy, fidelity, minority_share,
                                 normalized_mutual_info)
from invdiff_min.scheduler import DDIMScheduler, DDPMScheduler
from invdiff_min.unet import UNet, UNetConfig
from invdiff_min.validate import checked_unet_call

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NAN, INF = float("nan"), float("inf")


def works_or_refuses(call, problems: list[str]):
    """No problem: return call()'s result (the caller checks it). Problems: call() must raise a ValueError (a
    TypeError only for "not a tensor at all") raised in invdiff_min, whose message matches one of `problems`."""
    event("valid input" if not problems else "refused input")       # see pytest --hypothesis-show-statistics
    if not problems:
        return call()
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    err, msg = info.value, str(info.value)
    where = traceback.extract_tb(err.__traceback__)[-1]
    assert f"invdiff_min{os.sep}" in where.filename, f"raised inside {where.filename}:{where.lineno}: {msg}"
    assert isinstance(err, ValueError) or "torch.Tensor" in msg, f"{type(err).__name__}: {msg}"
    assert any(re.search(p, msg) for p in problems), f"message {msg!r} names none of the problems {problems}"
    return None


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.float()).all())


# ----- UNet ------------------------------------------------------------------------------------------------
def _unets():
    torch.manual_seed(0)
    cond = UNet(get_preset("tiny").unet).eval()                      # 2 levels (factor 2), 2 classes + null
    uncond = UNet(UNetConfig(sample_size=8, block_out_channels=(8, 16, 16), attention_levels=(False, True, False),
                             layers_per_block=1, norm_num_groups=4, num_classes=None)).eval()   # factor 4
    half = UNet(get_preset("tiny").unet).eval().half()               # weights in float16
    return {"cond": cond, "uncond": uncond, "half": half}


UNETS = _unets()
FLOATS = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
NOT_FLOATS = [torch.int64, torch.uint8, torch.bool]


def usually(valid, invalid, times: int = 6):
    """Pick from `valid` `times` times as often as from `invalid`, so most draws have at most one problem."""
    return st.sampled_from(list(valid) * times + list(invalid))


@st.composite
def unet_calls(draw):
    """A random UNet call and the problems it has."""
    name = draw(st.sampled_from(sorted(UNETS)))
    model = UNETS[name]
    cfg, w = model.config, model.conv_in.weight
    f = cfg.downsample_factor
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    problems = []

    b = draw(st.integers(0, 3))
    c = draw(usually([cfg.in_channels], [1, 4]))
    side = usually([f, 2 * f, 3 * f], [0, 1, f + 1, 3 * f - 1], times=10)
    h, wd = draw(side), draw(side)
    autocast = draw(st.booleans())
    dtype = draw(usually([w.dtype], FLOATS + NOT_FLOATS, times=12))
    layout = draw(usually(["tensor"], ["no_batch_dim", "numpy"], times=12))
    x = torch.randn(b, c, h, wd, generator=g)
    x = x.to(dtype) if dtype.is_floating_point else (x * 100).clamp(0, 255).to(dtype)
    if layout == "no_batch_dim":
        x = x.reshape(b * c, h, wd)
        problems.append(r"\(B, \d, H, W\)")
    if layout == "numpy":
        x = x.float().numpy()
        problems.append("torch.Tensor")
    if c != cfg.in_channels:
        problems.append(r"\(B, \d, H, W\)")
    if autocast and w.dtype not in (torch.float32, torch.bfloat16):   # autocast to bfloat16 below
        problems.append("under torch.autocast")
    if not dtype.is_floating_point:
        problems.append("floating-point")
    elif dtype != w.dtype and not (autocast and torch.float64 not in (dtype, w.dtype)):
        problems.append("weights are")
    if h % f or wd % f or 0 in (h, wd):
        problems.append("divisible by")

    kind = draw(usually(["int", "float", "0d", "vec", "vec_float", "list"], ["wrong_len", "column", "bool", "str"]))
    tval = draw(st.one_of(st.integers(0, 1200), st.integers(0, 1200), st.sampled_from([-1, -3])))
    fval = draw(st.one_of(st.floats(0, 1e4), st.floats(0, 1e4), st.sampled_from([-0.5, NAN, INF, -INF])))
    values = draw(st.lists(st.integers(0, 1200), min_size=b, max_size=b))
    if values and draw(usually([False], [True])):
        values[0] = -1
    t = {"int": tval, "float": fval, "0d": torch.tensor(tval), "vec": torch.tensor(values, dtype=torch.long),
         "vec_float": torch.tensor(values, dtype=torch.float32), "list": values,
         "wrong_len": torch.arange(b + 1), "column": torch.zeros(b, 1, dtype=torch.long),
         "bool": torch.ones(b, dtype=torch.bool), "str": "10"}[kind]
    given_values = {"int": [tval], "0d": [tval], "float": [fval], "vec": values, "vec_float": values,
                    "list": values}.get(kind, [])
    if any(not (math.isfinite(v) and v >= 0) for v in given_values):
        problems.append("finite and >= 0")
    problems += {"wrong_len": ["one timestep per sample"], "column": ["one timestep per sample"],
                 "bool": ["real numbers"], "str": ["t must be"]}.get(kind, [])

    labels = ["none", "vec", "list"] if cfg.num_classes else ["none"]
    ykind = draw(usually(labels, ["vec", "float", "bool", "wrong_len", "scalar"], times=12))
    y_values = [draw(st.integers(0, cfg.num_classes or 0)) for _ in range(b)]
    if y_values and draw(usually([False], [True])):
        y_values[0] = draw(st.sampled_from([-1, -2, (cfg.num_classes or 0) + 1]))
    y = {"none": None, "vec": torch.tensor(y_values, dtype=torch.long), "list": y_values,
         "float": torch.zeros(b), "bool": torch.zeros(b, dtype=torch.bool),
         "wrong_len": torch.zeros(b + 1, dtype=torch.long), "scalar": 1}[ykind]
    if y is not None and cfg.num_classes is None:
        problems.append("unconditional")
    elif ykind in ("float", "bool", "wrong_len", "scalar") or (ykind == "list" and b == 0):
        problems.append("labels must be")                  # an empty Python list becomes a float tensor
    elif ykind in ("vec", "list") and any(v < 0 or v > cfg.num_classes for v in y_values):
        problems.append("label out of range")

    ekind = draw(usually(["none"], ["per_sample", "broadcast", "wrong_dim", "float64"], times=4))
    d = model.time_embedding.linear_2.out_features
    shape = {"none": None, "per_sample": (b, d), "broadcast": (1, d), "wrong_dim": (b, d + 1), "float64": (b, d)}
    cond_emb = None if ekind == "none" else torch.randn(*shape[ekind], generator=g)
    if cond_emb is not None:
        cond_emb = cond_emb.to(torch.float64 if ekind == "float64" else w.dtype)
    if ekind == "wrong_dim":
        problems.append("cond_emb")
    if cond_emb is not None and cond_emb.dtype != w.dtype and not (autocast and torch.float64 not in
                                                                     (cond_emb.dtype, w.dtype)):
        problems.append("cond_emb")
    return name, x, t, y, cond_emb, autocast, problems


@FUZZ
@given(unet_calls())
def test_unet_fuzz_works_or_names_the_problem(call):
    name, x, t, y, cond_emb, autocast, problems = call
    model = UNETS[name]

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return checked_unet_call(model, x, t, y, cond_emb)

    out = works_or_refuses(run, problems)
    if out is not None:
        assert out.shape == (x.shape[0], model.config.out_channels, *x.shape[2:])
        assert finite(out), "finite input gave a NaN/inf output"


def test_unet_keeps_accepting_sensible_inputs():
    """Things that worked before the guard rails still work: half weights with half input, float16 input
    under autocast, float timesteps, python lists for t and y, an empty batch."""
    cond, half = UNETS["cond"], UNETS["half"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert half(x.half(), 3).dtype == torch.float16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert finite(cond(x.half(), torch.tensor([1, 2])))
        assert finite(cond(x, 12.5, [0, 2]))
        assert cond(torch.randn(0, 3, 16, 16), 5).shape == (0, 3, 16, 16)


# ----- schedulers ------------------------------------------------------------------------------------------
def _whole_loop(s, n: int, g: torch.Generator, eta: float = 0.5) -> torch.Tensor:
    """set_timesteps(n) and run the reverse process on random model outputs: every step must stay finite."""
    s.set_timesteps(n)
    x = torch.randn(2, 1, 2, 2, generator=g)
    for t in s.timesteps.tolist():
        out = torch.randn(x.shape, generator=g)
        x = s.step(out, t, x, eta=eta, generator=g) if isinstance(s, DDIMScheduler) else s.step(out, t, x, generator=g)
        assert finite(x), f"NaN/inf after the step at t={t}"
    return x


@FUZZ
@given(cls=st.sampled_from([DDPMScheduler, DDIMScheduler]),
       T=st.one_of(st.integers(1, 1200), st.integers(1, 40), usually([np.int64(50)], [0, -1, 10.0, True, "100"], 1)),
       schedule=usually(["linear", "scaled_linear", "squaredcos_cap_v2"], ["quadratic"]),
       beta_start=st.one_of(st.floats(1e-6, 0.05), usually([1e-4, 8.5e-4, 0.3], [0.0, -1e-3, 1e-9, 1.0, NAN], 1)),
       beta_end=st.one_of(st.floats(1e-4, 0.9), usually([0.02, 0.012, 0.999], [0.0, 1.5, NAN], 1)),
       spacing=usually(["leading", "trailing", "linspace"], ["random"]),
       offset=usually([0, 1], [-1, 5, 1300], times=8),
       clip_range=usually([1.0, 0.5, INF], [0.0, -1.0, NAN]),
       n=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_scheduler_constructor_refuses_bad_arguments_and_samples_finite(cls, T, schedule, beta_start, beta_end,
                                                                        spacing, offset, clip_range, n, seed):
    problems = []
    if not (isinstance(T, (int, np.integer)) and not isinstance(T, bool)) or T < 1:
        problems.append("num_train_timesteps")
    elif not 0 <= offset < T:
        problems.append("steps_offset")
    if schedule == "quadratic":
        problems.append("beta_schedule")
    if schedule in ("linear", "scaled_linear"):
        problems += [f"{name} must be" for name, v in (("beta_start", beta_start), ("beta_end", beta_end))
                     if not 0 < v < 1]
    if spacing == "random":
        problems.append("timestep_spacing")
    if not clip_range > 0:
        problems.append("clip_sample_range")
    kw = dict(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule=schedule,
              timestep_spacing=spacing, steps_offset=offset, clip_sample_range=clip_range)
    if problems:
        works_or_refuses(lambda: cls(**kw), problems)
        return
    # valid arguments. abar_t must also lie strictly in (0, 1) in float32, which depends on the numbers: a
    # refusal naming abar_t and the betas is allowed; an accepted schedule must sample without NaN/inf
    event("valid input")
    try:
        s = cls(**kw)
    except ValueError as e:
        assert re.search(r"abar_\d+ = .* beta_start|beta_start.* abar_\d+ = ", str(e)), str(e)
        event("schedule refused: abar_t rounds to 0 or 1 in float32")
        return
    assert bool(((s.alphas_cumprod > 0) & (s.alphas_cumprod < 1)).all())
    n = min(n, int(T))
    if spacing == "leading" and (n - 1) * (int(T) // n) + offset > int(T) - 1:
        works_or_refuses(lambda: s.set_timesteps(n), ["steps_offset"])
        return
    _whole_loop(s, n, torch.Generator().manual_seed(seed))


@FUZZ
@given(T=st.integers(1, 1000), spacing=st.sampled_from(["leading", "trailing", "linspace"]),
       offset=st.sampled_from([0, 1]),
       n=st.one_of(st.integers(1, 1000), st.integers(1, 1000), st.integers(1, 60),
                   usually([np.int64(7), torch.tensor(5)], [0, -2, 1001, 2.5, 10.0, True, "10", torch.tensor(5.0)], 1)))
def test_set_timesteps_gives_n_decreasing_in_range_timesteps_or_refuses(T, spacing, offset, n):
    s = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset if offset < T else 0)
    problems = []
    is_int = isinstance(n, (int, np.integer)) and not isinstance(n, bool) or (
        isinstance(n, torch.Tensor) and not n.dtype.is_floating_point)
    if not is_int or not 1 <= int(n) <= T:
        problems.append("num_inference_steps")
    elif spacing == "leading" and (int(n) - 1) * (T // int(n)) + s.steps_offset > T - 1:
        problems.append("steps_offset")
    works_or_refuses(lambda: s.set_timesteps(n), problems)
    if not problems:
        ts = s.timesteps.tolist()
        assert len(ts) == int(n) and s.num_inference_steps == int(n)
        assert all(a > b for a, b in zip(ts, ts[1:])), "strictly decreasing"
        assert 0 <= ts[-1] and ts[0] <= T - 1


def test_trailing_spacing_gives_exactly_n_timesteps_for_every_n():
    """arange(T, 0, -T/n) can leave an extra entry ~1e-13 that rounds to timestep -1 (e.g. T=1000, n=61):
    `set_timesteps` keeps exactly n, all in [0, T - 1]."""
    for T in [*range(1, 60), 1000]:
        s = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        for n in range(1, T + 1):
            s.set_timesteps(n)
            ts = s.timesteps
            assert len(ts) == n and int(ts.min()) >= 0 and int(ts[0]) == T - 1, (T, n, ts.tolist())


@FUZZ
@given(shape=usually([(3, 2, 4, 4), (2, 5), (1, 1, 2, 2), (0, 3, 2, 2)], [()]),
       noise_shape=usually(["same"], ["other_batch", "other_channels"]),
       x_dtype=usually(FLOATS, NOT_FLOATS, times=3), noise_dtype=usually(FLOATS, NOT_FLOATS, times=3),
       tkind=usually(["int", "0d", "vec", "list"], ["wrong_len", "column", "float", "bool", "str"], times=4),
       tval=st.one_of(st.integers(0, 999), st.integers(0, 999), st.sampled_from([-1, 1000, 1003])),
       seed=st.integers(0, 2**16))
def test_add_noise_fuzz(shape, noise_shape, x_dtype, noise_dtype, tkind, tval, seed):
    s = DDPMScheduler()
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(x_dtype)
    nshape = {"same": shape, "other_batch": (shape[0] + 1, *shape[1:]) if shape else (1,),
              "other_channels": (*shape[:1], 7, *shape[2:]) if shape else (1,)}[noise_shape]
    noise = torch.randn(nshape, generator=g).to(noise_dtype)
    b = shape[0] if shape else 0
    tvals = ([tval] + [(tval * 7 + i) % 1000 for i in range(1, b)])[:b]   # the first may be out of range
    t = {"int": tval, "0d": torch.tensor(tval), "vec": torch.tensor(tvals, dtype=torch.long), "list": tvals,
         "wrong_len": torch.zeros(b + 1, dtype=torch.long), "column": torch.zeros(b, 1, dtype=torch.long),
         "float": torch.full((b,), 5.0), "bool": torch.ones(b, dtype=torch.bool), "str": "5"}[tkind]
    problems = []
    if not shape:
        problems.append("batch dimension")
    if not x_dtype.is_floating_point or not noise_dtype.is_floating_point:
        problems.append("floating-point")
    if nshape != shape:
        problems.append("same shape")
    if tkind in ("float", "bool") or (tkind == "list" and b == 0):     # an empty Python list becomes float
        problems.append("integers")
    if tkind == "str":
        problems.append("timesteps must be")
    if tkind in ("wrong_len", "column") or (tkind in ("vec", "list") and not shape):
        problems.append("one timestep per sample")
    given_values = {"int": [tval], "0d": [tval], "vec": tvals, "list": tvals}.get(tkind, [])
    if any(not 0 <= v <= 999 for v in given_values):
        problems.append(r"lie in \[0, 999\]")
    out = works_or_refuses(lambda: s.add_noise(x0, noise, t), problems)
    if out is not None:
        assert out.shape == x0.shape and out.dtype == x0.dtype and finite(out)


@FUZZ
@given(cls=st.sampled_from([DDPMScheduler, DDIMScheduler]), n=st.sampled_from([None, 1, 7, 50, 61]),
       spacing=st.sampled_from(["leading", "trailing", "linspace"]),
       tkind=usually(["from_timesteps", "from_timesteps", "int", "0d", "one_elem"], ["two_elem", "float", "bool"]),
       tval=st.one_of(st.integers(0, 999), usually([0, 999], [-1, -3, 1000, 1003], 1)), pick=st.integers(0, 60),
       out_shape=usually(["same"], ["other", "scalar"]),
       dtypes=usually([(torch.float32, torch.float32), (torch.float16, torch.float32),
                       (torch.float32, torch.bfloat16), (torch.float64, torch.float32)],
                      [(torch.int64, torch.float32), (torch.float32, torch.bool)], times=2),
       vnoise=usually([None, "same"], ["other", "int"]), eta=usually([0.0, 0.3, 1.0], [-0.1, 1.5, NAN, "0.5"]),
       clip=st.booleans(), seed=st.integers(0, 2**16))
def test_step_fuzz(cls, n, spacing, tkind, tval, pick, out_shape, dtypes, vnoise, eta, clip, seed):
    s = cls(timestep_spacing=spacing, clip_sample=clip)
    if n is not None:
        s.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4, 4)
    sample = torch.randn(shape, generator=g).to(dtypes[1])
    oshape = {"same": shape, "other": (1, 3, 4, 4), "scalar": ()}[out_shape]
    model_output = torch.randn(oshape, generator=g).to(dtypes[0])
    variance_noise = {None: None, "same": torch.randn(shape, generator=g), "other": torch.randn(2, 3, 1, 1),
                      "int": torch.zeros(shape, dtype=torch.long)}[vnoise]
    ts = s.timesteps.tolist()
    t = {"from_timesteps": ts[pick % len(ts)], "int": tval, "0d": torch.tensor(tval), "one_elem": torch.tensor([tval]),
         "two_elem": torch.tensor([tval, tval]), "float": float(tval) + 0.5, "bool": True}[tkind]
    problems = []
    if cls is DDIMScheduler and not (isinstance(eta, float) and 0 <= eta <= 1):
        problems.append("eta must be")
    if out_shape == "scalar":
        problems.append("batch dimension")
    if not all(d.is_floating_point for d in dtypes):
        problems.append("floating-point")
    if oshape != shape:
        problems.append("same shape")
    if vnoise == "other":
        problems.append("variance_noise")
    if vnoise == "int":
        problems.append("variance_noise must be a floating-point")
    if tkind in ("two_elem", "float", "bool"):
        problems.append("timestep must be an integer")
    elif tkind != "from_timesteps":
        if not 0 <= tval <= 999:
            problems.append(r"timestep must lie in \[0, 999\]")
        elif n is not None and tval not in ts:
            problems.append("not in this scheduler's timesteps")
    kw = dict(eta=eta) if cls is DDIMScheduler else {}
    out = works_or_refuses(lambda: s.step(model_output, t, sample, generator=g, variance_noise=variance_noise,
                                          **kw), problems)
    if out is not None:
        assert out.shape == shape and finite(out)


# ----- metrics ---------------------------------------------------------------------------------------------
VALID_CONTAINERS = ["list", "numpy_int", "numpy_float", "long", "int32", "float_whole", "bool"]
BAD_CONTAINERS = ["float_frac", "nonfinite", "huge", "2d", "0d", "str"]


def index_sequence(draw, vals: list[int]):
    """`vals` in a random container: (the value passed, its integer values or None, the problem or None)."""
    kind = draw(usually(VALID_CONTAINERS, BAD_CONTAINERS, times=3))
    if kind == "list":
        return vals, vals, None
    if kind in ("numpy_int", "numpy_float"):
        return np.array(vals, dtype=np.int64 if kind == "numpy_int" else np.float64), vals, None
    if kind in ("long", "int32", "float_whole"):
        dtype = {"long": torch.long, "int32": torch.int32, "float_whole": torch.float32}[kind]
        return torch.tensor(vals, dtype=dtype), vals, None
    if kind == "bool":
        return torch.tensor([v > 0 for v in vals], dtype=torch.bool), [int(v > 0) for v in vals], None
    if not vals and kind in ("float_frac", "nonfinite", "huge"):
        return torch.tensor([]), [], None                       # nothing to corrupt: a valid empty sequence
    if kind == "float_frac":
        return torch.tensor(vals, dtype=torch.float64) + 0.5, None, "integer"
    if kind == "nonfinite":
        return torch.tensor(vals[:-1] + [draw(st.sampled_from([NAN, INF, -INF]))]), None, "integer"
    if kind == "huge":
        return torch.tensor(vals[:-1] + [1e30]), None, "integer"
    if kind == "2d":
        return torch.tensor(vals).reshape(-1, 1), None, "one-dimensional"
    if kind == "0d":
        return torch.tensor(1), None, "one-dimensional"
    return "abc", None, r"1-D list, array or tensor"


@st.composite
def index_pairs(draw, hi_a: int = 3, hi_b: int = 3, bad_a=(-1,)):
    """Two per-sample sequences (usually of one length, values in [0, hi]; sometimes one value of `bad_a`)."""
    n = draw(st.integers(0, 8))
    n_b = draw(usually([n], [n + 1, max(n - 1, 0)], times=12))
    a = [draw(st.integers(0, hi_a)) for _ in range(n)]
    b = [draw(st.integers(0, hi_b)) for _ in range(n_b)]
    if a and draw(usually([False], [True])):
        a[draw(st.integers(0, n - 1))] = draw(st.sampled_from(bad_a))
    return index_sequence(draw, a), index_sequence(draw, b)


def pair_problems(a, b, a_bad, b_bad, names):
    problems = [p for p in (a_bad, b_bad) if p]
    if not problems:
        if len(a) != len(b):
            problems.append(f"{names} must have one entry per sample")
        elif not a:
            problems.append("no samples given")
    return problems


@FUZZ
@given(k=usually([2, 3, 4], [-1, 0, 1, 2.0, True, "2"], times=4),
       fn=st.sampled_from([bias_score, fairness_discrepancy]), data=st.data())
def test_bias_and_fairness_fuzz(k, fn, data):
    kk = k if isinstance(k, int) and k > 1 else 2
    (av, a_ints, a_bad), (yv, y_ints, y_bad) = data.draw(index_pairs(hi_a=kk - 1, bad_a=(-1, kk)))
    k_ok = isinstance(k, int) and not isinstance(k, bool) and k >= (2 if fn is bias_score else 1)
    problems = [] if k_ok else ["num_attributes must be an integer"]
    if k_ok:
        problems += pair_problems(a_ints, y_ints, a_bad, y_bad, "attributes and labels")
        if not problems and not all(0 <= v < k for v in a_ints):
            problems.append(r"attributes must lie in \[0, ")
    out = works_or_refuses(lambda: fn(av, yv, k), problems)
    if out is not None:
        assert math.isfinite(out) and 0 <= out <= 1 + 1e-9


@FUZZ
@given(c=usually([1, 2, 3], [-1, 0, 2.0, None]), pair=index_pairs(hi_a=3, hi_b=2))
def test_minority_share_fuzz(c, pair):
    (av, a_ints, a_bad), (yv, y_ints, y_bad) = pair
    c_ok = isinstance(c, int) and c >= 1
    problems = [] if c_ok else ["num_classes must be an integer"]
    if c_ok:
        problems += pair_problems(a_ints, y_ints, a_bad, y_bad, "attributes and labels")
        if not problems and min(a_ints) < 0:
            problems.append("attributes must be >= 0")
    out = works_or_refuses(lambda: minority_share(av, yv, c), problems)
    if out is not None:
        assert len(out) == c
        for cls, share in enumerate(out):       # NaN exactly for a class with no samples (documented)
            assert math.isnan(share) == (cls not in y_ints) and (math.isnan(share) or 0 <= share <= 1)


@FUZZ
@given(pair=index_pairs(bad_a=(-1, -7, 10**6)), fn=st.sampled_from([fidelity, normalized_mutual_info]))
def test_fidelity_and_nmi_fuzz(pair, fn):
    (pv, p_ints, p_bad), (yv, y_ints, y_bad) = pair
    names = "predicted_class and labels" if fn is fidelity else "a and b"
    problems = pair_problems(p_ints, y_ints, p_bad, y_bad, names)
    out = works_or_refuses(lambda: fn(pv, yv), problems)
    if out is not None:
        assert math.isfinite(out) and -1e-9 <= out <= 1 + 1e-9


def test_nmi_treats_labels_as_names():
    """Relabelling (negative or large labels) leaves NMI unchanged."""
    a, b = [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 1]
    ref = normalized_mutual_info(a, b)
    assert normalized_mutual_info([-5, -5, 7, 7, 10**9, 10**9], [3, 3, -1, -1, -1, 3]) == pytest.approx(ref)


@FUZZ
@given(n=st.integers(0, 8), n_pos=usually([0], [1, -1]), data=st.data(),
       extra=usually([None], [NAN, INF]), skind=usually(["tensor", "list", "numpy", "long"], ["2d"]),
       pkind=usually(["bool", "long", "list", "float"], ["two", "half"]))
def test_auroc_fuzz(n, n_pos, data, extra, skind, pkind):
    scores = data.draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))
    positives = data.draw(st.lists(st.integers(0, 1), min_size=max(n + n_pos, 0), max_size=max(n + n_pos, 0)))
    svals = [round(v) for v in scores] if skind == "long" else scores[:-1] + [extra] if extra and scores else scores
    sv = {"tensor": lambda: torch.tensor(svals, dtype=torch.float64), "list": lambda: svals,
          "numpy": lambda: np.array(svals, dtype=float), "2d": lambda: torch.tensor(svals).reshape(-1, 1),
          "long": lambda: torch.tensor(svals, dtype=torch.long)}[skind]()
    pv = {"bool": torch.tensor(positives, dtype=torch.bool), "long": torch.tensor(positives), "list": positives,
          "float": torch.tensor(positives, dtype=torch.float32),
          "two": torch.tensor(positives[:-1] + [2]) if positives else torch.tensor([]),
          "half": torch.tensor(positives[:-1] + [0.5]) if positives else torch.tensor([])}[pkind]
    problems = []
    if skind == "2d":
        problems.append("scores must be a 1-D")
    elif len(svals) != len(positives):
        problems.append("one entry per sample")
    elif not all(math.isfinite(v) for v in svals):
        problems.append("NaN or inf")
    elif pkind in ("two", "half") and positives:
        problems.append("positives must be a boolean mask")
    out = works_or_refuses(lambda: auroc(sv, pv), problems)
    if out is not None:
        one_class = len(set(positives)) < 2
        assert math.isnan(out) == one_class, "NaN exactly when there are no positives or no negatives"
        assert one_class or 0 <= out <= 1
