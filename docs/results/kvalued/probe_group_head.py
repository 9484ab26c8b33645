"""Probe (outside the library): a head conditioned on the inferred sub-group, instead of or beside the class.

    python docs/results/kvalued/probe_group_head.py RUN OUT HEAD_SEED W [W ...]   (RUN: a train.py run of shapes3/4
    with a label profile; writes OUT/head_sS.safetensors and OUT/report_sS.json; results in rule_label_topk.md and
    rule_class_group.md; a smoke run: STEPS=3 NPC=4 in the environment)

COND=group (default): Phi(g) over the class_label_topk groups (K*K of them, group g belongs to class g // K).
COND=class_group: Phi(y) + Phi'(g), Phi' zero-initialised, so the head starts as the class-conditioned one and
every class shares its own term. W_REST=1: the rest of each class sampled at strength 1, its sub-groups at w.
SAME_DRAWS=1: each w samples with the same sub-group draws. STRATIFIED=1: each class's sub-groups drawn in
equal numbers (a balanced list per class, shuffled, consumed chain by chain) instead of independently. Training as
train_head (balanced batches, paired draws, L_e, AdamW, EMA, the run's head recipe); sampling gives each sample one of
the K groups of the requested class (uniformly, or stratified), fixed over the chain."""
import copy, json, os, sys, time
from pathlib import Path

import torch

from invdiff_min import amp, pipeline
from invdiff_min.checkpoint import load_tensors, load_unet, read_json, save_tensors
from invdiff_min.config import RunConfig
from invdiff_min.data import load_splits, to_model_range
from invdiff_min.diffusion import denoising_loss, update_ema
from invdiff_min.evaluate import make_judge, sample_and_judge
from invdiff_min.groups import class_label_topk_groups
from invdiff_min.guidance import GroupBatchSampler, GuidedModel, InvariantGuidance, head_timesteps, invariant_loss
from invdiff_min.scheduler import DDPMScheduler

run, out, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
strengths = [float(s) for s in sys.argv[4:]] or [2.0]
cfg = RunConfig.from_dict(read_json(run / "config.json")["config"])
device = torch.device("cpu")
base, _, _ = load_unet(run, device)
base.requires_grad_(False).eval()
splits = load_splits(cfg.data)
data = splits.train
K = cfg.unet.num_classes
saved = load_tensors(run / "losses.safetensors")
W = class_label_topk_groups(saved["loss"], data.labels, saved["profile"], cfg.groups.top_fraction)   # (N, K*K)
G = W.shape[1]
group_of = W.argmax(1)
assert (group_of // K == data.labels).all()


COND = os.environ.get("COND", "group")
W_REST = float(os.environ["W_REST"]) if "W_REST" in os.environ else None
STRATIFIED = "STRATIFIED" in os.environ
assert COND in ("group", "class_group"), COND


class GroupHead(torch.nn.Module):
    """G_psi(x, t, Phi(g)) or G_psi(x, t, Phi(y) + Phi'(g)); `g` is set per batch (training) or drawn per chain
    from y (sampling)."""

    def __init__(self):
        super().__init__()
        net_cfg = copy.deepcopy(base.config)
        net_cfg.num_classes = G if COND == "group" else K
        h = cfg.head
        self.inner = InvariantGuidance.small(net_cfg, h.block_out_channels, h.layers_per_block, h.attention_levels,
                                             h.norm_num_groups)
        if COND == "class_group":
            self.phi_g = torch.nn.Embedding(G, self.inner.phi.embedding_dim)
            torch.nn.init.zeros_(self.phi_g.weight)
        self.g, self.last_t, self.gen, self.drawn = None, -1, torch.Generator().manual_seed(1234), []
        self.queue = None                    # STRATIFIED: per class, the sub-groups still to hand out

    def draw(self, y):
        """One of its class's K sub-groups for each sample (class labels y (B,); the null label K -> 0)."""
        real = y < K
        if not STRATIFIED:
            return torch.where(real, K * y.clamp(max=K - 1) + torch.randint(0, K, y.shape, generator=self.gen), 0)
        if self.queue is None:               # n_per_class per class, in equal numbers (+-1), shuffled
            n = how.n_per_class
            self.queue = [(K * c + torch.arange(n) % K)[torch.randperm(n, generator=self.gen)].tolist()
                          for c in range(K)]
        return torch.tensor([self.queue[c].pop() if c < K else 0 for c in y.tolist()])

    def cond(self, x, t, y):
        if COND == "group":
            return self.inner(x, t, self.g)
        return self.inner.net(x, t, cond_emb=self.inner.phi(y) + self.phi_g(self.g))

    def forward(self, x, t, y):
        if self.training:
            return self.cond(x, t, y)
        if int(t.max()) > self.last_t or self.g is None or len(self.g) != len(y):     # a new chain
            self.g = self.draw(y)
            self.drawn.append(self.g.clone())
        self.last_t = int(t.max())
        out = self.cond(x, t, y)
        if W_REST is not None:               # the rest of each class at strength W_REST, its sub-groups at w
            out = out * torch.where(self.g % K == 0, W_REST / self.w, 1.0).view(-1, 1, 1, 1).to(out.dtype)
        return out


h = cfg.head
torch.manual_seed(seed)
head = GroupHead()
ema = copy.deepcopy(head).requires_grad_(False)
opt = torch.optim.AdamW(head.parameters(), lr=h.lr)
scheduler = DDPMScheduler(**cfg.diffusion.scheduler_kwargs())
batches = GroupBatchSampler(W, h.batch_size, h.batch_sampling)
model = GuidedModel(base, head, strength=1.0, mode=h.mode, mix_ratio=h.mix_ratio)
scaler = amp.grad_scaler(device, cfg.train.precision)
ckpt = out / f"head_s{seed}.safetensors"
steps = int(os.environ.get("STEPS", h.steps))
t0 = time.time()
if ckpt.exists():
    ema.load_state_dict(load_tensors(ckpt))
else:
    head.train()
    for step in range(steps):
        g = pipeline.step_generator(h.seed + 7 + 1000 * seed, step)
        idx, slots = batches.sample(g)
        n_draws = int(slots.max()) + 1
        t = head_timesteps(n_draws, scheduler.num_train_timesteps, h.large_t_share, g)[slots]
        eps = torch.randn((n_draws, *data.images.shape[1:]), generator=g)[slots]
        x0 = to_model_range(data.images[idx])
        head.g = group_of[idx]
        with amp.autocast(device, cfg.train.precision):
            losses = denoising_loss(model, scheduler, x0, data.labels[idx], t, eps)
        loss, _ = invariant_loss(losses, W[idx], h.lam)
        opt.param_groups[0]["lr"] = pipeline.head_lr(h, step)
        amp.optimizer_step(loss, opt, head.parameters(), h.grad_clip, scaler)
        update_ema(ema, head, h.ema_decay)
        if step % 500 == 0:
            print(f"step {step} L_e {loss.item():.5f} ({time.time() - t0:.0f} s)", flush=True)
    save_tensors(ckpt, {k: v.contiguous() for k, v in ema.state_dict().items()})
print(f"trained in {time.time() - t0:.0f} s", flush=True)
ema.eval()
judge = make_judge(splits, run / "judges", device, cfg.eval.judge_steps)
how = pipeline.sample_settings(cfg, device, **({"n_per_class": int(os.environ["NPC"])} if "NPC" in os.environ else {}))
report = {}
for w in strengths:
    ema.g, ema.last_t, ema.drawn, ema.w, ema.queue = None, -1, [], w, None
    if "SAME_DRAWS" in os.environ:           # the same sub-group draws at every w (else they follow on)
        ema.gen = torch.Generator().manual_seed(1234)
    images, _, m = sample_and_judge(base, ema, w, judge, how, h.mode, h.mix_ratio)
    # does a sample take the value its drawn sub-group stands for? rows: class c, its sub-group j (0: the rest of
    # the class, 1 + i: the i-th other label); columns: the shares of the values read (unreadable left out)
    drawn, read = torch.cat(ema.drawn), judge.read_attribute(images)
    m["shares_by_drawn_group"] = [[[round(float((read[(drawn == K * c + j) & (read >= 0)] == v).float().mean()), 3)
                                    for v in range(K)] for j in range(K)] for c in range(K)]
    report[str(w)] = m
    shares = " ".join("/".join(f"{v:.2f}" for v in row) for row in m["attribute_share"])
    print(f"w={w} Bias {m['bias']:.3f} fidelity {m.get('fidelity', float('nan')):.3f} shares {shares} "
          f"unreadable {m.get('unreadable_attribute')}", flush=True)
(out / f"report_s{seed}.json").write_text(json.dumps(report, indent=2))
