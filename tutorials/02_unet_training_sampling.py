# %% [markdown]
# # 2. The UNet, training a tiny class-conditional DDPM, DDPM vs DDIM, classifier-free guidance
#
# This notebook trains the noise predictor $\varepsilon_\theta(x_t, t, y)$ on the built-in biased dataset
# and samples from it. The model it trains is the *biased base model* that tutorials 3-6 use; it is
# cached in a temporary folder, so those tutorials start from it instead of training again. Training takes
# a few minutes on one CPU core (the rest of the notebook about two); the cache makes a second run
# instant.

# %%
import torch

from common import FAST, TutorialRun, show_rows

print(f"fast mode: {FAST}")
run = TutorialRun.start()                       # the small run shared by tutorials 2-6
cfg, run_dir, splits, device = run.cfg, run.run_dir, run.splits, run.device
base_model = run.base_model                     # tutorial 2's base model: trained once, then read

# %%
import time

from invdiff_min.checkpoint import load_tensors, load_unet
from invdiff_min.data import CLASS_NAMES, from_model_range, make_dataset, to_model_range
from invdiff_min.diffusion import drop_labels, lr_at, make_sampler, per_sample_mse, sample
from invdiff_min import InvDiffPipeline
from invdiff_min.evaluate import judge
from invdiff_min.plots import image_grid
from invdiff_min.scheduler import DDPMScheduler
from invdiff_min.unet import UNet, count_parameters, timestep_embedding

import matplotlib.pyplot as plt

# %% [markdown]
# ## The UNet
#
# `invdiff_min/unet.py` is the DDPM UNet of Ho et al. with diffusers' `UNet2DModel` module names (so
# pretrained weights load, tutorial 6): `conv_in`, `down_blocks` (ResNet blocks, then a stride-2
# convolution), `mid_block`, `up_blocks` (ResNet blocks on the upsampled features concatenated with the
# skip connections), `conv_norm_out`, `conv_out`. Every ResNet block adds the conditioning embedding
# $$e = \mathrm{MLP}\big(\mathrm{sinusoid}(t)\big) + E[y], \qquad
#   \mathrm{sinusoid}(t)_k = \big[\cos(t\,\omega_k),\ \sin(t\,\omega_k)\big],\quad
#   \omega_k = 10000^{-k/(d/2)},$$
# to its feature map. The class table $E$ has one row more than there are classes: label
# `num_classes` is the **null label** $\varnothing$ ("no class"), used by classifier-free guidance.
# The tutorials use a small model at 16x16 pixels:

# %%
torch.manual_seed(0)                            # the untrained weights below, the same on every run
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

# %% [markdown]
# What to see: the spatial size halves at each down level and doubles back on the way up, so the output
# has the shape of the input. In the sinusoid picture, each row is one frequency: the top rows (cosines)
# and the rows just below the middle (sines) oscillate fast in $t$, the others slowly, so nearby
# timesteps get similar codes and distant ones distinguishable codes.
#
# ## Training: $L_\text{simple}$ with label dropout
#
# One training step (Ho et al.; `diffusion.training_loss`): draw $t \sim \mathcal U\{0..T-1\}$ and
# $\varepsilon \sim \mathcal N(0, I)$ per image, noise $x_0$ to $x_t$, and regress the noise:
# $$L_\text{simple} = \frac1B \sum_i \big\lVert \varepsilon_i - \varepsilon_\theta(x_{t_i}, t_i, y'_i)
#   \big\rVert^2, \qquad y'_i = \begin{cases} \varnothing & \text{with probability } p_\text{uncond} \\
#   y_i & \text{otherwise}\end{cases}$$
# Dropping the label *per sample* ($p_\text{uncond} = 0.1$) trains the conditional and the unconditional
# model in one network, which classifier-free guidance needs.
#
# Where $L_\text{simple}$ comes from (Ho et al. 2020, Sec. 3): the model is trained by maximising the
# evidence lower bound (ELBO) on $\log p_\theta(x_0)$, which splits into one KL divergence per step,
# $\mathrm{KL}\big(q(x_{t-1} \mid x_t, x_0) \,\Vert\, p_\theta(x_{t-1} \mid x_t)\big)$, plus a prior term
# with no parameters and a decoder term at the last step. $q(x_{t-1} \mid x_t, x_0)$ is the Gaussian
# posterior of the forward process (written out under *Sampling* below); the model's step is a Gaussian
# with a fixed variance $\sigma_t^2$ (not learned), so each KL is, up to a constant, the squared distance
# between the two means divided by $2\sigma_t^2$. Writing the model's mean through a noise prediction,
# $\mu_\theta = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}}\,
# \varepsilon_\theta\big)$, turns it into a weighted noise regression, $\lambda_t \lVert \varepsilon -
# \varepsilon_\theta \rVert^2$ with $\lambda_t = \beta_t^2 / \big(2\sigma_t^2 \alpha_t (1 -
# \bar\alpha_t)\big)$ (their eq. 12). $L_\text{simple}$ (their eq. 14) drops the weights, $\lambda_t = 1$,
# which Ho et al. found to give better samples: relative to the ELBO it down-weights the small $t$ and so
# stresses the larger $t$, where the coarse content is decided. Here is one training step written out
# with the library's parts, on an untrained model:

# %%
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

# %% [markdown]
# `pipeline.train_base` runs this step (`training_loss`) in a loop with AdamW, a linear warm-up then cosine
# decay of the learning rate (`lr_at`), gradient clipping, and an exponential moving average of the
# weights, $\theta_\text{EMA} \leftarrow \mu\, \theta_\text{EMA} + (1 - \mu)\, \theta$ (`update_ema`),
# which is what samples. It writes checkpoints to the run folder; when the folder already holds the
# finished model (from an earlier run of this notebook) it returns at once.

# %%
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
axes[0].set_title(r"$L_\mathrm{simple}$")
axes[0].legend()
axes[1].plot([lr_at(s, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps) for s in range(cfg.train.steps)])
axes[1].set_xlabel("step")
axes[1].set_title("learning rate")
plt.tight_layout()
plt.show()
base, _, _ = load_unet(base_ckpt, device)                           # the EMA weights

# %% [markdown]
# What to see: the loss falls from about 1 (the untrained network) within the first couple of hundred
# steps, then creeps down; the per-step values stay noisy because every batch draws new $t$, and the
# loss of an image depends mostly on its $t$ (tutorial 1).
#
# ## Sampling: DDPM and DDIM
#
# Sampling runs the process backwards from $x_T \sim \mathcal N(0, I)$. Both samplers first estimate
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$ (clipped to $[-1, 1]$)
# and then step to the previous timestep $t'$ of their schedule:
# * **DDPM** (ancestral, Ho et al.): $x_{t'} \sim \mathcal N\big(\tilde\mu_t(x_t, \hat x_0),\ \tilde\beta_t I\big)$,
#   the Gaussian posterior $q(x_{t'} \mid x_t, x_0)$ with $\hat x_0$ plugged in: fresh noise at every step
#   (written out below);
# * **DDIM** (Song et al., $\eta = 0$): $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 +
#   \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon$, deterministic given $x_T$, and good with few steps.
#
# ### One DDPM step, written out
#
# Given $x_0$, one step of the forward process can be undone exactly: the posterior is Gaussian (Ho et
# al., eqs. 6-7),
# $$q(x_{t-1} \mid x_t, x_0) = \mathcal N\big(x_{t-1};\ \tilde\mu_t(x_t, x_0),\ \tilde\beta_t I\big),$$
# $$\tilde\mu_t(x_t, x_0) = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\, x_0 +
#   \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\, x_t, \qquad
#   \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\, \beta_t .$$
# The DDPM sampler (`DDPMScheduler.step`) puts the model's $\hat x_0$ in place of the unknown $x_0$ and draws
# $$x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sqrt{\tilde\beta_t}\, z, \qquad z \sim \mathcal N(0, I).$$
# The library's conventions: $\hat x_0$ is clipped to $[-1, 1]$ (`clip_sample=True` in `cfg.diffusion`);
# the variance is the posterior's $\tilde\beta_t$ (`variance_type="fixed_small"`; Ho et al. also tried
# $\beta_t$, `"fixed_large"`); $z$ is passed in as `variance_noise` (`diffusion.sample` draws it from its
# generator; `step` draws it itself when it is omitted); and the last step, $t = 0$, adds no noise and
# returns $\hat x_0$ (with $\bar\alpha_{-1} = 1$ the posterior mean is $\hat x_0$). When the sampler takes
# fewer than $T$ steps, $t - 1$ becomes the previous timestep $t'$ of its schedule and $\alpha_t$ becomes
# $\bar\alpha_t / \bar\alpha_{t'}$, the product of the $\alpha$'s it skips ($\beta_t = 1 - \alpha_t$). The
# library always computes $\alpha_t$ as that ratio, which for consecutive steps is $\alpha_t$ itself.
#
# The next cell computes the step by hand from the scheduler's tensors (`alphas_cumprod`) and compares it
# with the library's `step` on the same $x_t$ (two training images noised to $t$), the same
# $\hat\varepsilon$ (the trained model's) and the same $z$:

# %%
ddpm = make_sampler("ddpm", cfg.diffusion.scheduler_kwargs()).to(device)   # what sample() builds
ddpm.set_timesteps(ddpm.num_train_timesteps)                               # all T steps: t' = t - 1
g = torch.Generator().manual_seed(3)
x0_pair, y_pair = to_model_range(data.images[:2]).to(device), data.labels[:2].to(device)
for t in (999, 500, 20, 0):
    x_t = ddpm.add_noise(x0_pair, torch.randn(x0_pair.shape, generator=g).to(device), torch.tensor(t))
    with torch.no_grad():
        eps_hat = base(x_t, torch.full((2,), t, device=device), y_pair)
    z = torch.randn(x_t.shape, generator=g).to(device)
    library = ddpm.step(eps_hat, t, x_t, variance_noise=z)
    # by hand: Ho et al. eqs. 6-7 with x0_hat in place of x0
    abar_t = ddpm.alphas_cumprod[t]
    abar_prev = ddpm.alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, device=device)  # abar_{-1} = 1
    alpha_t = abar_t / abar_prev                                   # alpha_t (the skipped product when t' < t-1)
    beta_t = 1 - alpha_t
    x0_hat = ((x_t - (1 - abar_t).sqrt() * eps_hat) / abar_t.sqrt()).clamp(-1, 1)   # clip_sample
    coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)              # sqrt(abar_{t-1}) beta_t / (1 - abar_t)
    coef_xt = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)       # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)
    mu_tilde = coef_x0 * x0_hat + coef_xt * x_t
    beta_tilde = (1 - abar_prev) / (1 - abar_t) * beta_t            # (1 - abar_{t-1}) / (1 - abar_t) beta_t
    by_hand = mu_tilde + beta_tilde.sqrt() * z if t > 0 else mu_tilde   # no noise at t = 0
    print(f"t = {t:>3}: beta_t {float(beta_t):.2e}, beta~_t {float(beta_tilde):.2e}; max |by hand - step()| "
          f"{float((by_hand - library).abs().max()):.1e}, allclose: {torch.allclose(by_hand, library, atol=1e-6)}")

# %% [markdown]
# What to see: `allclose` is `True` at every $t$ and the largest difference is 0 (the hand computation
# repeats the library's float32 operations in the same order; another order could change the last
# float32 digits, which `atol` allows for): the library's step is these two formulas. $\tilde\beta_t$
# equals $\beta_t$ to the printed digits at large $t$ and falls below it only in the last steps (about 8%
# below at $t = 20$), where $x_t$ already pins $x_{t-1}$ down; at $t = 0$ it is 0 and the step returns
# $\hat x_0$.
#
# ### The reverse chain
#
# The whole DDPM chain, for four samples (two discs, two squares, one row each), from pure noise
# $x_T$ on the left to the sampler's output on the right, with the intermediate $x_t$ at a few $t$:

# %%
ddpm.set_timesteps(50 if FAST else ddpm.num_train_timesteps)
steps = ddpm.timesteps.tolist()
wanted = [999, 700, 500, 400, 300, 200, 100, 50]
shown = [min(steps, key=lambda s: abs(s - w)) for w in wanted]       # the nearest t the chain visits
y_chain = torch.tensor([0, 0, 1, 1], device=device)
g = torch.Generator().manual_seed(1)
x = torch.randn(len(y_chain), 3, cfg.data.resolution, cfg.data.resolution, generator=g).to(device)  # x_T
frames = []
with torch.no_grad():
    for t in steps:
        if t in shown:
            frames.append(from_model_range(x).cpu())                 # x_t, before the step at t
        eps_hat = base(x, torch.full((len(x),), t, device=device), y_chain)
        z = torch.randn(x.shape, generator=g).to(device) if t > 0 else None
        x = ddpm.step(eps_hat, t, x, variance_noise=z)
frames.append(from_model_range(x).cpu())                             # the output
grid = image_grid(torch.stack(frames, 1).flatten(0, 1), nrow=len(frames))   # row = sample, column = t
fig, ax = plt.subplots(figsize=(8, 3.6))
ax.imshow(grid.numpy(), interpolation="nearest")
ax.set_xticks([(i + 0.5) * grid.shape[1] / len(frames) for i in range(len(frames))],
              [f"t={t}" for t in shown] + ["output"], fontsize=7)
ax.set_yticks([(i + 0.5) * grid.shape[0] / len(y_chain) for i in range(len(y_chain))],
              [CLASS_NAMES[int(c)] for c in y_chain])
plt.show()

# %% [markdown]
# What to see: for most of the chain $x_t$ looks like noise, because under the linear schedule little of
# the image is left above $t \approx 500$ (tutorial 1). The background comes first: a green (land) or blue
# (water) tint shows through the noise by about $t = 300$, the object only by about $t = 100$, and the
# last steps remove the remaining noise. Coarse content is decided at large $t$, fine detail at small
# $t$, in the order tutorial 1 measured on noised training images. (Most samples end on the background
# their class has in the data, discs on land and squares on water: the bias, counted in tutorial 3.)
#
# ### DDPM against DDIM
#
# Both samplers run on the same trained network with any number of steps (`diffusion.sample`,
# `diffusion.make_sampler`). Below: the same starting noise $x_T$ for every row, 8 images per class, and
# the share of samples that show the requested shape (*fidelity*, read exactly by `read_shape`) over 32
# images per class.

# %%
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
show_rows(rows, names, 6)

# %% [markdown]
# What to see: every sampler draws mostly discs in the disc rows and squares in the square rows, mostly on
# the majority background (discs on land, squares on water: the bias, measured in tutorial 3). The DDIM
# rows start from the same $x_T$ and follow a deterministic path, so DDIM-10 gives nearly the same images
# as DDIM-50 (compare column by column) at a fifth of the cost. DDPM injects fresh noise at every step,
# so its images differ from DDIM's and between step counts. The fidelities (64 images per sampler, so
# about $\pm 0.06$ each) lie between about 0.6 and 0.8 (0.62 to 0.81 when we ran it): this small model,
# trained for minutes, often draws ragged shapes. Look for DDPM-1000 scoring below DDPM-50 (0.62 against
# 0.81 when we ran it), a gap larger than that noise. A
# likely cause, not measured here: ancestral sampling adds fresh noise at every step, and with 1000 steps
# the model's errors at small $t$ (where this small model is least accurate, on edges and corners) are
# applied 20 times as often, roughening exactly the corners `read_shape` looks at. The DDIM rows look
# grainier than DDPM's: DDIM's last step jumps from $t \approx T/n$ straight to $\hat x_0$, so whatever
# noise the network's $\hat\varepsilon$ misses at that level stays in the image, while DDPM's final steps
# at small $t$ take it out. DDIM with 20-25 steps is what the other tutorials use.
#
# ## What the model sees: $\hat x_0$ along the way
#
# At each step the sampler's current guess of the clean image is
# $\hat x_0(x_t) = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon_\theta(x_t, t, y))/\sqrt{\bar\alpha_t}$
# (`scheduler.predict_x0`). Here, for one training image noised to several $t$:

# %%
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

# %% [markdown]
# What to see: at $t = 100$ and $300$ the model's $\hat x_0$ is close to the original; at $t = 500$ it is
# a blurry guess, a smudge of the object's colour on a background colour. At $t = 700$ and $900$ the
# division by $\sqrt{\bar\alpha_t}$ amplifies the network's small errors in $\hat\varepsilon$ (tutorial 1)
# and $\hat x_0$ is mostly noise: one jump from there is useless, which is why the samplers above take
# many small steps, each trusting $\hat x_0$ only a little.
#
# ## Classifier-free guidance
#
# With the conditional and the unconditional model in one network, classifier-free guidance
# (Ho & Salimans 2022) mixes their predictions with a scale $s$:
# $$\hat\varepsilon = \varepsilon_\theta(x_t, t, \varnothing) + s\,\big(\varepsilon_\theta(x_t, t, y)
#   - \varepsilon_\theta(x_t, t, \varnothing)\big).$$
# $s = 0$ is the unconditional model, $s = 1$ the plain conditional model (one network call, the default
# everywhere in this project), $s > 1$ pushes further in the direction the label points, trading variety
# for fidelity to the label. In `sample` and `InvDiffPipeline` this is `guidance_scale`. Same seeds for every $s$:

# %%
scales = [0.0, 1.0, 3.0] if FAST else [0.0, 1.0, 2.0, 4.0]
n = 8 if FAST else 64
pipe = InvDiffPipeline(base, None, cfg.diffusion.scheduler_kwargs(), config=cfg.to_dict())   # the public API
labels = torch.arange(2).repeat_interleave(n)
rows, names = [], []
for s in scales:
    images = pipe(class_labels=labels, sampler="ddim", num_inference_steps=5 if FAST else 25, guidance_scale=s,
                  generator=torch.Generator().manual_seed(1)).images
    report = judge(images, labels)
    print(f"s = {s}: fidelity {report['fidelity']:.2f}, images on the minority background per class "
          f"(disc, square) {report['minority_share'][0]:.2f}, {report['minority_share'][1]:.2f}")
    rows += [images[:8], images[n:n + 8]]
    names += [f"s={s}: {CLASS_NAMES[0]}", f"s={s}: {CLASS_NAMES[1]}"]
show_rows(rows, names, 1.5 * len(scales))

# %% [markdown]
# What to see: at $s = 0$ the label is ignored, so both rows of a pair hold a mix of shapes and
# backgrounds and fidelity is about one half. At $s = 1$ the rows follow their class. At $s = 2$ fidelity
# rises a little and (nearly) every sample sits on its class's usual background (minority share 0.02 and 0.00
# when we ran it): the guidance direction $\varepsilon(y) - \varepsilon(\varnothing)$
# carries everything the label predicts, the spurious background included, so stronger guidance
# amplifies the bias. At $s = 4$ fidelity is highest, but many disc backgrounds have drifted to an
# in-between teal the data never had (the background reader splits those between land and water, hence
# the jump in the discs' minority share): large scales push the samples off the data. Tutorial 3
# measures the bias properly; tutorial 5 removes it with a different kind of guidance.
