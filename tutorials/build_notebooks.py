"""Write the tutorial notebooks (tutorials/NN_*.ipynb) from the cells below, and optionally execute them.

    python tutorials/build_notebooks.py                 # write every notebook (outputs kept where no code changed)
    python tutorials/build_notebooks.py --execute       # write and execute them (normal mode): the committed outputs
    python tutorials/build_notebooks.py --execute 04    # only the notebooks whose name contains "04"

Edit the cells here, not in the .ipynb files, so the six notebooks keep one setup cell. Execute with
OMP_NUM_THREADS=1 on a shared machine; tests/test_notebooks.py runs them in fast mode (INVDIFF_FAST=1).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import textwrap
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 1800


def md(text: str):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return new_code_cell(textwrap.dedent(text).strip())


# ----- cells every notebook starts with ---------------------------------------------------------------------
SETUP = code("""
    import os
    import sys
    from pathlib import Path

    ROOT = Path.cwd().resolve()
    while not (ROOT / "invdiff_min").is_dir():       # run from tutorials/ or from the repository root
        if ROOT == ROOT.parent:
            raise RuntimeError("start Jupyter inside the invdiff-min checkout (tutorials/ or its root)")
        ROOT = ROOT.parent
    sys.path.insert(0, str(ROOT))                   # invdiff_min imports from the checkout
    FAST = os.environ.get("INVDIFF_FAST") == "1"    # the tests' fast mode: tiny settings, ugly pictures
    print(f"fast mode: {FAST}")
""")

PLOTTING = """
    import matplotlib.pyplot as plt

    %matplotlib inline
    plt.rcParams.update({"figure.dpi": 70, "font.size": 9})   # small PNGs keep the notebooks small
"""

# The run shared by tutorials 2-6: trained once, cached in the temp folder under a key made of the config and
# the library's source, so a changed library never reuses a stale model.
SHARED_RUN = code("""
    import hashlib
    import json
    import tempfile

    import torch

    from invdiff_min import pipeline                # the stage functions train.py runs
    from invdiff_min.config import get_preset, pick_device
    from invdiff_min.data import load_splits
    from invdiff_min.unet import UNetConfig


    def tutorial_config():
        \"\"\"A smaller, shorter cousin of the `cpu` preset (minutes on one CPU core); `tiny` in fast mode.\"\"\"
        if FAST:
            cfg = get_preset("tiny")
            cfg.losses.t_window = (400, 700)        # skip the label-free search for the t window (tutorial 4)
            return cfg
        cfg = get_preset("cpu")
        cfg.data.num_samples = 2000                 # 1,900 bias-aligned, 100 bias-conflicting images
        cfg.unet = UNetConfig(sample_size=16, block_out_channels=(16, 32, 32), attention_levels=(False, False, False),
                              mid_attention=False, layers_per_block=1, norm_num_groups=8, num_classes=2)
        cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every = 2000, 32, 500
        cfg.train.warmup_steps, cfg.train.ema_decay = 50, 0.99
        cfg.losses.num_draws, cfg.losses.auto_window_draws, cfg.losses.auto_window_samples = 8, 2, 200
        cfg.head.block_out_channels, cfg.head.attention_levels = (8, 16, 16), (False, False, False)
        cfg.head.steps, cfg.head.batch_size, cfg.head.checkpoint_every = 600, 32, 600
        cfg.eval.n_per_class, cfg.eval.num_steps = 100, 20
        return cfg


    def run_folder(cfg) -> Path:
        \"\"\"Where the tutorials keep this run: the temp folder, keyed by the config and the library's code.\"\"\"
        key = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        for source in sorted((ROOT / "invdiff_min").rglob("*.py")):
            key.update(source.read_bytes())
        return Path(tempfile.gettempdir()) / "invdiff-tutorials" / key.hexdigest()[:12]


    def base_model():
        \"\"\"Tutorial 2's base model (stage A): trained into the run folder once, read from it afterwards.
        Returns (the EMA model, its checkpoint folder).\"\"\"
        return pipeline.train_base(cfg, splits.train, device, run_dir / "base", progress=False)


    cfg = tutorial_config()
    run_dir = run_folder(cfg)
    splits = load_splits(cfg.data)                  # the data, built once: splits.train, splits.eval
    device = pick_device("auto")
    print(f"run folder {run_dir} (shared by tutorials 2-6), device {device}")
""")


# ----- 1. the forward process -----------------------------------------------------------------------------------
NB1 = [
    md(r"""
    # 1. The forward process and the noise schedule

    A diffusion model learns to undo a fixed noising process. This notebook looks only at that process: how an
    image is noised, how fast (the schedule), and what the network is asked to predict. Everything here is
    closed-form; nothing is trained. It runs in seconds.

    Notation (Ho et al. 2020): $x_0$ a clean image in $[-1, 1]$, $t \in \{0, \dots, T-1\}$ with $T = 1000$,
    $\beta_t$ the variance of the noise added at step $t$, $\alpha_t = 1 - \beta_t$,
    $\bar\alpha_t = \prod_{s \le t} \alpha_s$ (`alphas_cumprod` in `invdiff_min/scheduler.py`).
    """),
    SETUP,
    code("""
    import torch
    from einops import reduce, repeat

    from invdiff_min.data import (ATTRIBUTE_NAMES, CLASS_NAMES, DataConfig, from_model_range, make_dataset,
                                  read_background, to_model_range)
    from invdiff_min.plots import image_grid
    from invdiff_min.scheduler import DDPMScheduler
    """ + PLOTTING),
    md(r"""
    ## The data

    The built-in dataset (`invdiff_min/data.py`) draws a red-orange **disc** or **square** (the class $y$) on
    **land** (green blotches) or **water** (blue waves), the background $b$. In the training split 95% of
    discs are on land and 95% of squares on water: the background is a *spurious* attribute of the class,
    like the backgrounds of the Waterbirds benchmark. The model works on $x_0 \in [-1, 1]$
    (`to_model_range`). Below, the first eight training images: most show the majority pairing.
    """),
    code("""
    data = make_dataset(DataConfig(resolution=16, num_samples=200), "train")
    x0 = to_model_range(data.images[:8])                            # (8, 3, 16, 16) in [-1, 1]
    fig, axes = plt.subplots(1, 8, figsize=(8, 1.4))
    for ax, img, y, b in zip(axes, data.images, data.labels, data.bias):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"{CLASS_NAMES[y]}\\non {ATTRIBUTE_NAMES[b]}", fontsize=8)
        ax.axis("off")
    plt.show()
    print(f"{int(data.conflicting.sum())} of {len(data)} training images are bias-conflicting (a disc on water "
          f"or a square on land)")
    """),
    md(r"""
    ## The noise schedule

    One forward step adds a little Gaussian noise and shrinks the signal so the variance stays 1:
    $$q(x_t \mid x_{t-1}) = \mathcal N\big(\sqrt{\alpha_t}\, x_{t-1},\ \beta_t I\big).$$
    Composing the steps gives the marginal in closed form, so any $x_t$ is one draw away from $x_0$:
    $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big), \qquad
      x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon,\quad \varepsilon \sim \mathcal N(0, I).$$
    Two schedules of $\beta_t$ (`make_betas`):
    * **linear** (Ho et al.): $\beta_t$ from $10^{-4}$ to $0.02$, the default of this project;
    * **cosine** (Nichol & Dhariwal 2021, `squaredcos_cap_v2`): $\bar\alpha_t = f(t)/f(0)$ with
      $f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\cdot\tfrac{\pi}{2}\big)$, $s = 0.008$.

    The signal-to-noise ratio $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$ says how much of $x_0$
    is left in $x_t$.
    """),
    code("""
    schedules = {"linear": DDPMScheduler(beta_schedule="linear"),
                 "cosine": DDPMScheduler(beta_schedule="squaredcos_cap_v2")}
    t_axis = torch.arange(1000)
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for name, s in schedules.items():
        abar = s.alphas_cumprod
        axes[0].plot(t_axis, s.betas, label=name)
        axes[1].plot(t_axis, abar, label=name)
        axes[2].plot(t_axis, (abar / (1 - abar)).log10(), label=name)
    for ax, title in zip(axes, [r"$\\beta_t$", r"$\\bar\\alpha_t$", r"$\\log_{10}\\,\\mathrm{SNR}(t)$"]):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.legend()
    axes[0].set_ylim(0, 0.03)
    plt.tight_layout()
    plt.show()
    for name, s in schedules.items():
        print(f"{name:>6}: abar_t at t = 100, 250, 500, 750: "
              + ", ".join(f"{float(s.alphas_cumprod[t]):.3f}" for t in (100, 250, 500, 750)))
    """),
    md(r"""
    What to see: with the linear schedule $\bar\alpha_t$ is already below 0.08 at $t = 500$ and near 0 from
    $t \approx 700$ on, so the last third of the steps see almost pure noise; the cosine schedule falls
    gently and nearly linearly in the middle ($\bar\alpha_{500} \approx 0.49$). The cosine schedule's $\beta_t$
    is capped at 0.999, which is why its $\log \mathrm{SNR}$ plunges in the last steps.

    ## Noised images

    The same $x_0$ and the same $\varepsilon$, noised to several $t$ with `add_noise` (also called `q_sample`):
    """),
    code("""
    ts = [0, 50, 100, 250, 500, 750, 999]
    eps = torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(0))
    rows, row_names = [], []
    for name, s in schedules.items():
        x_t = s.add_noise(x0[:1].expand(len(ts), -1, -1, -1), eps.expand(len(ts), -1, -1, -1), torch.tensor(ts))
        coarse = repeat(reduce(x_t, "b c (h p) (w q) -> b c h w", "mean", p=4, q=4),
                        "b c h w -> b c (h p) (w q)", p=4, q=4)    # means over 4x4 blocks: the coarse content
        rows += [from_model_range(x_t), from_model_range(coarse)]   # back to [0, 1], clamped, for display
        row_names += [f"{name}: x_t", f"{name}: 4x4 means"]
    grid = image_grid(torch.cat(rows), nrow=len(ts))
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([(i + 0.5) * grid.shape[1] / len(ts) for i in range(len(ts))], [f"t={t}" for t in ts])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(rows) for i in range(len(rows))], row_names)
    plt.show()
    """),
    md(r"""
    What to see: at $t = 250$ the object is still visible in $x_t$ under both schedules; at $t = 500$ the
    linear schedule's $x_t$ looks like pure noise to the eye, while the cosine schedule's still shows a
    trace. The rows of 4x4 block means (what a coarse look at the image sees; averaging 16 pixels divides
    the noise by 4) keep the blue tint of the water to larger $t$ than the object stays visible in $x_t$.
    Coarse, low-frequency content (here the background, the spurious attribute) survives to higher noise
    levels than fine detail (the shape), so it is decided early in sampling, at large $t$. Tutorial 4 looks
    for the bias there.

    The next cell measures this: the exact background reader of the dataset (`read_background`: is the mean
    blue of the non-object pixels above their mean green?) applied to *noisy* images $x_t$, for 200 images.
    """),
    code("""
    many = to_model_range(data.images)                               # (200, 3, 16, 16)
    g = torch.Generator().manual_seed(1)
    t_grid = list(range(0, 1000, 50 if FAST else 25))
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for name, s in schedules.items():
        acc = []
        for t in t_grid:
            x_t = s.add_noise(many, torch.randn(many.shape, generator=g), torch.full((len(many),), t))
            acc.append(float((read_background(from_model_range(x_t)) == data.bias).float().mean()))
        ax.plot(t_grid, acc, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("t")
    ax.set_ylabel("background read correctly")
    ax.set_ylim(0.4, 1.02)
    ax.legend()
    plt.show()
    """),
    md(r"""
    What to see: under the linear schedule the background is read correctly from almost every $x_t$ up to
    $t \approx 500$, where the picture above no longer shows the object, and above chance (the dashed line)
    up to $t \approx 900$; under the cosine schedule it stays near perfect up to $t \approx 800$.

    ## Many small steps or one jump

    The closed form is exact: iterating $x_t = \sqrt{\alpha_t}\, x_{t-1} + \sqrt{\beta_t}\, z_t$ step by step
    gives the same distribution as one jump with $\bar\alpha_t$. Below, one image noised to $t = 300$ both
    ways, many times: the mean and standard deviation of $x_t$ per pixel, averaged over pixels.
    """),
    code("""
    s, t_end, n = schedules["linear"], 300, 200 if FAST else 2000
    start = x0[:1].expand(n, -1, -1, -1)
    g = torch.Generator().manual_seed(2)
    chain = start.clone()
    for t in range(t_end + 1):                                     # x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z
        chain = s.alphas[t].sqrt() * chain + s.betas[t].sqrt() * torch.randn(chain.shape, generator=g)
    jump = s.add_noise(start, torch.randn(start.shape, generator=g), torch.full((n,), t_end))
    abar = float(s.alphas_cumprod[t_end])
    print(f"expected: mean sqrt(abar) x0 = {abar ** 0.5 * float(x0[0].mean()):+.3f}, std sqrt(1 - abar) = "
          f"{(1 - abar) ** 0.5:.3f}")
    for name, x in (("step by step", chain), ("one jump", jump)):
        print(f"{name:>13}: mean {float(x.mean()):+.3f}, std {float(x.std(0).mean()):.3f}")
    """),
    md(r"""
    What to see: the two rows agree with the expected values to about two decimals (the rest is sampling
    noise of the $n$ draws). Training never runs the chain: it draws $t$ and jumps.

    ## What the network predicts: $\varepsilon$

    Given $x_t$ and $t$, knowing the noise $\varepsilon$ is the same as knowing $x_0$:
    $$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}} \qquad
      (\texttt{predict\_x0}).$$
    So the network $\varepsilon_\theta(x_t, t, y)$ is trained to predict the noise, with the plain
    mean-squared error of Ho et al. (`diffusion.training_loss`):
    $$L_\text{simple} = \mathbb E_{x_0, y, t, \varepsilon}\,
      \big\lVert \varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\ t,\ y) \big\rVert^2 .$$
    An error $\delta$ in $\hat\varepsilon$ becomes an error $\sqrt{(1 - \bar\alpha_t)/\bar\alpha_t}\;\delta
    = \delta / \sqrt{\mathrm{SNR}(t)}$ in $\hat x_0$. Below: $x_0$ recovered from the true $\varepsilon$
    (exact) and from $\varepsilon$ plus a small error, at three noise levels.
    """),
    code("""
    s = DDPMScheduler(beta_schedule="linear", clip_sample=False)     # no clipping: show the raw x0_hat
    eps = torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(3))
    delta = 0.1 * torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(4))
    panels, titles = [from_model_range(x0[:1])], ["x0"]
    for t in (100, 500, 800):
        x_t = s.add_noise(x0[:1], eps, torch.tensor([t]))
        exact = s.predict_x0(eps, t, x_t)
        off = s.predict_x0(eps + delta, t, x_t)
        abar = float(s.alphas_cumprod[t])
        print(f"t = {t}: max |x0_hat - x0| with the true eps {float((exact - x0[:1]).abs().max()):.1e}; "
              f"with eps + delta (std 0.1): error std {float((off - x0[:1]).std()):.2f} "
              f"(predicted 0.1 / sqrt(SNR) = {0.1 * ((1 - abar) / abar) ** 0.5:.2f})")
        panels += [from_model_range(x_t), from_model_range(off)]
        titles += [f"x_t, t={t}", f"x0_hat, t={t}\\nfrom eps + delta"]
    fig, axes = plt.subplots(1, len(panels), figsize=(9, 1.7))
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img[0].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    plt.show()
    """),
    md(r"""
    What to see: with the true noise the reconstruction is exact (errors around $10^{-6}$, float32 rounding).
    With a small error in $\hat\varepsilon$, the reconstruction is fine at $t = 100$, visibly noisy at
    $t = 500$ and lost at $t = 800$, matching $\delta/\sqrt{\mathrm{SNR}}$. This is why samplers take many
    small steps instead of jumping to $\hat x_0$ from pure noise, and why the raw per-sample loss is dominated
    by $t$ (tutorial 4 divides it out).

    **Next:** tutorial 2 trains $\varepsilon_\theta$ on this data and samples from it.
    """),
]

# ----- 2. the UNet, training, sampling, classifier-free guidance --------------------------------------------------
NB2 = [
    md(r"""
    # 2. The UNet, training a tiny class-conditional DDPM, DDPM vs DDIM, classifier-free guidance

    This notebook trains the noise predictor $\varepsilon_\theta(x_t, t, y)$ on the built-in biased dataset
    and samples from it. The model it trains is the *biased base model* that tutorials 3-6 use; it is
    cached in a temporary folder, so those tutorials start from it instead of training again. Training takes
    a few minutes on one CPU core (the rest of the notebook about a minute); the cache makes a second run
    instant.
    """),
    SETUP,
    SHARED_RUN,
    code("""
    import time

    from invdiff_min.checkpoint import load_tensors, load_unet
    from invdiff_min.data import CLASS_NAMES, from_model_range, make_dataset, to_model_range
    from invdiff_min.diffusion import drop_labels, lr_at, make_sampler, per_sample_mse, sample
    from invdiff_min.evaluate import generate, judge
    from invdiff_min.plots import image_grid
    from invdiff_min.scheduler import DDPMScheduler
    from invdiff_min.unet import UNet, count_parameters, timestep_embedding
    """ + PLOTTING),
    md(r"""
    ## The UNet

    `invdiff_min/unet.py` is the DDPM UNet of Ho et al. with diffusers' `UNet2DModel` module names (so
    pretrained weights load, tutorial 6): `conv_in`, `down_blocks` (ResNet blocks, then a stride-2
    convolution), `mid_block`, `up_blocks` (ResNet blocks on the upsampled features concatenated with the
    skip connections), `conv_norm_out`, `conv_out`. Every ResNet block adds the conditioning embedding
    $$e = \mathrm{MLP}\big(\mathrm{sinusoid}(t)\big) + E[y], \qquad
      \mathrm{sinusoid}(t)_k = \big[\cos(t\,\omega_k),\ \sin(t\,\omega_k)\big],\quad
      \omega_k = 10000^{-k/(d/2)},$$
    to its feature map. The class table $E$ has one row more than there are classes: label
    `num_classes` is the **null label** $\varnothing$ ("no class"), used by classifier-free guidance.
    The tutorials use a small model at 16x16 pixels:
    """),
    code("""
    model = UNet(cfg.unet)
    print(f"{count_parameters(model):,} parameters; levels {cfg.unet.block_out_channels}, "
          f"{cfg.unet.layers_per_block} ResNet block(s) per level, null label = {model.null_label}")
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: shapes.append(
                 (name, tuple((out[0] if isinstance(out, tuple) else out).shape))))
             for name, m in model.named_children() if name in ("conv_in", "down_blocks", "mid_block", "up_blocks")]
    hooks += [b.register_forward_hook(lambda mod, inp, out, i=i: shapes.append(
                  (f"down_blocks.{i}", tuple(out[0].shape)))) for i, b in enumerate(model.down_blocks)]
    hooks += [b.register_forward_hook(lambda mod, inp, out, i=i: shapes.append(
                  (f"up_blocks.{i}", tuple(out.shape)))) for i, b in enumerate(model.up_blocks)]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 250, 500, 999]), torch.tensor([0, 1, 0, model.null_label]))
    for h in hooks:
        h.remove()
    for name, shape in shapes:
        if name not in ("down_blocks", "up_blocks"):
            print(f"  {name:<14} -> {shape}")
    print(f"  output         -> {tuple(out.shape)}  (the predicted noise, same shape as x_t)")

    t_all = torch.arange(1000)
    emb = timestep_embedding(t_all, cfg.unet.block_out_channels[0], cfg.unet.flip_sin_to_cos, cfg.unet.freq_shift)
    fig, ax = plt.subplots(figsize=(6, 2.2))
    ax.imshow(emb.T.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
    ax.set_xlabel("t")
    ax.set_ylabel("embedding dimension")
    ax.set_title("sinusoid(t): the input of the time MLP")
    plt.show()
    """),
    md(r"""
    What to see: the spatial size halves at each down level and doubles back on the way up, so the output
    has the shape of the input. In the sinusoid picture, each row is one frequency: the top rows (cosines)
    and the rows just below the middle (sines) oscillate fast in $t$, the others slowly, so nearby
    timesteps get similar codes and distant ones distinguishable codes.

    ## Training: $L_\text{simple}$ with label dropout

    One training step (Ho et al.; `diffusion.training_loss`): draw $t \sim \mathcal U\{0..T-1\}$ and
    $\varepsilon \sim \mathcal N(0, I)$ per image, noise $x_0$ to $x_t$, and regress the noise:
    $$L_\text{simple} = \frac1B \sum_i \big\lVert \varepsilon_i - \varepsilon_\theta(x_{t_i}, t_i, y'_i)
      \big\rVert^2, \qquad y'_i = \begin{cases} \varnothing & \text{with probability } p_\text{uncond} \\
      y_i & \text{otherwise}\end{cases}$$
    Dropping the label *per sample* ($p_\text{uncond} = 0.1$) trains the conditional and the unconditional
    model in one network, which classifier-free guidance needs. Here is that step written out with the
    library's parts, on an untrained model:
    """),
    code("""
    data = make_dataset(cfg.data, "train")
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs())
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(data), (8,), generator=g)
    x0, y = to_model_range(data.images[idx]), data.labels[idx]          # (8, 3, 16, 16), (8,)
    t = torch.randint(0, scheduler.num_train_timesteps, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    y_dropped = drop_labels(y, cfg.train.p_uncond, model.null_label, generator=g)
    x_t = scheduler.add_noise(x0, eps, t)                              # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    with torch.no_grad():
        l_i = per_sample_mse(model(x_t, t, y_dropped), eps)             # one loss per image
    print("t      ", t.tolist())
    print("y'     ", y_dropped.tolist(), f"({model.null_label} = null label)")
    print("l_i    ", [round(v, 3) for v in l_i.tolist()])
    print(f"L_simple of the untrained model: {float(l_i.mean()):.3f} (a network that predicts 0 scores "
          f"E||eps||^2 / D = 1)")
    """),
    md(r"""
    `pipeline.train_base` runs this step (`training_loss`) in a loop with AdamW, a linear warm-up then cosine
    decay of the learning rate (`lr_at`), gradient clipping, and an exponential moving average of the
    weights, $\theta_\text{EMA} \leftarrow \mu\, \theta_\text{EMA} + (1 - \mu)\, \theta$ (`update_ema`),
    which is what samples. It writes checkpoints to the run folder; when the folder already holds the
    finished model (from an earlier run of this notebook) it returns at once.
    """),
    code("""
    t0 = time.time()
    base, base_ckpt = base_model()
    print(f"base model {base_ckpt} ({time.time() - t0:.0f} s; {cfg.train.steps} steps of batch "
          f"{cfg.train.batch_size})")
    history = load_tensors(base_ckpt / "history.safetensors")["loss"]
    smooth = torch.nn.functional.avg_pool1d(history[None, None], 50 if len(history) >= 50 else 1, stride=1)[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
    axes[0].plot(history, lw=0.5, alpha=0.4, label="per step")
    axes[0].plot(range(len(history) - len(smooth), len(history)), smooth, label="mean of 50")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title(r"$L_\\mathrm{simple}$")
    axes[0].legend()
    axes[1].plot([lr_at(s, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps) for s in range(cfg.train.steps)])
    axes[1].set_xlabel("step")
    axes[1].set_title("learning rate")
    plt.tight_layout()
    plt.show()
    base, _, _ = load_unet(base_ckpt, device)                           # the EMA weights
    """),
    md(r"""
    What to see: the loss falls from about 1 (the untrained network) within the first couple of hundred
    steps, then creeps down; the per-step values stay noisy because every batch draws new $t$, and the
    loss of an image depends mostly on its $t$ (tutorial 1).

    ## Sampling: DDPM and DDIM

    Sampling runs the process backwards from $x_T \sim \mathcal N(0, I)$. Both samplers first estimate
    $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$ (clipped to $[-1, 1]$)
    and then step to the previous timestep $t'$ of their schedule:
    * **DDPM** (ancestral, Ho et al.): $x_{t'} \sim \mathcal N\big(\mu_t(x_t, \hat x_0),\ \sigma_t^2 I\big)$,
      the Gaussian posterior $q(x_{t'} \mid x_t, x_0)$ with $\hat x_0$ plugged in: fresh noise at every step;
    * **DDIM** (Song et al., $\eta = 0$): $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 +
      \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon$, deterministic given $x_T$, and good with few steps.

    Both run on the same trained network with any number of steps (`diffusion.sample`,
    `diffusion.make_sampler`). Below: the same starting noise $x_T$ for every row, 8 images per class, and
    the share of samples that show the requested shape (*fidelity*, read exactly by `read_shape`) over 32
    images per class.
    """),
    code("""
    runs = [("ddpm", 20 if FAST else 1000), ("ddpm", 10 if FAST else 50), ("ddim", 10 if FAST else 50),
            ("ddim", 5 if FAST else 10)]
    n = 8 if FAST else 32
    labels = torch.arange(2).repeat_interleave(n)
    shape = (len(labels), 3, cfg.data.resolution, cfg.data.resolution)
    rows, names = [], []
    for name, steps in runs:
        t0 = time.time()
        x = sample(base, make_sampler(name, cfg.diffusion.scheduler_kwargs()).to(device), shape, labels, steps,
                   generator=torch.Generator().manual_seed(0), device=device)
        images = from_model_range(x).cpu()
        report = judge(images, labels)
        print(f"{name.upper()}-{steps:<5} {time.time() - t0:5.1f} s   fidelity {report['fidelity']:.2f}")
        rows += [images[:8], images[n:n + 8]]
        names += [f"{name.upper()}-{steps}: {CLASS_NAMES[0]}", f"{name.upper()}-{steps}: {CLASS_NAMES[1]}"]
    grid = image_grid(torch.cat(rows), nrow=8)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names)
    plt.show()
    """),
    md(r"""
    What to see: every sampler draws mostly discs in the disc rows and squares in the square rows, mostly on
    the majority background (discs on land, squares on water: the bias, measured in tutorial 3). The DDIM
    rows start from the same $x_T$ and follow a deterministic path, so DDIM-10 gives nearly the same images
    as DDIM-50 (compare column by column) at a fifth of the cost. DDPM injects fresh noise at every step,
    so its images differ from DDIM's and between step counts. The fidelities (over 32 images per class,
    so about $\pm 0.08$) lie between 0.6 and 0.8 for every sampler: this small model, trained for
    minutes, often draws ragged shapes, and here 1000 DDPM steps do not beat 50; they only cost 20 times
    more. DDIM with 20-25 steps is what the other tutorials use.

    ## What the model sees: $\hat x_0$ along the way

    At each step the sampler's current guess of the clean image is
    $\hat x_0(x_t) = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta(x_t, t, y))/\sqrt{\bar\alpha_t}$
    (`scheduler.predict_x0`). Here, for one training image noised to several $t$:
    """),
    code("""
    ts = [100, 300, 500, 700, 900]
    x0_one, y_one = to_model_range(data.images[:1]), data.labels[:1]
    eps = torch.randn(x0_one.shape, generator=torch.Generator().manual_seed(5))
    panels, titles = [data.images[0]], ["x0"]
    for t in ts:
        x_t = scheduler.add_noise(x0_one, eps, torch.tensor([t]))
        with torch.no_grad():
            x0_hat = scheduler.predict_x0(base(x_t.to(device), torch.tensor([t], device=device),
                                               y_one.to(device)).cpu(), t, x_t)
        panels += [from_model_range(x_t)[0], from_model_range(x0_hat)[0]]
        titles += [f"x_t, t={t}", f"x0_hat, t={t}"]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 1.8))
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    plt.show()
    """),
    md(r"""
    What to see: at $t = 100$ and $300$ the model's $\hat x_0$ is close to the original; at $t = 500$ it is
    a blurry guess, a smudge of the object's colour on a background colour. At $t = 700$ and $900$ the
    division by $\sqrt{\bar\alpha_t}$ amplifies the network's small errors in $\hat\varepsilon$ (tutorial 1)
    and $\hat x_0$ is mostly noise: one jump from there is useless, which is why the samplers above take
    many small steps, each trusting $\hat x_0$ only a little.

    ## Classifier-free guidance

    With the conditional and the unconditional model in one network, classifier-free guidance
    (Ho & Salimans 2022) mixes their predictions with a scale $s$:
    $$\hat\varepsilon = \varepsilon_\theta(x_t, t, \varnothing) + s\,\big(\varepsilon_\theta(x_t, t, y)
      - \varepsilon_\theta(x_t, t, \varnothing)\big).$$
    $s = 0$ is the unconditional model, $s = 1$ the plain conditional model (one network call, the default
    everywhere in this project), $s > 1$ pushes further in the direction the label points, trading variety
    for fidelity to the label. In `sample` and `generate` this is `guidance_scale`. Same seeds for every $s$:
    """),
    code("""
    scales = [0.0, 1.0, 3.0] if FAST else [0.0, 1.0, 2.0, 4.0]
    n = 8 if FAST else 64
    rows, names = [], []
    for s in scales:
        images, labels = generate(base, cfg.diffusion.scheduler_kwargs(), n, 2,
                                  (3, cfg.data.resolution, cfg.data.resolution), sampler="ddim",
                                  num_steps=5 if FAST else 25, guidance_scale=s, seed=1, device=device)
        report = judge(images, labels)
        print(f"s = {s}: fidelity {report['fidelity']:.2f}, images on the minority background per class "
              f"(disc, square) {report['minority_share'][0]:.2f}, {report['minority_share'][1]:.2f}")
        rows += [images[:8], images[n:n + 8]]
        names += [f"s={s}: {CLASS_NAMES[0]}", f"s={s}: {CLASS_NAMES[1]}"]
    grid = image_grid(torch.cat(rows), nrow=8)
    fig, ax = plt.subplots(figsize=(6, 1.5 * len(scales)))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names)
    plt.show()
    """),
    md(r"""
    What to see: at $s = 0$ the label is ignored, so both rows of a pair hold a mix of shapes and
    backgrounds and fidelity is about one half. At $s = 1$ the rows follow their class. At $s = 2$ fidelity
    rises a little and *every* sample sits on its class's usual background (minority share 0 for both
    classes): the guidance direction $\varepsilon(y) - \varepsilon(\varnothing)$ carries everything the
    label predicts, the spurious background included, so stronger guidance amplifies the bias. At $s = 4$
    fidelity is highest, but many disc backgrounds have drifted to an in-between teal the data never had
    (the background reader splits those between land and water, hence the jump in the discs' minority
    share): large scales push the samples off the data. Tutorial 3 measures the bias properly; tutorial 5
    removes it with a different kind of guidance.
    """),
]

# ----- 3. how the bias gets in ------------------------------------------------------------------------------------
NB3 = [
    md(r"""
    # 3. How the bias gets in

    The training data pair each class with one background 95% of the time. This notebook measures that
    correlation in the data, samples the model trained on them (tutorial 2's base model, from the cache, or
    trained here if the cache is empty: a few minutes), measures the same correlation in its samples, and
    looks at *where* in the reverse process the class label pulls an image towards its usual background.
    """),
    SETUP,
    SHARED_RUN,
    code("""
    import time

    from invdiff_min.checkpoint import load_unet
    from invdiff_min.data import ATTRIBUTE_NAMES, CLASS_NAMES, from_model_range, make_dataset, to_model_range
    from invdiff_min.data import read_background, read_shape
    from invdiff_min.evaluate import generate, judge
    from invdiff_min.metrics import attribute_counts, bias_score
    from invdiff_min.plots import image_grid
    """ + PLOTTING),
    md(r"""
    ## The bias of the data, and how it is measured

    The paper's **Bias** (`metrics.bias_score`): for each class (prompt) $p$ with attribute counts
    $C[p, a]$ over $K$ attribute values,
    $$\mathrm{bias}_p = \frac{\sum_{i<j} \lvert C[p,i] - C[p,j] \rvert}{\sum_a C[p,a]\;\cdot\; K(K-1)/2},
      \qquad \mathrm{Bias} = \frac1P \sum_p \mathrm{bias}_p .$$
    With $K = 2$ backgrounds it is $\lvert$share on land $-$ share on water$\rvert$, averaged over the two
    classes: 0 when each class is split evenly, 1 when each class always has one background. The
    **minority share** of a class is the share of its images on the background it usually lacks.

    For generated images nobody knows $b$, so it is read off the pixels. On this dataset two exact rules do
    it (`read_background`: mean blue above mean green; `read_shape`: does the object fill the corners of its
    bounding box), so the measurement has no classifier error. First, check the readers against the hidden
    labels of the training data:
    """),
    code("""
    data = make_dataset(cfg.data, "train")
    balanced = make_dataset(cfg.data, "eval")                          # the balanced evaluation split
    bg_ok = float((read_background(data.images) == data.bias).float().mean())
    shape_ok = float((read_shape(data.images) == data.labels).float().mean())
    print(f"background reader agrees with the hidden labels on {bg_ok:.3f} of the training images, "
          f"shape reader on {shape_ok:.3f}")
    _, counts = attribute_counts(data.bias, data.labels, 2)             # C[class, background]
    print(f"training data: Bias {bias_score(data.bias, data.labels, 2):.3f}; "
          f"balanced split: Bias {bias_score(balanced.bias, balanced.labels, 2):.3f}")
    fig, ax = plt.subplots(figsize=(4, 2.6))
    for b, colour in zip(range(2), ["tab:green", "tab:blue"]):
        ax.bar(CLASS_NAMES, counts[:, b], bottom=counts[:, :b].sum(1), color=colour, label=f"on {ATTRIBUTE_NAMES[b]}")
    ax.set_ylabel("training images")
    ax.legend()
    plt.show()
    """),
    md(r"""
    What to see: both readers agree with the hidden labels on every training image (1.000), and each class
    sits on its majority background 95% of the time (Bias 0.900); the balanced split has Bias 0.

    ## Why the model copies the bias

    A conditional diffusion model is trained to fit $p(x \mid y)$, and the data's $p(x \mid y)$ contains the
    correlation:
    $$p(x \mid y) = \sum_b p(b \mid y)\, p(x \mid y, b), \qquad p(b \ne y \mid y) = 0.05 .$$
    A *perfect* model therefore draws a disc on water 5% of the time: nothing in $L_\text{simple}$ tells it
    that the background is spurious. An imperfect model can under- or over-represent the rare mode.
    Sample the base model (DDIM, plain conditional, $s = 1$) and read its images:
    """),
    code("""
    t0 = time.time()
    base, base_ckpt = base_model()                  # from the run folder when tutorial 2 ran
    n = cfg.eval.n_per_class if FAST else 200
    kw = dict(diffusion_kwargs=cfg.diffusion.scheduler_kwargs(), num_classes=2,
              image_shape=(3, cfg.data.resolution, cfg.data.resolution), sampler="ddim",
              num_steps=cfg.eval.num_steps, seed=cfg.eval.seed, device=device)
    images, labels = generate(base, n_per_class=n, **kw)
    model_report, data_report = judge(images, labels), judge(data.images, data.labels)
    print(f"({time.time() - t0:.0f} s)")
    for name, r in (("training data", data_report), ("base model", model_report)):
        print(f"{name:>13}: Bias {r['bias']:.3f}, minority share disc {r['minority_share'][0]:.3f}, "
              f"square {r['minority_share'][1]:.3f}, fidelity {r['fidelity']:.3f}")

    order = []                                           # per class: 16 samples, sorted land first
    for c in range(2):
        idx = torch.arange(c * n, c * n + min(n, 16))
        order.append(idx[read_background(images[idx]).argsort(stable=True)])
    grid = image_grid(images[torch.cat(order)], nrow=min(n, 16))
    fig, ax = plt.subplots(figsize=(8, 1.6))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / 2 for i in range(2)], CLASS_NAMES)
    plt.show()
    """),
    md(r"""
    What to see: the base model draws the requested shape about three times in four (it is small and
    briefly trained), and almost always on the background the class has in the data: in the sorted rows,
    only a couple of discs on water and squares on land. Its Bias is close to the data's 0.9 (a little
    lower, with minority shares of about 0.1 rather than 0.05: an imperfect model blurs the pairing a
    little). Nobody put the bias in on purpose; it came with the data.

    ## Where in sampling the label pulls towards the majority

    Take the bias-conflicting training images (discs on water, squares on land), noise each to $x_t$, and
    let the model *finish* the image from there with DDIM (the reverse process started at $t$ instead of
    $T$), once with the true label $y$ and once with the null label $\varnothing$ ("no class"). How often
    does the finished image end up on the *majority* background of $y$, the wrong one for these images?
    """),
    code("""
    from invdiff_min.diffusion import make_sampler

    ddim = make_sampler("ddim", cfg.diffusion.scheduler_kwargs()).to(device)
    ddim.set_timesteps(4 if FAST else 20)                               # 999, 949, ..., 49
    minority = data.conflicting.nonzero().squeeze(1)
    x0, y = to_model_range(data.images[minority]).to(device), data.labels[minority].to(device)
    null = torch.full_like(y, base.null_label)
    starts = ddim.timesteps.flip(0).tolist()[1::2]                      # every other timestep, ascending
    flipped = {"label y": [], "null label": []}
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for t_start in starts:
        eps = torch.randn(x0.shape, generator=g).to(device)
        x_start = ddim.add_noise(x0, eps, torch.full((len(x0),), t_start, device=device))
        for name, lab in (("label y", y), ("null label", null)):
            x = x_start
            with torch.no_grad():
                for t in [t for t in ddim.timesteps.tolist() if t <= t_start]:   # DDIM steps from t_start down
                    x = ddim.step(base(x, torch.full((len(x),), t, device=device), lab), t, x)
            majority = read_background(from_model_range(x).cpu()) == data.labels[minority]
            flipped[name].append(float(majority.float().mean()))
    print(f"({time.time() - t0:.0f} s)")
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for name, v in flipped.items():
        ax.plot(starts, v, "o-", label=f"finished with the {name}")
    ax.set_xlabel("t the image was noised to")
    ax.set_ylabel("finished on the majority background")
    ax.set_title(f"{len(minority)} bias-conflicting training images", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    plt.show()
    """),
    md(r"""
    What to see: from images noised up to about $t = 400$ the model restores the true (minority)
    background whatever the label: the image still decides. Beyond about $t = 500$, more and more images
    come back on the majority background. Without a label that happens by chance, up to about half the
    time from pure noise; **with the label it happens far more often**, up to nearly always at
    $t = 999$. The gap between the curves, in the upper half of the range of $t$, is where the spurious
    correlation acts: the label, not the image, picks the background. Tutorial 4 measures this per image,
    as a loss, to find the minority without labels.

    ## Guidance amplifies it

    Tutorial 2 hinted that a larger classifier-free guidance scale $s$ pushes the background too:
    """),
    code("""
    scales = [1.0, 3.0] if FAST else [1.0, 1.5, 2.0, 3.0, 4.0]
    reports = [judge(*generate(base, n_per_class=n, guidance_scale=s, **kw)) for s in scales]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.plot(scales, [r["bias"] for r in reports], "o-", label="Bias")
    ax.plot(scales, [r["fidelity"] for r in reports], "s-", label="fidelity")
    ax.axhline(data_report["bias"], color="grey", ls="--", lw=0.8, label="Bias of the data")
    ax.set_xlabel("classifier-free guidance scale s")
    ax.set_ylim(0, 1.05)
    ax.legend()
    plt.show()
    for s, r in zip(scales, reports):
        print(f"s = {s}: Bias {r['bias']:.3f}, fidelity {r['fidelity']:.3f}")
    """),
    md(r"""
    What to see: already at $s = 1.5$ the Bias of the samples jumps past the Bias of the data to nearly 1
    (almost no sample on its minority background), while fidelity rises only slowly: guidance along
    $\varepsilon(y) - \varepsilon(\varnothing)$ strengthens every feature the label predicts, spurious ones
    included. At $s = 4$ the Bias drops back a little, not because the model became fair: its backgrounds
    drift to in-between teal colours that the data never had (tutorial 2), which the reader splits between
    land and water. A fix has to separate what the label *should*
    control (the shape) from what it merely co-occurs with (the background), without being told which is
    which. That is InvDiff: tutorial 4 finds the images the model gets wrong because of the correlation,
    tutorial 5 trains a guidance term on them.
    """),
]

# ----- 4. group inference -----------------------------------------------------------------------------------------
NB4 = [
    md(r"""
    # 4. Group inference: finding the minority without bias labels

    InvDiff never sees the background labels. Its stage B infers them: the frozen biased model denoises the
    bias-conflicting images (the minority) worse, because its label pulls them towards the majority
    background (tutorial 3, last figure). This notebook measures that signal, shows why the official
    recipe (one noise draw per image) barely finds it and what fixes it, and turns it into groups. It uses
    the base model of tutorial 2 (cached; trained here if missing) and takes a few minutes.

    The hidden labels are read only to *evaluate* (AUROC, colours of the plots), never to compute a loss or a
    group.
    """),
    SETUP,
    SHARED_RUN,
    code("""
    import time

    from invdiff_min.checkpoint import load_unet
    from invdiff_min.data import ATTRIBUTE_NAMES, CLASS_NAMES, make_dataset
    from invdiff_min.groups import (auto_t_window, class_topk_groups, group_report, loss_draws, normalize_by_t,
                                    official_groups)
    from invdiff_min.metrics import auroc
    from invdiff_min.scheduler import DDPMScheduler
    """ + PLOTTING),
    code("""
    base, base_ckpt = base_model()                  # from the run folder when tutorial 2 ran
    data = make_dataset(cfg.data, "train")
    scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
    minority = data.conflicting                                         # hidden: evaluation only
    cells = [f"{CLASS_NAMES[c]} on {ATTRIBUTE_NAMES[b]}" for c in range(2) for b in range(2)]
    T = scheduler.num_train_timesteps
    print(f"{len(data)} training images, {int(minority.sum())} of them bias-conflicting")
    """),
    md(r"""
    ## The per-sample loss, the official way

    For each training image $i$, the frozen model's denoising loss
    $$l_i = \big\lVert \varepsilon_\theta(x_t, t, y_i) - \varepsilon \big\rVert^2 / D, \qquad
      x_t = \sqrt{\bar\alpha_t}\,x_{0,i} + \sqrt{1-\bar\alpha_t}\,\varepsilon,$$
    with **one** draw of $t \sim \mathcal U\{0..T-1\}$ and $\varepsilon$ per image, as the official code does
    (which also compares the prediction with $x_0$ instead of $\varepsilon$, a bug; both are scored below).
    How well does $l_i$ rank the minority above the rest? AUROC: the probability that a random minority
    image has a higher loss than a random majority image (0.5 = no signal, 1 = perfect).
    """),
    code("""
    t0 = time.time()
    raw, t_raw = loss_draws(base, scheduler, data.images, data.labels, 1, (0, T), seed=0, device=device)
    raw_x0, _ = loss_draws(base, scheduler, data.images, data.labels, 1, (0, T), target="x0", seed=0, device=device)
    raw, t_raw, raw_x0 = raw[:, 0], t_raw[:, 0], raw_x0[:, 0]
    print(f"one draw, t uniform: AUROC {auroc(raw, minority):.3f} (eps target), {auroc(raw_x0, minority):.3f} "
          f"(x0 target, the official code)  ({time.time() - t0:.0f} s)")
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.scatter(t_raw[~minority], raw[~minority], s=3, c="grey", alpha=0.4, label="majority (hidden)")
    ax.scatter(t_raw[minority], raw[minority], s=8, c="red", label="minority (hidden)")
    ax.set_yscale("log")
    ax.set_xlabel("t of the draw")
    ax.set_ylabel("$l_i$")
    ax.legend()
    plt.show()
    """),
    md(r"""
    What to see: the loss spans two orders of magnitude and is set mostly by the $t$ each image happened
    to draw (at small $t$ the noise is faint and hard to pin down exactly, so the loss is high); the red
    minority points lie only slightly above the grey cloud. The AUROC is little better than chance with
    the $\varepsilon$ target and *below* chance with the official $x_0$ target: one draw with uniform $t$
    says little about the image.

    ## Three fixes (`groups.py`)

    1. **Compare like with like in $t$.** Divide each loss by the mean loss of all draws at the same $t$
       (`normalize_by_t`), and draw $t$ only from a window $[t_\text{lo}, t_\text{hi})$ where the bias acts.
    2. **Ask what the label costs.** Divide by the loss of the same model on the same $x_t$ under the null
       label, so that what makes an image hard regardless of its label (an unusual size or position)
       cancels:
       $$r_i = \frac{\lVert \varepsilon_\theta(x_t, t, y_i) - \varepsilon \rVert^2}
                    {\lVert \varepsilon_\theta(x_t, t, \varnothing) - \varepsilon \rVert^2}.$$
    3. **Average $M$ draws** of $(t, \varepsilon)$ per image.

    The window is chosen without bias labels (`auto_t_window`): the window of width 300 where the label
    changes the loss most, $\mathbb E\,\lvert \log r \rvert$ over a subset of images.
    """),
    code("""
    lc = cfg.losses
    window, effect = auto_t_window(base, scheduler, data.images, data.labels, num_draws=lc.auto_window_draws,
                                   max_samples=32 if FAST else lc.auto_window_samples, seed=lc.seed + 10_000,
                                   device=device)
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    ax.bar([f"{lo}-{hi}" for lo, hi in effect], list(effect.values()),
           color=["tab:orange" if w == window else "tab:blue" for w in effect])
    ax.set_ylabel("label effect E|log r|")
    ax.set_xlabel("t window")
    ax.tick_params(axis="x", labelsize=7)
    plt.show()
    print(f"chosen window: [{window[0]}, {window[1]})")
    """),
    md(r"""
    What to see: the label's effect on the loss is small everywhere (a few per cent), largest in the
    middle of the range (orange) and smallest at the largest $t$, where too little of the image is left
    for the label to be right or wrong about it. Tutorial 3 found the background being decided in the same
    range.

    Now $M$ draws in that window, the plain loss and the ratio on the *same* draws, and the AUROC of each
    variant as a function of how many draws are averaged:
    """),
    code("""
    M = 2 if FAST else 8
    t0 = time.time()
    plain, ts = loss_draws(base, scheduler, data.images, data.labels, M, window, seed=lc.seed, device=device)
    ratio, ts_r = loss_draws(base, scheduler, data.images, data.labels, M, window, seed=lc.seed, device=device,
                             reference="null")
    assert torch.equal(ts, ts_r)                                         # the same (t, eps) draws
    print(f"{M} draws x {len(data)} images, with and without the label ({time.time() - t0:.0f} s)")
    variants = {"plain loss": plain, "plain / mean at t": normalize_by_t(plain, ts),
                "ratio r / mean at t (ours)": normalize_by_t(ratio, ts)}
    ms = [m for m in (1, 2, 4, 8, 16) if m <= M]
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for name, draws in variants.items():
        ax.plot(ms, [auroc(draws[:, :m].mean(1), minority) for m in ms], "o-", label=name)
    ax.axhline(auroc(raw, minority), color="grey", ls="--", lw=0.8, label="official: 1 draw, t uniform")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draws averaged, M")
    ax.set_ylabel("AUROC for the hidden minority")
    ax.legend(fontsize=7)
    plt.show()
    losses = variants["ratio r / mean at t (ours)"].mean(1)                # l_i from here on
    print(f"ours, M = {M}: AUROC {auroc(losses, minority):.3f}; within each class "
          + ", ".join(f"{CLASS_NAMES[c]} {auroc(losses[data.labels == c], minority[data.labels == c]):.3f}"
                      for c in range(2)))
    """),
    md(r"""
    What to see: the plain loss, even drawn inside the window, is barely better than the official recipe
    (dashed line), and averaging draws helps slowly; dividing by the mean loss at each $t$ helps a little
    more. The ratio to the null-label loss is what makes the difference: it beats every other variant with
    a single draw, and with $M = 8$ draws it ranks the minority almost perfectly. Cancelling what makes an
    image hard for reasons other than its label matters more than anything else here.

    The same, as histograms coloured by the hidden (class, background) cell:
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
    for ax, (name, values, log) in zip(axes, [("official: 1 draw, t uniform", raw, True),
                                              (f"ours: {M} draws in [{window[0]}, {window[1]}), ratio / mean at t",
                                               losses, False)]):
        v = values.log10() if log else values
        bins = torch.linspace(float(v.min()), float(v.max()), 50).numpy()
        for cell in range(4):
            ax.hist(v[data.group == cell].numpy(), bins=bins, alpha=0.6, density=True, label=cells[cell])
        ax.set_xlabel("log10 loss" if log else "loss")
        ax.set_title(name, fontsize=8)
    axes[0].set_ylabel("density (per cell)")
    axes[1].legend(fontsize=7)
    plt.show()
    """),
    md(r"""
    What to see: on the left the four cells overlap completely. On the right the two minority cells (disc
    on water, square on land) sit to the right of their class's majority cell: they are the images the
    model finds hard *because of their label*.

    ## From losses to groups: "maximise $L_e$"

    InvDiff assigns each image a soft group, $W \in \mathbb R^{N\times G}$ with rows on the simplex, chosen
    to make the group risks as different as possible:
    $$R_g = \frac{\sum_i W_{ig}\, l_i}{\sum_i W_{ig}}, \qquad \max_W\ \mathrm{std}_g(R_g).$$
    * `official_groups`: the official optimiser: $W$ free, initialised $\mathcal U(0, 1)$, Adam (lr 0.01,
      500 steps) on $-\mathrm{std}_g R_g$, then clamp and renormalise rows; $G = 8$.
    * `class_topk_groups` (this project's default): within each class, the split into two groups that
      maximises $R_\text{high} - R_\text{low}$ for a given size $k$ is exactly the $k$ highest losses
      against the rest, so it is solved without an optimiser: the top 5% of each class form its "high-loss"
      group, giving $2 \times 2$ hard groups. Classes are kept apart so that one class being harder to
      denoise does not pass for bias.
    """),
    code("""
    gc = cfg.groups
    steps = 50 if FAST else 500
    groupings = {"official grouper, official loss": (official_groups(raw, 8, steps, seed=gc.seed), raw),
                 "official grouper, our loss": (official_groups(losses, 8, steps, seed=gc.seed), losses),
                 "class top-k, our loss": (class_topk_groups(losses, data.labels, 2, gc.top_fraction), losses)}
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), sharey=True)
    for ax, (name, (W, l)) in zip(axes, groupings.items()):
        rep = group_report(W, l, data.labels, minority, data.group)
        order = torch.tensor(rep.mean_loss).argsort()                     # groups by risk R_g, low to high
        size = torch.tensor(rep.sizes)[order]
        share = torch.tensor(rep.minority_share)[order]
        x = range(len(order))
        ax.bar(x, size * (1 - share), color="grey", label="majority (hidden)")
        ax.bar(x, size * share, bottom=size * (1 - share), color="red", label="minority (hidden)")
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xlabel("group, by risk $R_g$")
        ax.set_title(f"{name}\\nNMI with the hidden cells {rep.nmi:.2f}", fontsize=8)
    axes[0].set_ylabel("images (soft mass)")
    axes[0].legend(fontsize=7)
    plt.show()

    W = groupings["class top-k, our loss"][0]
    high = W[:, 1::2].sum(1) > 0.5                                       # in a class's high-loss group
    precision, recall = float(minority[high].float().mean()), float(high[minority].float().mean())
    print(f"class top-k: {int(high.sum())} images in the high-loss groups; {precision:.2f} of them are minority "
          f"(precision), and they hold {recall:.2f} of the minority (recall)")
    """),
    md(r"""
    What to see (the bars are on a log scale): on the official loss the official grouper's groups each hold
    a little of everything, and their NMI with the hidden (class, background) cells is near 0. Given our
    loss, the same grouper does put the minority into its highest-risk groups, but it also cuts the
    majority into several groups of arbitrary size that mix the classes, so its NMI stays low. The
    per-class top-k split on our loss puts 92 of the 100 minority images into the two small high-risk
    groups (red), which hold only 8 majority images: four groups that nearly equal the hidden cells. The 5%
    of `top_fraction` happens to equal the true minority rate of this dataset; on other data
    the rate is unknown, and a wrong guess trades precision against recall.

    `pipeline.compute_losses` and `pipeline.infer_groups` run exactly these steps for the pipeline (with the
    settings of `cfg.losses` and `cfg.groups`) and save $l_i$ and $W$ keyed by sample index. Tutorial 5
    trains the guidance head on those groups.
    """),
]

# ----- 5. invariant guidance --------------------------------------------------------------------------------------
NB5 = [
    md(r"""
    # 5. Invariant guidance: training the head with $L_e$, sampling with strength $w$

    InvDiff keeps the biased model $\varepsilon_\theta$ frozen and learns a small extra term $G_\psi$ so
    that the guided prediction does equally well on every inferred group. This notebook trains that head
    on the groups of tutorial 4, and, as references, on the hidden (oracle) groups and on no groups at
    all; then it sweeps the guidance strength $w$ and measures bias against fidelity. It trains three small
    heads and samples 13 times: several minutes on one CPU core (plus the base model, if tutorial 2 has
    not cached it).
    """),
    SETUP,
    SHARED_RUN,
    code("""
    import time

    from invdiff_min.checkpoint import load_tensors, load_unet, read_json
    from invdiff_min.data import CLASS_NAMES, make_dataset
    from invdiff_min.evaluate import generate, judge
    from invdiff_min.guidance import (GroupBatchSampler, GuidedModel, InvariantGuidance, head_size, invariant_loss,
                                      load_head)
    from invdiff_min.plots import image_grid
    """ + PLOTTING),
    md(r"""
    ## Stage B, as the pipeline runs it

    `pipeline.compute_losses` computes $l_i$ (the label/null-label loss ratio, $M$ draws in the label-free $t$
    window, normalised per $t$: tutorial 4) and `pipeline.infer_groups` the per-class top-5% groups. Both are
    saved in the run folder (and reused when they are already there).
    """),
    code("""
    t0 = time.time()
    base, base_ckpt = base_model()                  # from the run folder when tutorial 2 ran
    for stage in ("losses", "groups"):             # each stage is skipped when its files are complete
        pipeline.run(cfg, splits, run_dir, device, stage, base_path=base_ckpt, progress=False)
    report = read_json(run_dir / "groups.json")
    print(f"groups: sizes {[round(s) for s in report['sizes']]}, hidden minority share per group "
          f"{[round(m, 2) for m in report['minority_share']]}  ({time.time() - t0:.0f} s)")
    data = make_dataset(cfg.data, "train")
    """),
    md(r"""
    ## The head $G_\psi$ and the guided model

    $$\hat\varepsilon(x_t, t, y) = \varepsilon_\theta(x_t, t, y) + w\, G_\psi\big(x_t, t, \Phi(y)\big)$$
    $G_\psi$ is a small UNet built from the same blocks, with its own label embedding $\Phi(y)$ added to
    its time embedding. Its output convolution starts at zero, so at initialisation $\hat\varepsilon$ *is*
    the base model, for every $w$. The head adds nothing for the null label, so classifier-free guidance
    keeps its unconditional branch. (The official code instead uses a full copy of the UNet mixed as
    $0.5\,G + 0.5\,\varepsilon_\theta$; `HeadConfig.mode="mix"`.)
    """),
    code("""
    hc = cfg.head
    torch.manual_seed(0)
    head = InvariantGuidance.small(base.config, hc.block_out_channels, hc.layers_per_block, hc.attention_levels,
                                   hc.norm_num_groups).to(device)
    size = head_size(head, base)
    x = torch.randn(4, 3, cfg.data.resolution, cfg.data.resolution, device=device)
    t, y = torch.tensor([10, 300, 600, 900], device=device), torch.tensor([0, 1, 0, 1], device=device)
    with torch.no_grad():
        gap = (GuidedModel(base, head, strength=3.0)(x, t, y) - base(x, t, y)).abs().max()
    print(f"head: {size.head:,} parameters = {size.ratio:.0%} of the base's {size.base:,}; "
          f"untrained, guided minus base at w = 3: {float(gap):.1e}")
    """),
    md(r"""
    ## The objective: $L_e$ ("minimise $L_e$")

    With the per-sample losses of the *guided* model, $l_i = \lVert \hat\varepsilon(x_t, t, y_i) -
    \varepsilon \rVert^2 / D$, and the groups $W$ from stage B, per minibatch:
    $$R_g = \frac{\sum_i W_{ig}\, l_i}{\sum_i W_{ig}}, \qquad
      L_e = \frac1G \sum_g R_g + \lambda\, \mathrm{Var}_g(R_g)$$
    over the groups present in the batch (V-REx of Krueger et al. 2021 on the denoising loss;
    `guidance.invariant_loss`). The gradient reaching group $g$ is
    $\partial L_e / \partial R_g = \tfrac1G\big(1 + 2\lambda (R_g - \bar R)\big)$: groups the model does
    worse on than average get more weight, so the head is pushed to fix the minority first. A toy batch:
    two groups of four images, the second with higher losses.
    """),
    code("""
    toy_losses = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.6, 1.4, 1.5, 1.5], requires_grad=True)
    toy_weights = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)     # one-hot W: group 0, group 1
    for lam in (0.0, 1.0, 10.0):
        toy_losses.grad = None
        L_e, R = invariant_loss(toy_losses, toy_weights, lam)
        L_e.backward()
        L_e, R = L_e.detach(), R.detach()
        print(f"lambda = {lam:>4}: R = {[round(r, 2) for r in R.tolist()]}, L_e = {float(L_e):.3f}, "
              f"dL_e/dl_i group 0: {float(toy_losses.grad[0]):.3f}, group 1: {float(toy_losses.grad[4]):.3f}")
    """),
    md(r"""
    What to see: with $\lambda = 0$ every image gets the same gradient (it is the plain mean loss); with
    $\lambda = 1$ the high-loss group gets more than the other, and at $\lambda = 10$ the low-loss group's
    gradient turns negative (the objective would rather raise its loss than leave the groups unequal).

    ## Group-balanced minibatches

    An inferred minority group holds 5% of a class, 2.5% of the data: it appears less than once in a
    uniform batch of 32, so its $R_g$ is mostly missing or noise. `GroupBatchSampler` draws the same
    number of images from every group (and, with `paired_draws`, gives the $j$-th image of every group the
    same $(t, \varepsilon)$, so that $R_g - R_{g'}$ compares groups on equal noise):
    """),
    code("""
    W = load_tensors(run_dir / "groups.safetensors")["weights"]
    for mode in ("uniform", "balanced"):
        idx, slots = GroupBatchSampler(W, hc.batch_size, mode).sample(torch.Generator().manual_seed(0))
        print(f"{mode:>8} batch of {len(idx)}: images per inferred group {W[idx].sum(0).int().tolist()}, "
              f"of them hidden minority {int(data.conflicting[idx].sum())}")
    """),
    md(r"""
    ## Training three heads

    `pipeline.train_head` runs the loop: a balanced batch, paired $(t, \varepsilon)$ draws, $\hat\varepsilon$
    with $w = 1$, $L_e$, AdamW on $\psi$ only, an EMA of the head's weights for sampling. The same head
    and budget on three sets of groups:
    * **invdiff**: the inferred groups of stage B (label-free);
    * **oracle**: the hidden (class, background) cells: the upper bound, never label-free;
    * **uniform**: one group holding everything, so $L_e$ is the plain loss: a fine-tune of the head with
      no notion of groups, the control.
    """),
    code("""
    heads = {}
    fig, ax = plt.subplots(figsize=(5, 2.8))
    for name in ("invdiff", "oracle", "uniform"):
        t0 = time.time()
        w = pipeline.group_assignments(name, splits.train, pipeline.load_groups(run_dir))
        heads[name], ckpt = pipeline.train_head(cfg, splits.train, base, w, device, run_dir / name, progress=False)
        history = load_tensors(ckpt / "history.safetensors")["loss"]
        k = min(50, len(history))
        ax.plot(torch.nn.functional.avg_pool1d(history[None, None], k, stride=1)[0, 0], label=name)
        print(f"{name}: {hc.steps} steps in {time.time() - t0:.0f} s")
    ax.set_xlabel("step")
    ax.set_ylabel(f"$L_e$ (mean of {k} steps)")
    ax.legend()
    plt.show()
    """),
    md(r"""
    What to see: none of the curves falls visibly. $L_e$ swings with the $t$ of each batch, and the base
    model already denoises well: the head can only shave off the small part of the loss that depends on
    the group. The invdiff and oracle curves nearly coincide, because the inferred groups are nearly the
    hidden cells (tutorial 4) and both heads draw the same random batches. The uniform control's $L_e$ is
    the plain mean loss, without the variance term, so its level is not comparable.

    ## Sampling with strength $w$: the bias / fidelity trade-off

    The same seeds for every model; $w = 0$ is the base model, $w = 1$ the head as trained, $w > 1$
    extrapolates along $G_\psi$ without retraining.
    """),
    code("""
    strengths = [0.0, 1.0, 3.0] if FAST else [0.0, 1.0, 2.0, 3.0, 4.0]
    kw = dict(diffusion_kwargs=cfg.diffusion.scheduler_kwargs(), n_per_class=cfg.eval.n_per_class, num_classes=2,
              image_shape=(3, cfg.data.resolution, cfg.data.resolution), sampler="ddim",
              num_steps=cfg.eval.num_steps, seed=cfg.eval.seed, device=device)
    t0 = time.time()
    base_images, labels = generate(GuidedModel(base, None), **kw)
    results, images = {}, {}
    for name, head in heads.items():
        results[name] = [judge(base_images, labels)]
        for w in strengths[1:]:
            imgs, _ = generate(GuidedModel(base, head, w), **kw)
            results[name].append(judge(imgs, labels))
            images[name, w] = imgs
    print(f"{len(heads) * (len(strengths) - 1) + 1} x {2 * cfg.eval.n_per_class} samples in {time.time() - t0:.0f} s")
    print(f"{'model':>8} {'w':>4} {'Bias':>6} {'minority disc':>14} {'minority square':>16} {'fidelity':>9}")
    for name, rs in results.items():
        for w, r in zip(strengths, rs):
            shares = r["minority_share"]
            print(f"{name:>8} {w:4.1f} {r['bias']:6.3f} {shares[0]:14.3f} {shares[1]:16.3f} {r['fidelity']:9.3f}")

    fig, axes = plt.subplots(1, 3, figsize=(11, 2.9))
    for (name, rs), colour in zip(results.items(), ["tab:red", "tab:green", "tab:grey"]):
        axes[0].plot(strengths, [r["bias"] for r in rs], "o-", color=colour, label=name)
        axes[1].plot(strengths, [r["minority_share"][0] for r in rs], "o-", color=colour, label=f"{name}: disc")
        axes[1].plot(strengths, [r["minority_share"][1] for r in rs], "s--", color=colour, label=f"{name}: square")
        axes[2].plot([r["fidelity"] for r in rs], [r["bias"] for r in rs], "o-", color=colour, label=name)
        for w, r in zip(strengths, rs):
            axes[2].annotate(f"{w:g}", (r["fidelity"], r["bias"]), fontsize=7, xytext=(3, 3),
                             textcoords="offset points")
    axes[0].set_xlabel("guidance strength w")
    axes[0].set_ylabel("Bias (0 = balanced)")
    axes[1].set_xlabel("guidance strength w")
    axes[1].set_ylabel("minority share")
    axes[1].axhline(0.5, color="black", lw=0.6, ls=":")
    axes[2].set_xlabel("fidelity (requested shape)")
    axes[2].set_ylabel("Bias")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    plt.tight_layout()
    plt.show()
    """),
    md(r"""
    What to see: at $w = 1$, the head as trained, no head moves the Bias much at this small budget (600
    steps). Extrapolating along $G_\psi$ does: the InvDiff head (inferred groups) lowers the Bias from about
    0.8 to about 0.7 at $w = 3$ and about 0.5 at $w = 4$, close to the oracle head (hidden groups), while
    the uniform control, trained as long on the plain loss, stays near 0.8: the effect comes from the
    groups, not from extra training. The middle panel shows that the effect is one-sided: discs move to
    water (their minority share rises to 0.4-0.5), while squares stay on water (their minority share
    even falls a little). The heads have learned "more water" rather than "the other background"; the
    README reports the same for some head seeds of the larger `cpu` preset. Fidelity (right panel) stays
    between about 0.74 and 0.85 for every head and strength (the base: 0.82); with 200 samples per point,
    differences below about 0.06 are noise.
    """),
    code("""
    w_show = strengths[-1]
    rows, names = [], []
    n = cfg.eval.n_per_class
    for name, imgs in [("base", base_images)] + [(f"{h}, w={w_show:g}", images[h, w_show]) for h in heads]:
        for c in range(2):
            rows.append(imgs[c * n: c * n + 8])
            names.append(f"{name}: {CLASS_NAMES[c]}")
    grid = image_grid(torch.cat(rows), nrow=8)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names)
    plt.show()
    """),
    md(r"""
    What to see: the same seeds give the same layouts in every row (guidance shifts the images, it does not
    replace them). At $w = 4$ the InvDiff and oracle rows show several discs moved from land to water,
    with their shape and position kept; their squares look like the base's. The uniform control's rows
    differ from the base's only in details.

    **Next:** tutorial 6 runs the same pipeline from converted pretrained weights.
    """),
]

# ----- 6. converted pretrained weights ----------------------------------------------------------------------------
NB6 = [
    md(r"""
    # 6. Starting from converted pretrained weights, and running InvDiff on top

    In practice the biased model is rarely trained from scratch: InvDiff's paper starts from Stable
    Diffusion, and the natural starting point here is a pretrained DDPM in diffusers' format (a
    `UNet2DModel` folder such as `google/ddpm-cifar10-32`). This notebook walks that path:

    1. a diffusers checkpoint folder on disk;
    2. `python -m invdiff_min.convert SRC OUT`: our UNet with the same weights, checked numerically;
    3. stages B-D of InvDiff on top of the converted model;
    4. for an *unconditional* checkpoint (like `google/ddpm-cifar10-32`): `train.py --init-from OUT`, a
       class-conditional model that starts exactly at the pretrained one.

    Nothing is downloaded. The checkpoints here are stand-ins built on the spot with diffusers (installed
    with the test extra) from tutorial 2's model (cached, or trained now). Set the environment variable
    `INVDIFF_PRETRAINED` to a diffusers folder of an unconditional model (`config.json` and
    `diffusion_pytorch_model.safetensors`, or a pipeline folder with `unet/` and `scheduler/`) to use it in
    step 4. A few minutes on one CPU core, plus tutorial 2's model if it is not cached yet.
    """),
    SETUP,
    SHARED_RUN,
    code("""
    import shutil
    import time
    import warnings

    warnings.filterwarnings("ignore", message="IProgress not found")   # diffusers imports tqdm.auto
    import diffusers

    from invdiff_min import convert
    from invdiff_min.checkpoint import fingerprint, load_unet
    from invdiff_min.data import CLASS_NAMES
    from invdiff_min.evaluate import generate, judge
    from invdiff_min.guidance import GuidedModel, load_head
    from invdiff_min.plots import image_grid
    from invdiff_min.unet import UNet, count_parameters
    """ + PLOTTING + """
    work = Path(tempfile.mkdtemp(prefix="invdiff-tutorial6-"))         # everything this notebook writes
    print(f"working folder {work}")
    """),
    md(r"""
    ## 1. A diffusers checkpoint

    The stand-in is tutorial 2's biased class-conditional model saved as a diffusers `UNet2DModel` with
    `num_class_embeds = 3` (diffusers' class table; our last row is the null label) and a `DDPMScheduler`
    config: a pipeline folder as someone might publish it. Our module names are diffusers' names, so
    saving is a plain `load_state_dict` into a `UNet2DModel` of the same configuration; the configuration
    is the one place where the two libraries spell things differently.
    """),
    code("""
    _, base_ckpt = base_model()                     # tutorial 2's model, from the run folder
    ours, _, _ = load_unet(base_ckpt, "cpu")
    c = ours.config


    def as_diffusers(num_class_embeds):
        \"\"\"A UNet2DModel with the configuration of our UNet `c`.\"\"\"
        return diffusers.UNet2DModel(
            sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
            block_out_channels=c.block_out_channels, layers_per_block=c.layers_per_block,
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)],
            add_attention=c.mid_attention, attention_head_dim=c.attention_head_dim, norm_num_groups=c.norm_num_groups,
            norm_eps=c.norm_eps, downsample_padding=c.downsample_padding, flip_sin_to_cos=c.flip_sin_to_cos,
            freq_shift=c.freq_shift, time_embedding_dim=c.time_embed_dim, num_class_embeds=num_class_embeds).eval()


    def save_pipeline(folder, unet):
        unet.save_pretrained(folder / "unet")
        d = cfg.diffusion
        diffusers.DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_start=d.beta_start,
                                beta_end=d.beta_end, beta_schedule=d.beta_schedule, variance_type=d.variance_type,
                                clip_sample=d.clip_sample).save_pretrained(folder / "scheduler")


    src = work / "standin-class-conditional"
    reference = as_diffusers(num_class_embeds=c.num_classes + 1)
    reference.load_state_dict(ours.state_dict(), strict=True)
    save_pipeline(src, reference)
    for path in sorted(src.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(src)}  ({path.stat().st_size / 1024:.0f} KiB)")
    """),
    md(r"""
    ## 2. Convert

    `invdiff_min/convert.py` is a table of small rules: diffusers' `UNet2DModel` settings map to our
    `UNetConfig` fields (anything our UNet does not implement is refused by name), the module names are
    already ours (legacy attention names are renamed), the scheduler config gives the noise schedule, and
    everything ends in a strict `load_state_dict` and a numeric check of the written checkpoint. On the
    command line it is `python -m invdiff_min.convert SRC OUT`; from Python:
    """),
    code("""
    converted = work / "converted"
    convert.main([str(src), str(converted)])
    pretrained, state, ckpt = load_unet(converted, device, weights="model")
    side = pretrained.config.sample_size
    print(f"our UNet: {count_parameters(pretrained):,} parameters, {pretrained.config.num_classes} classes + the "
          f"null label; schedule {state['config']['diffusion']}")
    x = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 1])   # 2: the null label / diffusers' last row
    with torch.no_grad():
        diff = (pretrained(x.to(device), t.to(device), y.to(device)).cpu() - reference(x, t, class_labels=y).sample)
    print(f"max |ours - diffusers| on a random batch: {float(diff.abs().max()):.1e}")
    same = fingerprint(pretrained.state_dict()) == fingerprint(ours.state_dict())
    print(f"same weights as tutorial 2's model: {same}")
    """),
    md(r"""
    What to see: the converter reports the format and where the schedule came from, and its own reload
    check passes; our UNet and diffusers' give the same outputs (here exactly; in general up to float32
    rounding), so everything downstream runs on the function the checkpoint defines. The converted weights
    are bit-identical to tutorial 2's model (same fingerprint), as they should be after a round trip.

    ## 3. InvDiff on top of the converted model

    The stage functions take any checkpoint folder as the base model: per-sample losses and groups
    (tutorial 4), the guidance head (tutorial 5), then sampling with strength $w$. `train.py --base
    runs/converted` does the same from the command line.
    """),
    code("""
    run6 = work / "run"
    t0 = time.time()
    for stage in ("losses", "groups", "head"):
        pipeline.run(cfg, splits, run6, device, stage, base_path=ckpt, progress=False)
    print(f"stages B and C ({time.time() - t0:.0f} s)")
    head, _ = load_head(run6 / "invdiff", pretrained, device)
    ec = cfg.eval
    kw = dict(diffusion_kwargs=state["config"]["diffusion"], n_per_class=ec.n_per_class, num_classes=2,
              image_shape=(3, side, side), sampler="ddim", num_steps=ec.num_steps, seed=ec.seed, device=device)
    n = ec.n_per_class
    rows, names = [], []
    for name, model in [("converted (w = 0)", GuidedModel(pretrained, None))] + [
            (f"InvDiff, w = {w:g}", GuidedModel(pretrained, head, w)) for w in ((1.0,) if FAST else (2.0, 4.0))]:
        images, labels = generate(model, **kw)
        r = judge(images, labels)
        print(f"{name:>18}: Bias {r['bias']:.3f}, minority share disc {r['minority_share'][0]:.3f}, "
              f"square {r['minority_share'][1]:.3f}, fidelity {r['fidelity']:.3f}")
        for k in range(2):
            rows.append(images[k * n: k * n + 8])
            names.append(f"{name}: {CLASS_NAMES[k]}")
    grid = image_grid(torch.cat(rows), nrow=8)
    fig, ax = plt.subplots(figsize=(6, 0.75 * len(names)))
    ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * grid.shape[0] / len(names) for i in range(len(names))], names)
    plt.show()
    """),
    md(r"""
    What to see: the numbers and pictures of tutorial 5's InvDiff head: same weights, same groups, same
    seeds. The converted model is as biased as tutorial 2's (Bias about 0.8); the guided model moves discs to
    water at $w = 4$ (Bias about 0.5) and leaves the squares on water, with the same one-sided effect.

    ## 4. Unconditional checkpoints: `--init-from`

    Most pretrained DDPMs, `google/ddpm-cifar10-32` among them, are unconditional: they have no class
    embedding, and InvDiff needs a class-conditional base. `pipeline.apply_init_from` takes the converted
    model's architecture and schedule (and the built-in data at its resolution); `pipeline.init_from_converted`
    copies the weights and adds the class embedding $E[y]$ the model lacks, **initialised to zero**. So
    before any fine-tuning $\varepsilon_\theta(x_t, t, y) = \varepsilon_\text{pretrained}(x_t, t)$ for
    every label, the null label included. The stand-in below is the same network saved without its class
    embedding (or the checkpoint in `INVDIFF_PRETRAINED`):
    """),
    code("""
    PRETRAINED = os.environ.get("INVDIFF_PRETRAINED")
    if PRETRAINED:
        src_uncond = Path(PRETRAINED)
    else:
        src_uncond = work / "standin-unconditional"
        unconditional = as_diffusers(num_class_embeds=None)
        unconditional.load_state_dict({k: v for k, v in ours.state_dict().items()
                                       if not k.startswith("class_embedding")})
        save_pipeline(src_uncond, unconditional)
    converted_uncond = work / "converted-unconditional"
    convert.main([str(src_uncond), str(converted_uncond)])
    uncond, _, _ = load_unet(converted_uncond, device, weights="model")

    cfg6 = get_preset("tiny" if FAST else "cpu")
    pipeline.apply_init_from(cfg6, str(converted_uncond))                    # what --init-from does to the config
    conditional = UNet(cfg6.unet).to(device)
    pipeline.init_from_converted(conditional, str(converted_uncond))        # what train_base does to the weights
    side = cfg6.unet.sample_size
    x = torch.randn(3, 3, side, side, device=device)
    t = torch.tensor([50, 500, 950], device=device)
    with torch.no_grad():
        gaps = [float((conditional(x, t, torch.full((3,), label, device=device)) - uncond(x, t)).abs().max())
                for label in (0, 1, conditional.null_label)]
    print(f"max |class-conditional at step 0 - pretrained unconditional| for y = disc, square, null: {gaps}")
    """),
    md(r"""
    What to see: zeros. From here `pipeline.train_base` (with `cfg.train.init_from` set, as `--init-from` does)
    fine-tunes this model on the biased data with tutorial 2's loop, from that exact starting point, so
    that it learns to follow the labels (and, with them, the background); then stages B-D run as in
    section 3. The class embedding starts from zero and is learned slowly: in a side run with this
    stand-in, 400 fine-tuning steps were not enough for the samples to follow their labels (fidelity about
    0.5), so expect to need about as many steps as tutorial 2's training. That is why this notebook stops
    here. The commands:

    ```bash
    python -m invdiff_min.convert path/to/ddpm-cifar10-32 runs/cifar10-converted
    python train.py --init-from runs/cifar10-converted --out runs/cifar-invdiff
    ```
    """),
    code("""
    shutil.rmtree(work)                             # the stand-ins, the converted checkpoints, the run: all temporary
    """),
]

NOTEBOOKS = {
    "01_forward_process.ipynb": NB1,
    "02_unet_training_sampling.ipynb": NB2,
    "03_how_the_bias_gets_in.ipynb": NB3,
    "04_group_inference.ipynb": NB4,
    "05_invariant_guidance.ipynb": NB5,
    "06_pretrained_weights.ipynb": NB6,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=copy.deepcopy(cells))      # cells like SETUP are shared between notebooks
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def keep_outputs(nb: nbformat.NotebookNode, path: Path) -> str:
    """Copy the outputs of the notebook at `path` into `nb` when their code cells are the same, so that
    editing the prose needs no re-execution. Returns what happened, for the log."""
    if not path.exists():
        return "no outputs (run with --execute)"
    old = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    new = [c for c in nb.cells if c.cell_type == "code"]
    if not any(c.outputs for c in old):
        return "no outputs yet (run with --execute)"
    if [c.source for c in old] != [c.source for c in new]:
        return "code changed: outputs dropped, run with --execute"
    for cell, before in zip(new, old):
        cell.outputs, cell.execution_count = before.outputs, before.execution_count
    return "outputs kept"


def execute(nb: nbformat.NotebookNode) -> float:
    from nbclient import NotebookClient

    t0 = time.time()
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="execute the notebooks (normal mode) and keep outputs")
    p.add_argument("only", nargs="*", help="substrings of the notebook names to build (default: all)")
    args = p.parse_args(argv)
    if args.execute and os.environ.get("INVDIFF_FAST") == "1":
        raise SystemExit("error: unset INVDIFF_FAST: the committed outputs come from the normal mode")
    for name, cells in NOTEBOOKS.items():
        if args.only and not any(s in name for s in args.only):
            continue
        nb = build(name, cells)
        path = HERE / name
        if args.execute:
            msg = f", executed in {execute(nb):.0f} s"
        else:
            msg = f", {keep_outputs(nb, path)}"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB{msg})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
