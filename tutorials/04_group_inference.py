# %% [markdown]
# # 4. Group inference: finding the minority without bias labels
#
# InvDiff in four stages (the letters every tutorial and file of this project uses): **A** train the
# class-conditional base model $\varepsilon_\theta$ on the biased data (tutorial 2) and freeze it; **B**
# infer groups of training images from the frozen model's per-sample losses (this notebook); **C** train a
# small guidance head $G_\psi$ with the debiasing objective $L_e$ over those groups (tutorial 5); **D**
# sample with $\varepsilon_\theta + w\, G_\psi$.
#
# InvDiff never sees the background labels. Its stage B infers them: the frozen biased model denoises the
# bias-conflicting images (the minority) worse, because its label pulls them towards the majority
# background (tutorial 3, *Where in sampling the label pulls towards the majority*). This notebook
# measures that signal, shows why the official recipe (one noise draw per image) barely finds it and what
# fixes it, and turns it into groups. It uses the base model of tutorial 2 (cached; trained here if
# missing) and takes a few minutes.
#
# The hidden labels are read only to *evaluate* (AUROC, colours of the plots), never to compute a loss or a
# group. Wherever a plot splits the images by these hidden labels, red marks the minority (the
# bias-conflicting images) and grey the majority.

# %%
import torch

from common import FAST, TutorialRun

print(f"fast mode: {FAST}")
run = TutorialRun.start()                       # the small run shared by tutorials 2-6
cfg, run_dir, splits, device = run.cfg, run.run_dir, run.splits, run.device
base_model = run.base_model                     # tutorial 2's base model: trained once, then read

# %%
import time
from dataclasses import replace

from invdiff_min.data import ATTRIBUTE_NAMES, CLASS_NAMES, make_dataset
from invdiff_min.groups import (auto_t_window, class_topk_groups, group_report, loss_draws, normalize_by_t,
                                official_groups)
from invdiff_min.metrics import auroc, bias_score
from invdiff_min.scheduler import DDPMScheduler

import matplotlib.pyplot as plt

# %%
base, base_ckpt = base_model()                  # from the run folder when tutorial 2 ran
data = make_dataset(cfg.data, "train")
scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs()).to(device)
minority = data.conflicting                                         # hidden: evaluation only
cells = [f"{CLASS_NAMES[c]} on {ATTRIBUTE_NAMES[b]}" for c in range(2) for b in range(2)]
T = scheduler.num_train_timesteps
print(f"{len(data)} training images, {int(minority.sum())} of them bias-conflicting")

# %% [markdown]
# ## The per-sample loss, the official way
#
# For each training image $i$, the frozen model's denoising loss
# $$l_i = \big\lVert \varepsilon_\theta(x_t, t, y_i) - \varepsilon \big\rVert^2 / D, \qquad
#   x_t = \sqrt{\bar\alpha_t}\,x_{0,i} + \sqrt{1-\bar\alpha_t}\,\varepsilon,$$
# with **one** draw of $t \sim \mathcal U\{0..T-1\}$ and $\varepsilon$ per image, as the official code does
# (which also compares the prediction with $x_0$ instead of $\varepsilon$, a bug; both are scored below).
# How well does $l_i$ rank the minority above the rest? AUROC: the probability that a random minority
# image has a higher loss than a random majority image (0.5 = no signal, 1 = perfect).

# %%
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

# %% [markdown]
# What to see: the loss spans two orders of magnitude and is set mostly by the $t$ each image happened
# to draw (at small $t$ the noise is faint and hard to pin down exactly, so the loss is high); the red
# minority points lie only slightly above the grey cloud. The AUROC is little better than chance with
# the $\varepsilon$ target and *below* chance with the official $x_0$ target: one draw with uniform $t$
# says little about the image.
#
# ## Three fixes (`groups.py`)
#
# 1. **Compare like with like in $t$.** Divide each loss by the mean loss of all draws at the same $t$
#    (`normalize_by_t`), and draw $t$ only from a window $[t_\text{lo}, t_\text{hi})$ where the bias acts.
# 2. **Ask what the label costs.** Divide by the loss of the same model on the same $x_t$ under the null
#    label, so that what makes an image hard regardless of its label (an unusual size or position)
#    cancels:
#    $$r_i = \frac{\lVert \varepsilon_\theta(x_t, t, y_i) - \varepsilon \rVert^2}
#                 {\lVert \varepsilon_\theta(x_t, t, \varnothing) - \varepsilon \rVert^2}.$$
# 3. **Average $M$ draws** of $(t, \varepsilon)$ per image.
#
# The window is chosen without bias labels (`auto_t_window`): the window of width 300 where the label
# changes the loss most, $\mathbb E\,\lvert \log r \rvert$ over a subset of images.

# %%
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
print("label effect E|log r| per window: " + ", ".join(f"[{lo}, {hi}) {v:.3f}" for (lo, hi), v in effect.items()))
print(f"chosen window: [{window[0]}, {window[1]})")

# %% [markdown]
# What to see: the label's effect on the loss is small everywhere (a few per cent: the printed
# $\mathbb E\,\lvert \log r \rvert$ of 0.02 to 0.06), largest in the middle of the range (orange) and
# smallest at the largest $t$, where too little of the image is left for the label to be right or wrong
# about it. Tutorials 1, 3 and 4 agree on where the background is decided: between about $t = 500$, from
# where tutorial 3's two curves part (below it the noisy image fixes the background whatever the label),
# and about $t = 800$, from where tutorial 1 found the background no longer readable in $x_t$ (the shape
# is gone long before, from about $t = 200$); the window chosen here (printed above; $[400, 700)$ when we
# ran it) sits over the start of that range, where the label already weighs on the prediction and $x_t$
# still holds enough of the background for the label to be right or wrong about.
#
# Now $M$ draws in that window, the plain loss and the ratio on the *same* draws, and the AUROC of each
# variant as a function of how many draws are averaged:

# %%
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

# %% [markdown]
# What to see: the plain loss, even drawn inside the window, is barely better than the official recipe
# (dashed line), and averaging draws helps slowly; dividing by the mean loss at each $t$ helps a little
# more. The ratio to the null-label loss is what makes the difference: it beats every other variant with
# a single draw, and with $M = 8$ draws it ranks the minority almost perfectly. Cancelling what makes an
# image hard for reasons other than its label matters more than anything else here.
#
# The same, as histograms coloured by the hidden (class, background) cell:

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
for ax, (name, values, log) in zip(axes, [("official: 1 draw, t uniform", raw, True),
                                          (f"ours: {M} draws in [{window[0]}, {window[1]}), ratio / mean at t",
                                           losses, False)]):
    v = values.log10() if log else values
    bins = torch.linspace(float(v.min()), float(v.max()), 50).numpy()
    for cell in range(4):                                  # red: minority (hidden), grey: majority; discs filled
        conflicting = cell in (1, 2)                       # disc on water, square on land
        ax.hist(v[data.group == cell].numpy(), bins=bins, density=True, label=cells[cell],
                color=("tab:red" if conflicting else "grey"), histtype="stepfilled" if cell < 2 else "step",
                alpha=0.5 if cell < 2 else 1.0, lw=1.5)
    ax.set_xlabel("log10 loss" if log else "loss")
    ax.set_title(name, fontsize=8)
axes[0].set_ylabel("density (per cell)")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# What to see: on the left the four cells overlap completely. On the right the two minority cells (disc
# on water, square on land) sit to the right of their class's majority cell: they are the images the
# model finds hard *because of their label*.
#
# ## From losses to groups: the "max" of the max-min game
#
# The paper's picture (its Fig. 1) is a game over its debiasing objective $L_e$: stage B chooses groups
# that *maximise* the spread of the group risks, stage C trains a head that *minimises* $L_e$ (mean plus
# variance of the group risks) over those groups. Here, stage B: each image gets a soft group,
# $W \in \mathbb R^{N\times G}$ with rows on the simplex, chosen to make the group risks as different as
# possible:
# $$R_g = \frac{\sum_i W_{ig}\, l_i}{\sum_i W_{ig}}, \qquad \max_W\ \mathrm{std}_g(R_g).$$
# * `official_groups`: the official optimiser: $W$ free, initialised $\mathcal U(0, 1)$, Adam (lr 0.01,
#   500 steps) on $-\mathrm{std}_g(R_g) - w_\text{nz} \min_{i,g} W_{ig}\, l_i$, and after every step $W$
#   projected back (negative entries set to 0, rows renormalised to sum to 1); $G = 8$. The second term ($w_\text{nz} \in \{0, 3, 5\}$ in the released scripts) rewards keeping
#   every weighted loss away from zero; its default here is $w_\text{nz} = 0$, as in the runs below.
# * `class_topk_groups` (this project's default): within each class, the split into two groups that
#   maximises $R_\text{high} - R_\text{low}$ for a given size $k$ is exactly the $k$ highest losses
#   against the rest, so it is solved without an optimiser: the top 5% of each class form its "high-loss"
#   group, giving $2 \times 2$ hard groups. Classes are kept apart so that one class being harder to
#   denoise does not pass for bias.

# %%
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
    ax.set_title(f"{name}\nNMI with the hidden cells {rep.nmi:.2f}", fontsize=8)
axes[0].set_ylabel("images (soft mass)")
axes[0].legend(fontsize=7)
plt.show()

W = groupings["class top-k, our loss"][0]
high = W[:, 1::2].sum(1) > 0.5                                       # in a class's high-loss group
precision, recall = float(minority[high].float().mean()), float(high[minority].float().mean())
print(f"class top-k: {int(high.sum())} images in the high-loss groups; {precision:.2f} of them are minority "
      f"(precision), and they hold {recall:.2f} of the minority (recall)")

# %% [markdown]
# What to see (the bars are on a log scale): on the official loss the official grouper's groups each hold
# a little of everything, and their NMI with the hidden (class, background) cells is near 0. Given our
# loss, the same grouper does move the minority into its highest-risk groups, but those groups are large
# (about 200 images each when we ran it), mostly majority images, and every group mixes the classes, so
# its NMI stays low (0.08 when we ran it). The
# per-class top-k split on our loss puts most of the minority into the two small high-risk groups (red),
# and those groups hold few majority images: recall and precision both about 0.9 when we ran it (printed
# below the figure), four groups that nearly equal the hidden cells (NMI above 0.9). The 5% of
# `top_fraction` happens to equal the true minority rate of this dataset; on other data the rate is
# unknown, and a wrong guess trades precision against recall (the second exercise below).
#
# `pipeline.compute_losses` and `pipeline.infer_groups` run exactly these steps for the pipeline (with the
# settings of `cfg.losses` and `cfg.groups`) and save $l_i$ and $W$ keyed by sample index. Tutorial 5
# trains the guidance head on those groups.

# %% [markdown]
# ## Two exercises: change something and predict
#
# Each takes seconds and trains nothing. Write your prediction down before running the cell.
#
# **1. A weaker correlation.** The built-in data pair each class with its usual background in 95% of the
# training images (`DataConfig.aligned_fraction`). Build the training set with 80% and with 50% instead.
# For each: how many images are bias-conflicting, what is the Bias of the data, and, *if the per-sample
# loss ranked the minority perfectly* (the hidden label itself stands in for $l_i$ below), what precision and
# recall would the per-class top-5% groups reach?

# %%
for fraction in (0.95, 0.8, 0.5):
    d = make_dataset(replace(cfg.data, aligned_fraction=fraction), "train")
    perfect = d.conflicting.float()                                   # a loss that ranks every minority image first
    top = class_topk_groups(perfect, d.labels, 2, gc.top_fraction)[:, 1::2].sum(1) > 0.5
    precision, recall = float(d.conflicting[top].float().mean()), float(top[d.conflicting].float().mean())
    print(f"aligned {fraction:.2f}: {int(d.conflicting.sum()):>4} of {len(d)} bias-conflicting, Bias of the data "
          f"{bias_score(d.bias, d.labels, 2):.2f}; top {gc.top_fraction:.0%} per class under a perfect loss: "
          f"precision {precision:.2f}, recall {recall:.2f}")

# %% [markdown]
# What you should find: the minority is $1 - $ `aligned_fraction` of each class (100, 400 and 1,000 of the
# 2,000 images) and, with two backgrounds, the Bias of the data is $2 \cdot$ `aligned_fraction` $- 1$ (0.90,
# 0.60, 0.00). Even a perfect loss cannot put more than 5% of a class into a 5% group: the precision stays
# 1.00, but the recall falls to 0.25 at 80% and 0.10 at 50%, so stage C would up-weight only a quarter (a
# tenth) of the images it should. At 50% there is no majority to correct (Bias 0), and a model trained on
# such data would give the "high-loss" groups no bias to find. The share of the minority is exactly what
# InvDiff does not know, which is why `top_fraction` is a setting to check against the loss histogram, not
# a constant.
#
# **2. A wrong guess of the minority rate.** Keep the data and the losses $l_i$ computed above (the recipe
# that `pipeline.compute_losses` saves in the run folder's `losses.safetensors`), and re-split them with
# `top_fraction` 2%, 5%, 10% and 20% (`groups.class_topk_groups`, as `cfg.groups.top_fraction`). The true
# minority rate is 5% in each class. Predict the precision and recall of the high-loss groups for each.

# %%
for fraction in (0.02, 0.05, 0.1, 0.2):
    high = class_topk_groups(losses, data.labels, 2, fraction)[:, 1::2].sum(1) > 0.5
    print(f"top_fraction {fraction:.2f}: {int(high.sum()):>3} images in the high-loss groups, precision "
          f"{float(minority[high].float().mean()):.2f}, recall {float(high[minority].float().mean()):.2f}")

# %% [markdown]
# What you should find: the 5% row repeats the precision and recall printed above (about 0.9 each). The
# loss ranks the minority almost perfectly (AUROC near 0.99), so the high-loss groups fill up with minority
# images first: a guess below the true rate keeps the precision near 1.00 but catches only about
# `top_fraction` / 5% of the minority (recall about 0.4 at 2%), and a guess above it catches nearly all
# of the minority (recall near 1) while the groups fill up with majority images (precision about 0.5 at
# 10% and 0.25 at 20%, close to 5% / `top_fraction`). Too small a guess gives stage C too few minority
# images to balance on; too large a guess dilutes them with majority images, so the balanced batches of
# tutorial 5 draw the minority less often.
