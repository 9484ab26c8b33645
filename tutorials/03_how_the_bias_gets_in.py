# %% [markdown]
# # 3. How the bias gets in
#
# The training data pair each class with one background 95% of the time. This notebook measures that
# correlation in the data, samples the model trained on them (tutorial 2's base model, from the cache, or
# trained here if the cache is empty: a few minutes), measures the same correlation in its samples, and
# looks at *where* in the reverse process the class label pulls an image towards its usual background.

# %%
import torch

from common import FAST, TutorialRun

print(f"fast mode: {FAST}")
run = TutorialRun.start()                       # the small run shared by tutorials 2-6
cfg, run_dir, splits, device = run.cfg, run.run_dir, run.splits, run.device
base_model = run.base_model                     # tutorial 2's base model: trained once, then read

# %%
import time

from invdiff_min.data import ATTRIBUTE_NAMES, CLASS_NAMES, from_model_range, make_dataset, to_model_range
from invdiff_min.data import read_background, read_shape
from invdiff_min import InvDiffPipeline
from invdiff_min.evaluate import judge
from invdiff_min.metrics import attribute_counts, bias_score
from invdiff_min.plots import image_grid

import matplotlib.pyplot as plt

# %% [markdown]
# ## The bias of the data, and how it is measured
#
# The paper's **Bias** (`metrics.bias_score`): for each class (prompt) $p$ with attribute counts
# $C[p, a]$ over $K$ attribute values,
# $$\mathrm{bias}_p = \frac{\sum_{i<j} \lvert C[p,i] - C[p,j] \rvert}{\sum_a C[p,a]\;\cdot\; K(K-1)/2},
#   \qquad \mathrm{Bias} = \frac1P \sum_p \mathrm{bias}_p .$$
# With $K = 2$ backgrounds it is $\lvert$share on land $-$ share on water$\rvert$, averaged over the two
# classes: 0 when each class is split evenly, 1 when each class always has one background. The
# **minority share** of a class is the share of its images on the background it usually lacks.
#
# For generated images nobody knows $b$, so it is read off the pixels. On this dataset two exact rules do
# it (`read_background`: mean blue above mean green; `read_shape`: does the object fill the corners of its
# bounding box), so the measurement has no classifier error. First, check the readers against the hidden
# labels of the training data:

# %%
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

# %% [markdown]
# What to see: both readers agree with the hidden labels on every training image (1.000), and each class
# sits on its majority background 95% of the time (Bias 0.900); the balanced split has Bias 0.
#
# ## Why the model copies the bias
#
# A conditional diffusion model is trained to fit $p(x \mid y)$, and the data's $p(x \mid y)$ contains the
# correlation:
# $$p(x \mid y) = \sum_b p(b \mid y)\, p(x \mid y, b), \qquad p(b \ne y \mid y) = 0.05 .$$
# A *perfect* model therefore draws a disc on water 5% of the time: nothing in $L_\text{simple}$ tells it
# that the background is spurious. An imperfect model can under- or over-represent the rare mode.
# Sample the base model (DDIM, plain conditional, $s = 1$) and read its images:

# %%
t0 = time.time()
base, base_ckpt = base_model()                  # from the run folder when tutorial 2 ran
pipe = InvDiffPipeline.from_pretrained(base_ckpt, head=None, device=device)   # the base model alone
n = cfg.eval.n_per_class if FAST else 200
labels = torch.arange(2).repeat_interleave(n)   # n discs, then n squares

def draw(**options):
    """The same seeds every time: DDIM, the evaluation's step count."""
    return pipe(class_labels=labels, sampler="ddim", num_inference_steps=cfg.eval.num_steps,
                generator=torch.Generator().manual_seed(cfg.eval.seed), **options).images

images = draw()
model_report, data_report = judge(images, labels), judge(data.images, data.labels)
print(f"({time.time() - t0:.0f} s)")
for name, r in (("training data", data_report), ("base model", model_report)):
    print(f"{name:>13}: Bias {r['bias']:.3f}, minority share disc {r['minority_share'][0]:.3f}, "
          f"square {r['minority_share'][1]:.3f}, fidelity {r['fidelity']:.3f}")
drawn, background = read_shape(images), read_background(images)  # what each sample shows, read exactly
for c in range(2):                                   # the minority share counts every shape drawn
    print(f"requested {CLASS_NAMES[c]}s, drawn shape x background:")
    for s, shape_name in ((0, "disc"), (1, "square"), (-1, "no object")):
        counts = [int(((labels == c) & (drawn == s) & (background == b)).sum()) for b in range(2)]
        print(f"    drawn {shape_name:>9}: {ATTRIBUTE_NAMES[0]} {counts[0]:>3}, {ATTRIBUTE_NAMES[1]} {counts[1]:>3}")

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

# %% [markdown]
# What to see: the base model draws the requested shape about three times in four (it is small and
# briefly trained), and almost always on the background the class has in the data. In the sorted rows
# (land first), the right end of the disc row holds the discs drawn on water; the left end of the square
# row holds the samples requested as squares that came out on land, and most of those are drawn as discs
# (the land column of the squares' table; 16 of 23 when we ran it): the model produced the other class's
# shape together with that class's background. The minority share counts every sample of a class on its
# minority background, whatever shape it shows; the tables split each class by the shape actually drawn.
# They also show where the fidelity goes: nearly all the wrong shapes are squares drawn as discs, mostly
# on water (89 of 96 when we ran it). Its Bias is close to the data's 0.9 (a little lower: about 0.8 when
# we ran it, with minority shares of about 0.1 rather than 0.05). Nobody put the bias in on purpose; it
# came with the data.
#
# ## Where in sampling the label pulls towards the majority
#
# Take the bias-conflicting training images (discs on water, squares on land), noise each to $x_t$, and
# let the model *finish* the image from there with DDIM (the reverse process started at $t$ instead of
# $T$), once with the true label $y$ and once with the null label $\varnothing$ ("no class"). How often
# does the finished image end up on the *majority* background of $y$, the wrong one for these images?

# %%
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
for i, t_start in enumerate(starts):
    print(f"noised to t = {t_start:>3}: finished on the majority background with the label y "
          f"{flipped['label y'][i]:.2f}, with the null label {flipped['null label'][i]:.2f}")
fig, ax = plt.subplots(figsize=(5, 2.8))
for name, v in flipped.items():
    ax.plot(starts, v, "o-", label=f"finished with the {name}")
ax.set_xlabel("t the image was noised to")
ax.set_ylabel("finished on the majority background")
ax.set_title(f"{len(minority)} bias-conflicting training images", fontsize=9)
ax.set_ylim(-0.02, 1.02)
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# What to see (the printed rows): from images noised up to about $t = 500$ the model restores the true
# (minority) background whatever the label: the image still decides. From about $t = 600$ on, more and
# more images come back on the majority background. Without a label that happens by chance, up to about
# half the time from pure noise ($t = 999$); **with the label it happens far more often**, up to nearly
# always (about 0.95 at $t = 999$ when we ran it). The gap between the curves, in the upper half of the
# range of $t$, is where the spurious correlation acts: the label, not the image, picks the background.
# Tutorial 4 measures this per image, as a loss, to find the minority without labels.
#
# ## Guidance amplifies it
#
# Tutorial 2 hinted that a larger classifier-free guidance scale $s$ pushes the background too:

# %%
scales = [1.0, 3.0] if FAST else [1.0, 1.5, 2.0, 3.0, 4.0]
reports = [judge(draw(guidance_scale=s), labels) for s in scales]
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

# %% [markdown]
# What to see: already at $s = 1.5$ the Bias of the samples jumps past the Bias of the data to nearly 1
# (almost no sample on its minority background), while fidelity rises only slowly: guidance along
# $\varepsilon(y) - \varepsilon(\varnothing)$ strengthens every feature the label predicts, spurious ones
# included. At $s = 4$ the Bias drops back a little, not because the model became fair: its backgrounds
# drift to in-between teal colours that the data never had (tutorial 2), which the reader splits between
# land and water. A fix has to separate what the label *should*
# control (the shape) from what it merely co-occurs with (the background), without being told which is
# which. That is InvDiff: tutorial 4 finds the images the model gets wrong because of the correlation,
# tutorial 5 trains a guidance term on them.
