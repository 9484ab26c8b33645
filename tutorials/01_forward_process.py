# %% [markdown]
# # 1. The forward process and the noise schedule
#
# A diffusion model learns to undo a fixed noising process. This notebook looks only at that process: how an
# image is noised, how fast (the schedule), and what the network is asked to predict. Everything here is
# closed-form; nothing is trained. It runs in seconds.
#
# The series is six notebooks, in order; all six took about 38 minutes of one core with `OMP_NUM_THREADS=1`
# (executed one after the other on a 2-core CPU shared with other jobs; the README lists each one's time). On
# one core, tutorial 2 trains the base model the later ones share (a few minutes), tutorial 5 trains four
# guidance heads at the library's default recipe (about 27 minutes, the longest step of the series),
# tutorial 6 trains one of them again and fine-tunes a model for a minute or two; the other
# notebooks take a few minutes or less, and each prints the time of its long steps. With
# `INVDIFF_FAST=1` (tiny data and step counts, pictures not meant to look like anything) all six run in
# under 2 minutes, which is what the tests do.
#
# Notation (Ho et al. 2020): $x_0$ a clean image in $[-1, 1]$, $t \in \{0, \dots, T-1\}$ with $T = 1000$,
# $\beta_t$ the variance of the noise added at step $t$, $\alpha_t = 1 - \beta_t$,
# $\bar\alpha_t = \prod_{s \le t} \alpha_s$ (`alphas_cumprod` in `invdiff_min/scheduler.py`).

# %%
from common import FAST

print(f"fast mode: {FAST}")

# %%
import torch
from einops import reduce, repeat

from invdiff_min.data import (ATTRIBUTE_NAMES, CLASS_NAMES, DataConfig, from_model_range, make_dataset,
                              read_background, read_shape, to_model_range)
from invdiff_min.plots import image_grid
from invdiff_min.scheduler import DDPMScheduler

import matplotlib.pyplot as plt

# %% [markdown]
# ## The data
#
# The built-in dataset (`invdiff_min/data.py`) draws a red-orange **disc** or **square** (the class $y$) on
# **land** (green blotches) or **water** (blue waves), the background $b$. In the training split 95% of
# discs are on land and 95% of squares on water: the background is a *spurious* attribute of the class,
# like the backgrounds of the Waterbirds benchmark. The model works on $x_0 \in [-1, 1]$
# (`to_model_range`). Below, the first eight training images: most show the majority pairing.

# %%
data = make_dataset(DataConfig(resolution=16, num_samples=200), "train")
x0 = to_model_range(data.images[:8])                            # (8, 3, 16, 16) in [-1, 1]
fig, axes = plt.subplots(1, 8, figsize=(8, 1.4))
for ax, img, y, b in zip(axes, data.images, data.labels, data.bias):
    ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(f"{CLASS_NAMES[y]}\non {ATTRIBUTE_NAMES[b]}", fontsize=8)
    ax.axis("off")
plt.show()
print(f"{int(data.conflicting.sum())} of {len(data)} training images are bias-conflicting (a disc on water "
      f"or a square on land)")

# %% [markdown]
# ## The noise schedule
#
# One forward step adds a little Gaussian noise and shrinks the signal so the variance stays 1:
# $$q(x_t \mid x_{t-1}) = \mathcal N\big(\sqrt{\alpha_t}\, x_{t-1},\ \beta_t I\big).$$
# Composing the steps gives the marginal in closed form, so any $x_t$ is one draw away from $x_0$:
# $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big), \qquad
#   x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \varepsilon,\quad \varepsilon \sim \mathcal N(0, I).$$
# Two schedules of $\beta_t$ (`make_betas`):
# * **linear** (Ho et al.): $\beta_t$ from $10^{-4}$ to $0.02$, the default of this project;
# * **cosine** (Nichol & Dhariwal 2021, `squaredcos_cap_v2`): $\bar\alpha_t = f(t)/f(0)$ with
#   $f(t) = \cos^2\!\big(\tfrac{t/T + s}{1 + s}\cdot\tfrac{\pi}{2}\big)$, $s = 0.008$.
#
# The signal-to-noise ratio $\mathrm{SNR}(t) = \bar\alpha_t / (1 - \bar\alpha_t)$ says how much of $x_0$
# is left in $x_t$.

# %%
schedules = {"linear": DDPMScheduler(beta_schedule="linear"),
             "cosine": DDPMScheduler(beta_schedule="squaredcos_cap_v2")}
t_axis = torch.arange(1000)
fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
for name, s in schedules.items():
    abar = s.alphas_cumprod
    axes[0].plot(t_axis, s.betas, label=name)
    axes[1].plot(t_axis, abar, label=name)
    axes[2].plot(t_axis, (abar / (1 - abar)).log10(), label=name)
for ax, title in zip(axes, [r"$\beta_t$", r"$\bar\alpha_t$", r"$\log_{10}\,\mathrm{SNR}(t)$"]):
    ax.set_title(title)
    ax.set_xlabel("t")
    ax.legend()
axes[0].set_ylim(0, 0.03)
plt.tight_layout()
plt.show()
for name, s in schedules.items():
    print(f"{name:>6}: abar_t at t = 100, 250, 500, 750: "
          + ", ".join(f"{float(s.alphas_cumprod[t]):.3f}" for t in (100, 250, 500, 750)))

# %% [markdown]
# What to see: with the linear schedule $\bar\alpha_t$ is already below 0.08 at $t = 500$ and near 0 from
# $t \approx 700$ on, so the last third of the steps see almost pure noise; the cosine schedule falls
# gently and nearly linearly in the middle ($\bar\alpha_{500} \approx 0.49$). The cosine schedule's $\beta_t$
# only caps $\beta_t$ at 0.999. Both $\log \mathrm{SNR}$ curves plunge in the last steps because
# $\bar\alpha_t \to 0$ as $t \to T$: there the image is almost all noise. The cap does not cause the plunge;
# it keeps $\bar\alpha_{T-1}$ above zero, so $\log \mathrm{SNR}$ stays finite.
#
# ## Noised images
#
# The same $x_0$ and the same $\varepsilon$, noised to several $t$ with `add_noise` (also called `q_sample`):

# %%
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

# %% [markdown]
# What to see: at $t = 250$ the object is still visible in $x_t$ under both schedules; at $t = 500$ the
# linear schedule's $x_t$ looks like pure noise to the eye, while the cosine schedule's still shows a
# trace. The rows of 4x4 block means (what a coarse look at the image sees; averaging 16 pixels divides
# the noise by 4) show the blue tint of the water at large $t$. Does coarse content (the background, the
# spurious attribute) survive to higher noise than fine detail (the shape)? If so it is decided early in
# sampling, at large $t$, and that range of $t$ is where tutorial 4 looks for the bias.
#
# The next cell measures both with the dataset's exact readers, applied to *noisy* images $x_t$ of 200
# images: `read_background` (is the mean blue of the non-object pixels above their mean green?) and
# `read_shape` (do the object pixels fill the corners of their bounding box?).

# %%
many = to_model_range(data.images)                               # (200, 3, 16, 16)
g = torch.Generator().manual_seed(1)
t_grid = list(range(0, 1000, 50 if FAST else 25))
fig, ax = plt.subplots(figsize=(5, 2.8))
for name, s in schedules.items():
    background, shape = [], []
    for t in t_grid:
        noise = torch.randn(many.shape, generator=g)
        x_t = from_model_range(s.add_noise(many, noise, torch.full((len(many),), t)))
        background.append(float((read_background(x_t) == data.bias).float().mean()))
        shape.append(float((read_shape(x_t) == data.labels).float().mean()))
    ax.plot(t_grid, background, label=f"{name}: background")
    ax.plot(t_grid, shape, ls=":", label=f"{name}: shape")
    for what, acc in (("background", background), ("shape", shape)):
        last = max([t for t, a in zip(t_grid, acc) if a >= 0.9], default=None)
        near_chance = min([t for t, a in zip(t_grid, acc) if a <= 0.6], default=None)
        print(f"{name}: {what} read correctly in >= 90% of images up to t = {last}; near chance (<= 60%) "
              + (f"from t = {near_chance}" if near_chance is not None else "at no t"))
ax.axhline(0.5, color="grey", lw=0.8, ls="--")
ax.set_xlabel("t")
ax.set_ylabel("read correctly")
ax.set_ylim(0.4, 1.02)
ax.legend()
plt.show()

# %% [markdown]
# What to see: the printed $t$ up to which each attribute is still read in 90% of the noisy images. The
# background survives to much larger $t$ than the shape under both schedules (575 against 125 under the
# linear schedule): coarse content is decided first when sampling runs from $t = T$ down. (The dashed line
# is chance, 0.5, for both readers: the shape reading is near it once the noise breaks up the object's
# pixels, from $t = 200$ under the linear schedule and $t = 400$ under the cosine one, while the background
# reading gets near chance only from $t = 800$ under the linear schedule, and at no $t$ under the cosine
# one.)
#
# ## Many small steps or one jump
#
# The closed form is exact: iterating $x_t = \sqrt{\alpha_t}\, x_{t-1} + \sqrt{\beta_t}\, z_t$ step by step
# gives the same distribution as one jump with $\bar\alpha_t$. Below, one image noised to $t = 300$ both
# ways, many times: the mean and standard deviation of $x_t$ per pixel, averaged over pixels.

# %%
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

# %% [markdown]
# What to see: the two rows agree with the expected values to about two decimals (the rest is sampling
# noise of the $n$ draws). Training never runs the chain: it draws $t$ and jumps.
#
# ## What the network predicts: $\varepsilon$
#
# Given $x_t$ and $t$, knowing the noise $\varepsilon$ is the same as knowing $x_0$:
# $$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\varepsilon}{\sqrt{\bar\alpha_t}} \qquad
#   (\texttt{predict\_x0}).$$
# So the network $\varepsilon_\theta(x_t, t, y)$ is trained to predict the noise, with the plain
# mean-squared error of Ho et al. (`diffusion.training_loss`):
# $$L_\text{simple} = \mathbb E_{x_0, y, t, \varepsilon}\,
#   \big\lVert \varepsilon - \varepsilon_\theta(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,
#   \ t,\ y) \big\rVert^2 .$$
# An error $\delta$ in $\hat\varepsilon$ becomes an error $\sqrt{(1 - \bar\alpha_t)/\bar\alpha_t}\;\delta
# = \delta / \sqrt{\mathrm{SNR}(t)}$ in $\hat x_0$. Below: $x_0$ recovered from the true $\varepsilon$
# (exact) and from $\varepsilon$ plus a small error, at three noise levels.

# %%
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
    titles += [f"x_t, t={t}", f"x0_hat, t={t}\nfrom eps + delta"]
fig, axes = plt.subplots(1, len(panels), figsize=(9, 1.7))
for ax, img, title in zip(axes, panels, titles):
    ax.imshow(img[0].permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.axis("off")
plt.show()

# %% [markdown]
# What to see: with the true noise the reconstruction is exact (errors from $10^{-7}$ to a few $10^{-6}$,
# float32 rounding). With a small error in $\hat\varepsilon$, the reconstruction is fine at $t = 100$,
# visibly noisy at $t = 500$ and lost at $t = 800$, matching $\delta/\sqrt{\mathrm{SNR}}$ (the printed
# error std against the prediction): errors are amplified at large $t$, and the raw per-sample loss is
# dominated by $t$ (tutorial 4 divides it out).
#
# ## Why samplers take many steps: the best one-jump guess is a blur
#
# Error amplification is not the main reason samplers take many small steps. Even a *perfect* denoiser
# predicts $\hat x_0 = \mathbb E[x_0 \mid x_t]$, the average of every clean image that could have produced
# $x_t$. On a training set $\{x^{(i)}\}$ that average is exact and computable:
# $$\mathbb E[x_0 \mid x_t] = \sum_i w_i\, x^{(i)}, \qquad
#   w_i \propto \exp\!\Big(-\frac{\lVert x_t - \sqrt{\bar\alpha_t}\, x^{(i)} \rVert^2}{2(1 - \bar\alpha_t)}\Big).$$
# At small $t$ one image dominates the weights; at large $t$ the weights spread over many images and the
# prediction is their blurry mean. One jump from pure noise therefore lands near the data mean; a sampler
# instead takes a small step towards that guess, adds back the right amount of noise, and asks again,
# so the guess sharpens as $t$ falls.

# %%
s = schedules["linear"]
train_x = to_model_range(data.images)                                 # (200, 3, 16, 16): the whole set
target = train_x[:1]                                                   # the image x_t is made from
eps = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
t_show = [50, 200, 400, 600, 800]
panels, titles = [from_model_range(target)], ["x_0"]
for t in t_show:
    abar = s.alphas_cumprod[t]
    x_t = s.add_noise(target, eps, torch.tensor([t]))
    logw = -(x_t - abar.sqrt() * train_x).pow(2).flatten(1).sum(1) / (2 * (1 - abar))   # (200,)
    w = logw.softmax(0)
    posterior_mean = torch.einsum("i,ichw->chw", w, train_x)[None]    # E[x0 | x_t] over the training set
    print(f"t = {t}: the largest weight {float(w.max()):.2f}; images holding 90% of the weight: "
          f"{int((w.sort(descending=True).values.cumsum(0) < 0.9).sum()) + 1} of {len(w)}")
    panels += [from_model_range(x_t), from_model_range(posterior_mean)]
    titles += [f"x_t\nt={t}", "E[x0|x_t]"]
grid = image_grid(torch.cat(panels), nrow=len(panels))               # one row: x_0, then (x_t, E) per t
fig, ax = plt.subplots(figsize=(11, 1.8))
ax.imshow(grid.numpy(), interpolation="nearest")
ax.set_xticks([(i + 0.5) * grid.shape[1] / len(titles) for i in range(len(titles))], titles, fontsize=7)
ax.set_yticks([])
plt.show()

# %% [markdown]
# What to see: while one training image holds most of the weight, $\mathbb E[x_0 \mid x_t]$ is that image;
# once the weight spreads over many images (the printed counts) it turns into a mixture of shapes and
# backgrounds. A model that is perfect at large $t$ can only predict such a mixture, so the detail has to
# come from many steps at smaller $t$.
#
# **Next:** tutorial 2 trains $\varepsilon_\theta$ on this data and samples from it.
