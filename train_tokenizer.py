"""
Train a GigaTok tokenizer with the paper's full objective (arXiv 2504.08736, Sec. 3; the official trainer
tokenizer/tokenizer_image/vq/vq_train.py and its loss vq_loss.py), from a laptop toy run to torchrun on many
GPUs.

    python train_tokenizer.py                                   # the toy, on synthetic images (CPU ok)
    python train_tokenizer.py --size s-s --data /data/imagenet  # one GPU, the paper's S-S
    torchrun --nproc_per_node=8 train_tokenizer.py --size xl-xxl --data /data/imagenet/train

Re-running a command continues from <out-dir>/ckpt.pt (pass --fresh to start over). The plumbing this script
shares with the others lives in runtime.py (command line, processes, checkpoints, logs) and data.py (images).
"""
import dataclasses
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import model
import runtime
from model import LPIPS, TOKENIZER_PRESETS, PatchDiscriminator, Tokenizer


@dataclass
class TrainConfig:
    size: str = "toy"            # tokenizer preset (model.TOKENIZER_PRESETS): toy, s-s, s-b, s-l, b-l,
                                 # xl-xxl, *-2d
    data: str = "synthetic"      # "synthetic" (embedded, no download) or an ImageFolder root
                                 # (see data.ImageFolder)
    num_classes: int = 0         # use only the first N classes of the data (0 = all)
    per_class: int = 0           # use only the first M images of each class (0 = all)
    out_dir: str = ""            # "" = out/tokenizer-<size>; holds ckpt.pt, log.jsonl, recon-*.png
    fresh: bool = False          # start over even if out_dir holds a checkpoint (default: continue from it)
    init_from: str = ""          # a new run starts from these tokenizer weights (official GigaTok or ours;
                                 # same size)
    max_steps: int = -1          # optimizer steps; -1 = the preset's (paper: epochs * 1.28M / batch)
    batch_size: int = -1         # global batch (all processes and accumulation steps); -1 = the preset's
    grad_accum: int = 1          # micro-steps per optimizer step
                                 # (per-process micro-batch = batch / world / accum)
    lr: float = -1.0             # peak learning rate of both optimizers; -1 = the preset's (paper 1e-4)
    end_lr: float = -1.0         # cosine decay floor; -1 = the preset's (paper 1e-5)
    warmup: int = -1             # linear warmup steps from lr/100; -1 = the preset's (0, or 5000 for XL-XXL)
    weight_decay: float = 1e-4   # AdamW, on every parameter (official DDP trainer)
    beta1: float = 0.9           # AdamW betas (official 0.9, 0.95)
    beta2: float = 0.95
    grad_clip: float = 10.0      # max gradient norm, tokenizer and discriminator alike
    ema: float = -1.0            # decay of a moving average of the tokenizer's weights, which the pictures,
                                 # the held-out PSNR and the checkpoint's "ema" (what the other scripts load)
                                 # use; 0 = off; -1 = the preset's (paper 0: the official --ema, 0.9999, is
                                 # in no script)
    commit_weight: float = 0.25  # beta, the weight of the VQ commitment loss (official 0.25)
    entropy_weight: float = -1.0  # entropy loss weight; -1 = the preset's (0.005 for XL-XXL, Sec. 3.3)
    aux_loss_end: int = -1       # the shortcut reconstruction + feature loss run until this step;
                                 # -1 = preset's
    disc_start: int = -1         # step at which the PatchGAN starts; -1 = the preset's (paper 20k)
    disc_weight: float = 0.5     # g: weight of the hinge GAN terms, generator and discriminator
    perceptual_weight: float = -1.0  # LPIPS weight; -1 = the preset's (paper 1; toys 0); 0 = no LPIPS (its
                                     # VGG16 is not loaded)
    semantic_weight: float = -1.0    # weight of the semantic regularization (Sec. 3.2); -1 = the preset's
                                     # (paper 0.5; toys 0); 0 = no teacher (none is loaded)
    teacher: str = ""            # DINOv2 hub entry of the semantic regularization; "" = the preset's
                                 # (dinov2_vitb14; toys dinov2_vits14)
    teacher_repo: str = "facebookresearch/dinov2"  # torch.hub repo, or a local checkout (offline clusters)
    vgg_path: str = ""           # local VGG16 ImageNet state dict (torchvision's vgg16-397923af.pth);
                                 # "" = download
    lpips_lin_path: str = ""     # local LPIPS v0.1 vgg.pth linear heads; "" = download
    precision: str = "auto"      # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16", "fp16"
                                 # (GradScaler), "fp32" (bf16 on a CPU: one with native bf16, AVX-512 BF16
                                 # or AMX)
    compile: bool = False        # torch.compile the tokenizer
    fsdp: bool = False           # under torchrun: shard the tokenizer's weights, gradients and AdamW state
                                 # (FSDP2, one unit per transformer block and CNN level) instead of DDP; the
                                 # PatchGAN stays whole
    checkpointing: bool = False  # activation checkpointing: keep each block's input only, recompute it in
                                 # backward
    device: str = ""             # "" = cuda, else mps, else cpu
    num_workers: int = -1        # data-loading processes per GPU process; -1 = 6 on CUDA, 0 on CPU
    threads: int = 0             # torch CPU threads (0 = torch's default)
    seed: int = 0                # model init, data order and augmentation
    log_interval: int = -1       # steps between log lines; -1 = the preset's
    image_interval: int = -1     # steps between PNG grids of held-out reconstructions; -1 = the preset's
    ckpt_interval: int = -1      # steps between checkpoints (and at the end); -1 = the preset's
    eval_images: int = 500       # held-out images for the final PSNR and codebook usage
    plan: bool = False           # print the memory plan (bytes per process, counted on fake tensors) and
                                 # exit
    plan_world: int = 0          # processes to plan for; 0 = this run's (torchrun's, else 1)
    max_bad_steps: int = 5       # a non-finite loss or gradient skips its step; this many in a row stop the
                                 # run


# what the toys' training shares (ours): a small batch at a high lr, no shortcut losses or GAN, and neither
# LPIPS nor the teacher unless asked for (--perceptual-weight 1 --semantic-weight 0.5, the paper's weights),
# so that a laptop run is the same online and offline, with nothing to download; the small DINOv2 when a
# teacher is asked for
_TOY = dict(batch_size=16, warmup=50, aux_loss_end=0, disc_start=10 ** 9, lr=1e-3, end_lr=1e-4,
            log_interval=50, image_interval=250, ckpt_interval=250,
            perceptual_weight=0.0, semantic_weight=0.0, teacher="dinov2_vits14")

# Training defaults per preset (the official configs/vq/*.yaml and
# scripts/composite_cmd/train_vq_and_eval.sh): global batch, warmup, entropy weight, aux-loss end, disc start,
# and length (epochs of ImageNet's 1.28M images, as the official scripts count them:
# steps = epochs * 1.28M / batch). S-L has no official yaml: B-L's values. The 2D presets' lengths are not
# stated: those of their 1D twins.
TRAIN_PRESETS = {
    # batch, warmup, entropy, aux_end, disc_start, then epochs (the paper's presets) or steps (the toys)
    "s-s":    dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=100),
    "s-b":    dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=200),
    "s-l":    dict(batch_size=256, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=200),
    "b-l":    dict(batch_size=256, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=200),
    "xl-xxl": dict(batch_size=256, warmup=5000, entropy_weight=0.005, aux_loss_end=0, disc_start=20000,
                   epochs=300),
    "s-s-2d": dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=100),
    "s-b-2d": dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000,
                   epochs=200),
    "b-l-2d": dict(batch_size=256, warmup=0, entropy_weight=0.005, aux_loss_end=15000, disc_start=20000,
                   epochs=200),
    # ours: the 1D toy, as many steps as fit in about 10 minutes on 2 CPU cores; a stronger entropy loss than
    # the paper's, to use the whole small codebook; a cosine that ends higher, at 3e-4, with a moving average
    # of the weights (0.98, half-life ~34 steps) to evaluate, which smooths the noise of the larger late steps
    # (README "The 1D toy"; the measurements behind each choice in EXPERIMENTS.md)
    "toy":    dict(_TOY, entropy_weight=0.015, max_steps=1100, end_lr=3e-4, ema=0.98),
    # the 2D toy: the default toy before the 1D one (its figures in EXPERIMENTS.md)
    "toy-2d": dict(_TOY, entropy_weight=0.005, max_steps=450),
}
# the paper's training defaults (Sec. 3.2 for the semantic weight and teacher)
PAPER_DEFAULTS = dict(lr=1e-4, end_lr=1e-5, ema=0.0, log_interval=100, image_interval=2000,
                      ckpt_interval=5000, perceptual_weight=1.0, semantic_weight=0.5, teacher="dinov2_vitb14")
IMAGENET_TRAIN_IMAGES = 1_280_000  # 5000 * 256, the official scripts' epoch


def resolve(cfg):
    """cfg with every -1 / "" default filled from the preset's training defaults."""
    if cfg.size not in TRAIN_PRESETS:
        raise runtime.UserError(f"unknown --size {cfg.size!r}; known: {', '.join(TRAIN_PRESETS)}")
    p = {**PAPER_DEFAULTS, **TRAIN_PRESETS[cfg.size]}  # the preset's values win over the paper defaults
    if "epochs" in p:
        # e.g. S-S: 100 * 1.28M / 128 = 1.0M
        p["max_steps"] = p.pop("epochs") * IMAGENET_TRAIN_IMAGES // p["batch_size"]
    # only the fields left at "the preset's"
    fill = {k: v for k, v in p.items() if getattr(cfg, k) in (-1, "")}
    data = cfg.data if cfg.data == "synthetic" else os.path.abspath(cfg.data)  # as the checkpoint records it
    return dataclasses.replace(cfg, data=data, out_dir=cfg.out_dir or f"out/tokenizer-{cfg.size}", **fill)

def validate(cfg):
    """Every training field in its range, before anything starts (the flag, its value and what is valid)."""
    positive = "a number above 0"
    runtime.check(cfg, [
        (cfg.max_steps >= 0, "max_steps", "0 or more"), (cfg.batch_size >= 1, "batch_size", "1 or more"),
        (cfg.lr > 0, "lr", positive), (cfg.end_lr >= 0, "end_lr", "0 or more"),
        (cfg.warmup >= 0, "warmup", "0 or more"),
        (0 <= cfg.beta1 < 1, "beta1", "in [0, 1)"), (0 <= cfg.beta2 < 1, "beta2", "in [0, 1)"),
        (0 <= cfg.ema < 1, "ema", "in [0, 1)"),
        (cfg.grad_clip > 0, "grad_clip", positive), (cfg.weight_decay >= 0, "weight_decay", "0 or more"),
        *[(getattr(cfg, k) >= 0, k, "0 or more") for k in ("commit_weight", "entropy_weight", "disc_weight",
                                                            "perceptual_weight", "semantic_weight",
                                                            "num_classes", "per_class", "threads",
                                                            "max_bad_steps")],
        *[(getattr(cfg, k) >= 1, k, "1 or more") for k in ("log_interval", "image_interval", "ckpt_interval",
                                                            "eval_images")],
        (cfg.num_workers >= -1, "num_workers", "-1 (auto) or 0 or more"),
        (cfg.plan_world >= 0, "plan_world", "0 or more"),
        # --precision is checked by runtime.autocast_for
        (cfg.semantic_weight == 0 or TOKENIZER_PRESETS[cfg.size].teacher_dim > 0, "semantic_weight",
         f"0 for --size {cfg.size}, which has no semantic head")])
    return cfg


def datasets(cfg, device):
    """-> the training and held-out sets at the preset's resolution (the same classes and per-class subset),
    and 8 held-out images (8, 3, S, S) to show: the first 8, which interleave the classes (repeated if
    fewer)."""
    size = TOKENIZER_PRESETS[cfg.size].image_size
    train_set = data.make_dataset(cfg.data, "train", size, cfg.seed, cfg.num_classes, cfg.per_class)
    val_set = data.make_dataset(cfg.data, "val", size, cfg.seed, cfg.num_classes, cfg.per_class)
    return train_set, val_set, torch.stack([val_set[i % len(val_set)][0] for i in range(8)]).to(device)

# -----------------------------------------------------------------------------------------------------------
# The frozen helpers: the DINOv2 teacher (semantic regularization, Sec. 3.2) and the LPIPS network.

class Teacher(torch.nn.Module):
    """A frozen DINOv2 from torch.hub (github, or a local checkout with source='local'), fed as the official
    code does: [-1, 1] -> ImageNet normalization -> bicubic resize to grid * patch, so that its patch grid is
    the decoder's token grid. (B, 3, H, W) -> x_norm_patchtokens (B, grid*grid, dim)."""

    def __init__(self, name, repo, grid):
        super().__init__()
        local = os.path.isdir(repo)
        # a named branch: without one torch.hub asks GitHub for the default branch at every load, cached or
        # not (torch/hub.py)
        if not local and ":" not in repo:
            repo += ":main"
        # DINOv2's modules warn at import that xFormers is absent: three lines at every start, nothing to do
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="xFormers is not available")
            self.net = torch.hub.load(repo, name, source="local" if local else "github", **({} if local else
                                      dict(trust_repo=True, skip_validation=True)))
        self.net.eval().requires_grad_(False)
        self.grid, self.patch = grid, int(getattr(self.net, "patch_size", 14))
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode=True):  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        x = ((x + 1) / 2 - self.mean) / self.std                                  # [-1, 1] -> ImageNet stats
        # (B, 3, g*14, g*14): the patch grid is g x g
        x = F.interpolate(x, size=self.grid * self.patch, mode="bicubic", align_corners=False)
        return self.net.forward_features(x)["x_norm_patchtokens"].float()        # (B, grid*grid, dim)


def semantic_loss(student, teacher):
    """-mean over tokens and images of cos(student, teacher): not 1 - cos, as the official
    tokenizer/tokenizer_image/vq/vq_loss.py. (B, L, C) twice -> scalar"""
    return -F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def load_frozen(what, load, flags):
    """Load a frozen helper (the first process of each node first, so that a download happens once a node).
    A helper is loaded because its loss weight asks for it, so one that cannot be loaded in any process stops
    the run with a line that says how to fix it. flags: (the flags that give local files, the flag that opts
    out)."""
    def attempt():
        try:
            return load(), None
        except Exception as e:  # network, missing files, a broken checkout: all reported the same way
            return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0  # the first process of each node (torchrun's)
    if first:  # first: a download goes into the node's cache ($TORCH_HOME) once ...
        net, err = attempt()
    runtime.barrier()
    if not first:  # ... and the node's other processes then read it from there
        net, err = attempt()
    # every process trains with the helper or none does (their parameters and losses must be the same)
    if not runtime.everywhere(net is not None):
        net, err = None, err or "it could not be loaded in another process"
    if err:
        raise runtime.UserError(f"could not load {what}: {err}\nfix: give the machine network access, pass "
                                f"{flags[0]}, or train without it: {flags[1]}")
    return net


def build_models(cfg, device, rank, world):
    """-> the tokenizer, the discriminator, and the frozen teacher and LPIPS (None when their weight is 0)."""
    tcfg = TOKENIZER_PRESETS[cfg.size]
    torch.manual_seed(cfg.seed)  # the init is a function of the seed: every process builds the same model
    tok = runtime.build(lambda: Tokenizer(tcfg), cfg, world, rank, device)  # FSDP: in memory on rank 0 only
    disc = PatchDiscriminator().to(device)
    # rank 0's: elsewhere the RNG drew its init after a tokenizer on the meta device
    runtime.broadcast(disc.parameters())
    teacher = lpips = None
    if cfg.semantic_weight > 0:  # validate(): only a tokenizer with a semantic head gets here
        teacher = load_frozen(f"the DINOv2 teacher {cfg.teacher} from {cfg.teacher_repo}",
                              lambda: Teacher(cfg.teacher, cfg.teacher_repo, tcfg.grid).to(device),
                              ("--teacher-repo <a checkout of facebookresearch/dinov2, with the weights in "
                               "$TORCH_HOME/hub/checkpoints>", "--semantic-weight 0"))
    if cfg.perceptual_weight > 0:
        lpips = load_frozen("the LPIPS weights (VGG16 + linear heads)",
                            # train mode: dropout in its heads, as the official trainer
                            lambda: model.load_lpips(LPIPS(), cfg.vgg_path or None,
                                                     cfg.lpips_lin_path or None).to(device).train(),
                            ("--vgg-path and --lpips-lin-path (local files)", "--perceptual-weight 0"))
    return tok, disc, teacher, lpips


def optimizers(tok, disc, cfg, device, precision):
    """-> AdamW on every parameter (official DDP trainer) of the tokenizer and of the discriminator, each with
    its GradScaler (runtime.adamw); the moving average of the tokenizer's weights (None when off); and what a
    checkpoint holds. Made after FSDP, which replaces the parameters by their shards."""
    (opt, scaler), (opt_d, scaler_d) = (runtime.adamw(m.parameters(), cfg, device, precision)
                                        for m in (tok, disc))
    ema = runtime.EMA(tok, cfg.ema) if cfg.ema else None
    parts = dict(model=tok, discriminator=disc, optimizer=(tok, opt), optimizer_disc=(disc, opt_d),
                 scaler=scaler, scaler_disc=scaler_d, **(dict(ema=ema) if ema else {}))
    return opt, scaler, opt_d, scaler_d, ema, parts


def init_tokenizer(tok, path, master=True):
    """Fine-tuning: fill a new run's tokenizer from an official GigaTok or our checkpoint of the same
    architecture. A released checkpoint without the semantic head keeps this run's freshly initialized head
    (and says so)."""
    src = model.load_tokenizer(path).state_dict()
    mine = tok.state_dict()
    # released files may lack it
    fresh_head = [k for k in mine if k.startswith("decoder.semantic_head.") and k not in src]
    wrong = sorted(set(src) ^ (set(mine) - set(fresh_head))) + \
        [k for k in src if k in mine and src[k].shape != mine[k].shape]
    if wrong:
        raise runtime.UserError(f"--init-from {path}: its tokenizer does not fit --size's ({len(wrong)} "
                                f"tensors differ, first {wrong[0]}); pass the --size it was trained as")
    tok.load_state_dict({**mine, **src})  # strict: every tensor filled
    if master:
        print(f"initialized from {path}"
              + (" (semantic head absent there: freshly initialized)" if fresh_head else ""))


def summary(cfg, tok, disc, teacher, lpips, train_set, val_set, world, micro, device, precision, step):
    """The start-up lines: what trains, on what, how (the numbers a run's log should begin with), each short
    enough for a terminal: the parameters of the tokenizer's parts have a line of their own."""
    parts = dict(cnn_encoder=tok.cnn_encoder, encoder=tok.encoder, decoder=tok.decoder,
                 cnn_decoder=tok.cnn_decoder)
    count = runtime.count
    other = count(tok) - sum(count(m) for m in parts.values())
    teacher_said = "%s (%.1fM, frozen)" % (cfg.teacher, count(teacher) / 1e6) if teacher else "off"
    return "\n".join([
        f"tokenizer {cfg.size}: {count(tok) / 1e6:.2f}M params, discriminator {count(disc) / 1e6:.2f}M; "
        f"per part (the decoder with the semantic head):",
        "  " + ", ".join(f"{k} {count(m) / 1e6:.2f}M" for k, m in parts.items())
        + f", quantizer+projections {other / 1e6:.3f}M",
        f"data {cfg.data} ({train_set.layout}): {len(train_set)} training / {len(val_set)} held-out images "
        f"of {len(train_set.classes)} classes at {tok.cfg.image_size}px",
        f"{cfg.batch_size} images per step = {world} processes x {cfg.grad_accum} micro-steps x {micro}; "
        f"device {device}, {precision}",
        f"teacher: {teacher_said} (semantic weight {cfg.semantic_weight:g}); "
        f"LPIPS: {'on' if lpips else 'off'} (perceptual weight {cfg.perceptual_weight:g})",
        f"steps {step} -> {cfg.max_steps}, lr {cfg.lr:g} (warmup {cfg.warmup}, cosine to {cfg.end_lr:g})",
        f"weight average {cfg.ema or 'off'}, disc_start {cfg.disc_start}, aux_loss_end {cfg.aux_loss_end}"
        + (f"; resuming from step {step}" if step else "")])

# parameter counts of the DINOv2 teachers (ViT-S/B/L/g with patch 14), for the memory plan, which loads none
DINOV2_PARAMS = dict(dinov2_vits14=22.06e6, dinov2_vitb14=86.58e6, dinov2_vitl14=304.37e6,
                     dinov2_vitg14=1136.48e6)


def memory_plan(cfg, world, precision, with_teacher=True, with_lpips=True):
    """The memory per process of this run over `world` processes (runtime.memory_plan), from one forward and
    backward of a micro-batch on fake tensors with every loss term the run will use (the GAN's if it starts
    before max_steps, the shortcut's while step < aux_loss_end); the teacher's weights by its parameter count.
    with_teacher, with_lpips: False when the run goes without them (not loadable)."""
    tcfg, micro, gan = (TOKENIZER_PRESETS[cfg.size], runtime.micro_batch(cfg, world),
                        cfg.disc_start < cfg.max_steps)
    use_lpips = with_lpips and cfg.perceptual_weight > 0
    mode, (tok, disc, lpips) = runtime.fake_modules(lambda: (Tokenizer(tcfg), PatchDiscriminator(),
                                                             LPIPS() if use_lpips else None))
    # CPU autocast stands in for CUDA's (fake tensors: this CPU's own bf16 does not matter)
    autocast = runtime.autocast_for(precision, torch.device("cpu"), planning=True)[1]

    teacher = DINOV2_PARAMS.get(cfg.teacher, 0) if with_teacher and cfg.semantic_weight > 0 else 0
    # a stand-in for the frozen teacher's features (B, g*g, teacher dim), so that the semantic head and loss
    # count
    features = (lambda x: x.new_zeros(len(x), tcfg.grid ** 2, tcfg.teacher_dim)) if teacher else None

    def step():
        with autocast:
            x = torch.randn(micro, 3, tcfg.image_size, tcfg.image_size)
            t, _ = loss_terms(tok, x, features, lpips, disc, gan, cfg.aux_loss_end > 0,
                              cfg.entropy_weight > 0)
            return sum(t.values())
    shards = world if cfg.fsdp else 1  # the average is kept as each process's shard of the weights
    others = [("discriminator", runtime.count(disc), gan), ("LPIPS (frozen)", runtime.count(lpips), False),
              (f"teacher {cfg.teacher} (frozen)", teacher, False),
              ("weight average (EMA, fp32)", runtime.count(tok) / shards if cfg.ema else 0, False)]
    plan = runtime.memory_plan(mode, tok, step, world, cfg.fsdp, cfg.checkpointing, precision, micro,
                               [o for o in others if o[1]])
    return runtime.describe_plan(plan, world, cfg.fsdp, precision)


# -----------------------------------------------------------------------------------------------------------
# The loss (the official tokenizer/tokenizer_image/vq/vq_loss.py): the tokenizer returns raw pieces, the loop
# weighs them.

def loss_terms(tok, x, teacher, lpips, disc, gan, early, entropy):
    """The unweighted terms of the generator loss for images x (B, 3, H, W), and the reconstructions they
    judge: x_hat and, early on (step < aux_loss_end), also the CNN-only shortcut x_hat_dir."""
    t_feat = teacher(x) if teacher is not None else None                  # (B, g*g, teacher dim)
    # no teacher: no semantic head
    recon, aux = tok(x, shortcut=early, entropy=entropy, semantic=teacher is not None)
    recons = [recon] + ([aux["shortcut"]] if early else [])  # every reconstruction term sums over these
    disc.requires_grad_(False)                                            # D is a fixed critic in the G step
    zero = x.new_zeros(())
    terms = dict(
        mse=sum(F.mse_loss(r.float(), x) for r in recons),
        lpips=sum(lpips(x, r).mean() for r in recons) if lpips is not None else zero,
        gan=sum(-disc(r).float().mean() for r in recons) if gan else zero,  # the hinge generator term
        codebook=aux["codebook"], commitment=aux["commitment"], entropy=aux["entropy"],
        # MSE(transformer output, CNN features)
        feat=aux["feat_rec"] if early else zero,
        semantic=semantic_loss(aux["sem_feat"], t_feat) if t_feat is not None else zero)
    return terms, recons


def discriminator_loss(disc, x, recons, g):
    """L_D = g * 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), the hinge loss on the detached
    recons."""
    disc.requires_grad_(True)
    real = disc(x).float()                                      # (B, 1, 30, 30) patch logits at 256²
    return g * sum(0.5 * (F.relu(1 - real).mean() + F.relu(1 + disc(r.detach()).float()).mean())
                   for r in recons)

# -----------------------------------------------------------------------------------------------------------
# Held-out evaluation and pictures

@torch.no_grad()
def evaluate_held_out(tok, val_set, n, batch, rank, world, device):
    """Mean PSNR and codebook usage (distinct codes / K) over the first n held-out images, in eval mode,
    through the codes (encode -> decode), with PSNR on the uint8 values a PNG would hold, as evaluate.py
    measures it."""
    tok.eval()
    n = min(n, len(val_set))
    total = torch.zeros(2, device=device, dtype=torch.float64)              # (sum of PSNRs, images)
    # usage over the held-out set, not the training window: what the paper reports
    used = torch.zeros(tok.cfg.codebook_size, device=device)               # 1 where a code was assigned
    mine = list(range(rank, n, world))
    # as many batches on every process (ceil(n / world) images), since a sharded tokenizer gathers its weights
    # in each: a process short of images encodes a stand-in that is not counted
    for s in range(0, -(-n // world), batch):
        idx = mine[s:s + batch]
        x = torch.stack([val_set[i][0] for i in idx or [0]]).to(device)     # (B, 3, S, S) center crops
        codes = tok.encode(x)                                               # (B, N)
        recon = tok.decode(codes).float()
        if idx:
            psnrs = data.psnr(data.pixel_values(recon), data.pixel_values(x))
            total += torch.tensor([psnrs.sum(), len(x)], dtype=torch.float64, device=device)
            used[codes.flatten().unique()] = 1
    runtime.all_reduce(total)
    runtime.all_reduce(used, "max")
    tok.train()
    return (total[0] / total[1]).item(), used.mean().item()


def show(tok, shown, val_set, step, cfg, log, rank, world, device):
    """Every image_interval steps: held-out originals over their reconstructions (recon-<step>.png), and,
    before the last step, the PSNR over 100 held-out images (the final one, over eval_images, follows the
    loop)."""
    save_grid(tok, shown, os.path.join(cfg.out_dir, f"recon-{step:07d}.png"), rank == 0)
    if step < cfg.max_steps:
        log(step, val_psnr_100=evaluate_held_out(tok, val_set, 100, 32, rank, world, device)[0])


def final_report(tok, val_set, step, cfg, log, ckpt_path, rank, world, device):
    """The run's last line: the PSNR and codebook usage over eval_images held-out images, logged and said."""
    val_psnr, usage = evaluate_held_out(tok, val_set, cfg.eval_images, 32, rank, world, device)
    log(step, val_psnr=val_psnr, val_usage=usage)
    log.say(f"held-out PSNR {val_psnr:.2f} dB, codebook usage {100 * usage:.1f}% over "
            f"{min(cfg.eval_images, len(val_set))} images; checkpoint {ckpt_path}")
    return val_psnr, usage


@torch.no_grad()
def save_grid(tok, x, path, master=True):
    """PNG: held-out originals (top row) over their reconstructions (bottom row). Every process reconstructs
    (a sharded tokenizer needs them all), the main process writes."""
    tok.eval()
    rec = tok.decode(tok.encode(x)).float()
    tok.train()
    if not master:
        return
    grid = data.image_grid([data.to_uint8(x), data.to_uint8(rec)])                 # (2H, n*W, 3)
    if x.shape[-1] < 128:                                                          # small images: enlarge 2x
        grid = grid.repeat(2, 0).repeat(2, 1)
    Image.fromarray(grid).save(path)

# -----------------------------------------------------------------------------------------------------------
# Training

def main(cfg: TrainConfig):
    cfg = validate(resolve(cfg))  # every flag checked before anything is loaded
    if cfg.plan:  # the memory plan alone: no processes, no models
        return runtime.plan_only(cfg, lambda world, precision: memory_plan(cfg, world, precision))
    rank, world, device = runtime.setup(cfg, tf32=True)   # TF32 on CUDA, as the official trainer
    master = rank == 0
    micro = runtime.micro_batch(cfg, world)
    precision, autocast = runtime.autocast_for(cfg.precision, device)

    # 1. data, models, optimizers, and the checkpoint to continue from
    train_set, val_set, shown = datasets(cfg, device)
    tok, disc, teacher, lpips = build_models(cfg, device, rank, world)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    resuming = runtime.on_rank0(os.path.exists(ckpt_path)) and not cfg.fresh  # one decision for all processes
    if cfg.init_from and not resuming:
        init_tokenizer(tok, cfg.init_from, master)
    # find_unused: the semantic head and the shortcut are idle in some steps
    train = runtime.wrap(tok, cfg, world, device, precision, find_unused=True)
    opt, scaler, opt_d, scaler_d, ema, parts = optimizers(tok, disc, cfg, device, precision)  # after FSDP
    averaged = ema.applied if ema else nullcontext  # the weights to show, to measure and to hand on
    # what it learns from, which train_ar.py, sample.py and evaluate.py take as theirs: another data set in
    # the same folder is another run, refused on resume as another architecture is
    dataset = dict(data=cfg.data, num_classes=cfg.num_classes, per_class=cfg.per_class)
    identity = dict(tokenizer=asdict(tok.cfg), dataset=dataset)
    step = runtime.resume(ckpt_path, parts, identity, asdict(cfg), master) if resuming else 0
    config = dict(tokenizer=asdict(tok.cfg), dataset=dataset, train=asdict(cfg), classes=train_set.classes,
                  names=getattr(train_set, "names", train_set.classes))  # plain dicts; names: "goldfish", ...
    save = lambda: runtime.save(ckpt_path, parts, step=step, images_seen=step * cfg.batch_size, config=config)
    log = runtime.Logger(cfg.out_dir, master)
    log.say(summary(cfg, tok, disc, teacher, lpips, train_set, val_set, world, micro, device, precision,
                    step))
    # the plan informs where memory is scarce: on CUDA, beside the peak measured after the first step (a CPU
    # run prints none; --plan prints it anywhere)
    if master and device.type == "cuda":
        log.say(memory_plan(cfg, world, precision, teacher is not None, lpips is not None))

    # 2. the loop: a generator step (the tokenizer), then a discriminator step once the GAN has started
    stop = runtime.Interrupt()  # Ctrl-C: the step in progress ends, the run is saved (made before the loader)
    batches = data.train_batches(train_set, micro, rank, world, cfg.seed, start=step * cfg.grad_accum,
                                 num_workers=data.workers(cfg.num_workers, device))
    train.train()
    bad = runtime.BadSteps(cfg.max_bad_steps, ckpt_path)
    first = step  # this launch's first step
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"tokenizer {cfg.size}", disable=not master)
    t0, start = time.time(), step
    while step < cfg.max_steps and not stop(device):
        # warmup, then cosine to end_lr
        lr = runtime.get_lr(step, cfg.lr, cfg.warmup, cfg.max_steps, cfg.end_lr)
        for group in opt.param_groups + opt_d.param_groups:  # one schedule for both networks
            group["lr"] = lr
        # the disc_start guard (the official adopt_weight, tokenizer/tokenizer_image/vq/vq_loss.py)
        g = cfg.disc_weight if step >= cfg.disc_start else 0.0
        early = step < cfg.aux_loss_end                          # the shortcut reconstruction + feature loss
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout masks: a function of the step
        for k in range(cfg.grad_accum):
            x = next(batches)[0].to(device, non_blocking=True)  # (micro, 3, S, S)
            sync = k == cfg.grad_accum - 1 or world == 1         # DDP reduces on the last micro-step only
            with runtime.grad_sync(train, sync), autocast:
                t, recons = loss_terms(train, x, teacher, lpips, disc, g > 0, early, cfg.entropy_weight > 0)
                # L_G = MSE + w_p LPIPS + g GAN + (codebook + beta commitment + w_e entropy) + feat
                #       + w_s semantic
                # (the official tokenizer/tokenizer_image/vq/vq_loss.py; w_p = 1, g = 0.5 from disc_start,
                # beta = 0.25, w_s = 0.5 (Sec. 3.2). The first three and feat sum over x_hat and, while
                # step < aux_loss_end, over the shortcut x_hat_dir too.)
                loss = (t["mse"] + cfg.perceptual_weight * t["lpips"] + g * t["gan"]
                        + (t["codebook"] + cfg.commit_weight * t["commitment"]
                           + cfg.entropy_weight * t["entropy"])
                        + t["feat"] + cfg.semantic_weight * t["semantic"])
            # the mean over the micro-steps, accumulated in .grad
            scaler.scale(loss / cfg.grad_accum).backward()
            if g > 0:  # the discriminator judges the same reconstructions, detached
                with autocast:
                    d_loss = discriminator_loss(disc, x, recons, g)
                scaler_d.scale(d_loss / cfg.grad_accum).backward()
        # clipped at 10 (official)
        grad_norm = runtime.optimizer_step(opt, scaler, train.parameters(), cfg.grad_clip)
        bad(grad_norm, step, scaler)  # a non-finite loss skipped this update (fp16: unless calibrating)
        if ema:
            ema.update()
        if g > 0:  # the discriminator is not wrapped in DDP or FSDP: its gradients are averaged here
            runtime.optimizer_step(opt_d, scaler_d, disc.parameters(), cfg.grad_clip, average=True)
        step += 1  # one optimizer step = batch_size images
        bar.update()
        if step == first + 1 and master and device.type == "cuda":  # beside the memory plan printed at start
            log.say(runtime.measured_peak(device))
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            img_per_s, t0, start = (step - start) * cfg.batch_size / (time.time() - t0), time.time(), step
            log(step, loss=loss.item(), **{k: v.item() for k, v in t.items()},
                d_loss=d_loss.item() if g > 0 else 0.0, usage=tok.quantizer.usage(),
                grad_norm=grad_norm.item(), lr=lr, img_per_s=img_per_s, skipped=bad.total)
        if step % cfg.image_interval == 0 or step == cfg.max_steps:
            with averaged(), autocast:  # the weights the run hands on, at the precision it trains in
                show(tok, shown, val_set, step, cfg, log, rank, world, device)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save()
    bar.close()
    stop.end(save, log.say, step, ckpt_path, cfg.fresh)  # Ctrl-C: saved at the step reached, then exit
    if not runtime.on_rank0(os.path.exists(ckpt_path)) or (cfg.fresh and step == 0):  # max_steps 0: the init
        save()
    with averaged(), autocast:
        val_psnr, usage = final_report(tok, val_set, step, cfg, log, ckpt_path, rank, world, device)
    runtime.cleanup_distributed()
    return dict(step=step, val_psnr=val_psnr, usage=usage, tokenizer=tok, discriminator=disc, teacher=teacher)


if __name__ == "__main__":
    runtime.run(main, TrainConfig())
