"""
Train the class-conditional AR model (model.GPT) on the codes of a frozen tokenizer (paper Sec. 4.1; official
autoregressive/train/train_c2i.py).

    # the toy AR on out/tokenizer-toy/ckpt.pt (run train_tokenizer.py first)
    python train_ar.py
    torchrun --nproc_per_node=8 train_ar.py --tokenizer out/tokenizer-xl-xxl/ckpt.pt --data /data/imagenet \
        --gpt gpt-b
    torchrun --nproc_per_node=8 train_ar.py --tokenizer out/tokenizer-xl-xxl/ckpt.pt --data /data/imagenet \
        --probe

The second command is the paper's GPT-B run (global batch 256, lr 1e-4, 1.5M steps, WSD); --probe is AR
probing, the paper's cheap proxy for a tokenizer's generation quality (Sec. 4.1; official
scripts/composite_cmd/train_vq_and_eval.sh): GPT-B with lr 1e-4 held for 250k steps (the WSD schedule laid out
for 1.5M, stopped in its hold phase), judged by the validation cross-entropy printed at the end. Re-running a
command continues from <out-dir>/ckpt.pt (pass --fresh to start over).

The dataset is encoded once, before training, as the official autoregressive/train/extract_codes_c2i.py does:
each training image is center-cropped to 1.1x the tokenizer's size and cut into ten crops (four corners,
center, and their mirror images); training draws one of the ten views per access. Codes are cached under the
tokenizer's folder and reused by later runs (and by other AR models on the same tokenizer). That code cache is
this script's own; the shared plumbing is in runtime.py and data.py.
"""
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model
import runtime
from model import GPT, GPT_PRESETS


@dataclass
class ARConfig:
    tokenizer: str = "out/tokenizer-toy/ckpt.pt"  # frozen tokenizer checkpoint or URL (ours or an official)
    data: str = ""               # "" = what the tokenizer was trained on (its checkpoint says; an official
                                 # one: synthetic); "synthetic" (embedded) or an ImageFolder root
    gpt: str = ""                # AR model size (model.GPT_PRESETS); "" = toy, or gpt-b with --probe
    probe: bool = False          # AR probing (paper Sec. 4.1): GPT-B, lr 1e-4 held for 250k steps of a
                                 # 1.5M-step WSD
    num_classes: int = 0         # use only the first N classes of the data (0 = all; with --data "": the
                                 # tokenizer's)
    per_class: int = -1          # training images per class (0 = all); -1 = the preset's (toy: 100, paper:
                                 # all)
    out_dir: str = ""            # "" = out/ar-<gpt> (out/probe-<tokenizer folder> with --probe); holds
                                 # ckpt.pt, log.jsonl
    code_dir: str = ""           # code cache; "" = <tokenizer folder>/codes-<data>[-<subset>]
    fresh: bool = False          # start over even if out_dir holds a checkpoint (default: continue from it)
    max_steps: int = -1          # optimizer steps; -1 = the preset's (paper: 300 epochs = 1.5M at batch 256)
    schedule_steps: int = -1     # steps the lr schedule is laid out for; -1 = max_steps (probing: 1.5M,
                                 # stopped early)
    batch_size: int = -1         # global batch (all processes and accumulation steps); -1 = the preset's
                                 # (paper 256)
    grad_accum: int = 1          # micro-steps per optimizer step (per-process micro-batch = batch / world /
                                 # accum)
    lr: float = -1.0             # peak learning rate; -1 = the preset's (paper 1e-4; toy 1e-3, to learn in
                                 # minutes)
    schedule: str = "wsd"        # "wsd" (official: warmup, hold, sqrt decay over the last decay_frac) or
                                 # "cosine"
    warmup: int = -1             # linear warmup steps from lr/100; -1 = the preset's (5000; XXL 200; probing
                                 # 0)
    decay_frac: float = 0.2      # WSD: fraction of schedule_steps spent decaying to 0
    weight_decay: float = 0.05   # AdamW, on matrices and embeddings (dim >= 2) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    cfg_scale: float = -1.0      # the guidance scale sample.py uses for this model; -1 = the preset's (toy 3,
                                 # paper 4)
    precision: str = "auto"      # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16", "fp16"
                                 # (GradScaler), "fp32" (bf16 on a CPU: one with native bf16, AVX-512 BF16
                                 # or AMX)
    compile: bool = False        # torch.compile the AR model
    fsdp: bool = False           # under torchrun: shard the weights, gradients and AdamW state (FSDP2, one
                                 # unit per transformer block) instead of DDP
    checkpointing: bool = False  # activation checkpointing: keep each block's input only, recompute it in
                                 # backward
    device: str = ""             # "" = cuda, else mps, else cpu
    threads: int = 0             # torch CPU threads (0 = torch's default)
    encode_batch: int = 32       # images per tokenizer call while building the code cache (x views each)
    num_workers: int = -1        # image-loading processes per process for the code cache; -1 = 6 on CUDA,
                                 # 0 on CPU
    seed: int = 0
    log_interval: int = -1       # steps between log lines; -1 = the preset's
    eval_interval: int = -1      # steps between validation cross-entropies (and at the end); -1 = the
                                 # preset's
    ckpt_interval: int = -1      # steps between checkpoints (and at the end); -1 = the preset's
    max_bad_steps: int = 5       # a non-finite loss or gradient skips its step; this many in a row stop the
                                 # run
    plan: bool = False           # print the memory plan (bytes per process, counted on fake tensors) and exit
    plan_world: int = 0          # processes to plan for; 0 = this run's (torchrun's, else 1)


# Training defaults per AR size (paper Sec. 4.1; official autoregressive/train/train_c2i.py and
# Detailed_instructions.md): global batch, warmup, steps = 300 epochs of the official 5000 * 256 images. The
# official scripts give warmup 5000 for GPT-B and 200 for XXL; L and XL take B's.
AR_TRAIN_PRESETS = {
    "gpt-b":   dict(batch_size=256, warmup=5000, max_steps=1_500_000),
    "gpt-l":   dict(batch_size=256, warmup=5000, max_steps=1_500_000),
    "gpt-xl":  dict(batch_size=256, warmup=5000, max_steps=1_500_000),
    "gpt-xxl": dict(batch_size=512, warmup=200, max_steps=750_000),
    # ours: a high lr and 100 images per class, so that the toy learns in minutes on a laptop; 900 steps,
    # since shorter runs gave samples that miss their classes; the guidance scale chosen by eye from sample
    # grids (EXPERIMENTS.md, "The toy AR model"; README "The AR model")
    "toy":     dict(batch_size=32, warmup=50, max_steps=900, lr=1e-3, per_class=100, log_interval=50,
                    eval_interval=250, ckpt_interval=250, cfg_scale=3.0),
}
PAPER_DEFAULTS = dict(lr=1e-4, per_class=0, log_interval=100, eval_interval=10_000, ckpt_interval=5000,
                      cfg_scale=4.0)
# AR probing (paper Sec. 4.1): the WSD schedule of 1.5M steps, stopped early in its hold phase
PROBE = dict(max_steps=250_000, schedule_steps=1_500_000, warmup=0)


def resolve(cfg):
    """cfg with every -1 / "" default filled from the size's training defaults (and the probing protocol)."""
    gpt = cfg.gpt or ("gpt-b" if cfg.probe else "toy")
    if gpt not in AR_TRAIN_PRESETS:
        raise runtime.UserError(f"unknown --gpt {gpt!r}; known: {', '.join(AR_TRAIN_PRESETS)}")
    p = {**PAPER_DEFAULTS, **AR_TRAIN_PRESETS[gpt], **(PROBE if cfg.probe else {})}
    fill = {k: v for k, v in p.items() if getattr(cfg, k) == -1}
    probe_dir = f"out/probe-{os.path.basename(os.path.dirname(os.path.abspath(cfg.tokenizer)))}"
    fill["out_dir"] = cfg.out_dir or (probe_dir if cfg.probe else f"out/ar-{gpt}")
    return dataclasses.replace(cfg, gpt=gpt, **fill)


# -----------------------------------------------------------------------------------------------------------
# The code cache: codes (images, views, N) as uint16 when the codebook allows, labels (images,), one folder
# per (tokenizer, dataset, split). Each process encodes a contiguous block of the images into a file of its
# own (so that processes on different nodes never write into the same file pages), rank 0 joins them; then
# the cache is memory-mapped.

def ten_crops(x, size):
    """(B, 3, S, S) -> (B, 10, 3, size, size): four corners, the center, and the mirror image of each."""
    S = x.shape[-1]
    c = (S - size) // 2  # the center crop's offset
    corners = [(0, 0), (0, S - size), (S - size, 0), (S - size, S - size), (c, c)]
    crops = torch.stack([x[..., i:i + size, j:j + size] for i, j in corners], dim=1)  # (B, 5, 3, size, size)
    return torch.cat([crops, crops.flip(-1)], dim=1)                                 # (B, 10, 3, size, size)


class CodeImages:
    """What gets encoded: the ten crops of the 1.1x center crop (training, views=10) or the center crop
    (views=1)."""

    def __init__(self, cfg, split, size, views):
        self.size, self.views = size, views
        # center crops: of 1.1x the size for the ten crops, else of the size
        self.images = data.make_dataset(cfg.data, split, int(size * 1.1) if views == 10 else size,
                                        num_classes=cfg.num_classes,
                                        per_class=cfg.per_class if split == "train" else 0)
        self.classes = self.images.classes
        self.names = getattr(self.images, "names", self.classes)  # human-readable, for sample.py's labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):  # -> ((views, 3, size, size), label)
        x, y = self.images[i]
        return (ten_crops(x[None], self.size)[0] if self.views == 10 else x[None]), y


def code_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32  # 16384 codes fit in 16 bits: half the disk


@torch.no_grad()
def build_code_cache(tok, images, folder, views, batch, rank, world, device, num_workers=0):
    """Encode every image of `images` (a dataset of ((V, 3, H, W) views, label)) into folder/codes.npy
    (n, V, N) and folder/labels.npy (n,). Each process encodes one contiguous block of the images into its own
    part files, which rank 0 then joins; meta.json, written last by the caller, marks the cache complete."""
    n, N = len(images), tok.cfg.num_tokens
    os.makedirs(folder, exist_ok=True)
    # every process has read the old meta.json (if any) by now: it goes, and comes back when complete
    runtime.barrier()
    if rank == 0 and os.path.exists(os.path.join(folder, "meta.json")):
        os.remove(os.path.join(folder, "meta.json"))
    lo, hi = n * rank // world, n * (rank + 1) // world  # this process's images
    part = lambda name, r: os.path.join(folder, f"{name}.part{r}.npy")
    codes = np.lib.format.open_memmap(part("codes", rank), "w+", code_dtype(tok.cfg.codebook_size),
                                      (hi - lo, views, N))
    labels = np.zeros(hi - lo, np.int64)
    batches = data.in_order(images, lo, hi, batch, num_workers)  # (b, V, 3, H, W) views, (b,) labels
    for s, (x, y) in zip(range(0, hi - lo, batch),
                         tqdm(batches, desc=f"encoding {folder}", disable=rank != 0)):
        # V views of each image, encoded in one tokenizer call of b * V images: (b*V, N) -> (b, V, N)
        codes[s:s + len(x)] = tok.encode(x.to(device).flatten(0, 1)).view(len(x), views, N).cpu().numpy()
        labels[s:s + len(x)] = y.numpy()
    codes.flush()
    del codes
    np.save(part("labels", rank), labels)
    runtime.barrier()
    if rank == 0:  # the parts joined, in rank order (= image order), one part in memory at a time
        # (a shared file system sees one writer per file: nothing else writes into these pages meanwhile)
        out = np.lib.format.open_memmap(os.path.join(folder, "codes.npy"), "w+",
                                        code_dtype(tok.cfg.codebook_size), (n, views, N))
        for r in range(world):
            a, b = n * r // world, n * (r + 1) // world
            out[a:b] = np.load(part("codes", r), mmap_mode="r")
        out.flush()
        del out
        np.save(os.path.join(folder, "labels.npy"),
                np.concatenate([np.load(part("labels", r)) for r in range(world)]))
        for r in range(world):
            os.remove(part("codes", r))
            os.remove(part("labels", r))
    runtime.barrier()


def tokenizer_fingerprint(tok):
    """A short hash of the weights that decide the codes' identity (first conv, codebook): a retrained or
    resumed tokenizer invalidates its code cache."""
    h = hashlib.sha1()
    # the encoder's first layer and the codebook
    for t in (tok.cnn_encoder.conv_in.weight, tok.quantizer.embedding.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_tokenizer(tok, tok_path, ar_config, ckpt_path):
    """sample.py and evaluate.py: a UserError unless tok is the tokenizer whose codes the AR checkpoint at
    ckpt_path was trained on (the fingerprint in its config; an official checkpoint has none: not checked)."""
    want = (ar_config or {}).get("tokenizer_fingerprint")
    if want and tokenizer_fingerprint(tok) != want:
        raise runtime.UserError(f"the tokenizer {tok_path} is not the one whose codes {ckpt_path} was "
                                f"trained on (it has been trained since): train the AR model on it again "
                                f"(train_ar.py --fresh), or pass --tokenizer <the one it was trained on>")


def code_cache(tok, cfg, split, views, rank, world, device, classes=None):
    """-> (codes (n, views, N) memory-mapped, labels (n,), its meta.json: class ids "classes" and "names") of
    one split, encoded now or reused. The cache is keyed by its folder and checked against what made it: the
    tokenizer's weights and the image subset. classes: the class ids the data must have
    (runtime.check_classes), or None."""
    data_name = "synthetic" if cfg.data == "synthetic" else os.path.basename(os.path.normpath(cfg.data))
    subset = ((f"-{cfg.num_classes}classes" if cfg.num_classes else "")
              + (f"-{cfg.per_class}per-class" if cfg.per_class else ""))
    tok_dir = os.path.dirname(model.checkpoint_file(cfg.tokenizer))  # a URL's: beside its download
    folder = os.path.join(cfg.code_dir or os.path.join(tok_dir, f"codes-{data_name}{subset}"), split)
    made_by = dict(fingerprint=tokenizer_fingerprint(tok), data=cfg.data, num_classes=cfg.num_classes,
                   per_class=cfg.per_class if split == "train" else 0, views=views)
    meta_path = os.path.join(folder, "meta.json")  # written last: its presence marks a complete cache
    meta = runtime.read_json(meta_path) if os.path.exists(meta_path) else None
    if meta is not None and all(meta.get(k) == v for k, v in made_by.items()):
        runtime.check_classes(meta["classes"], classes, cfg.data, "the tokenizer")
        if rank == 0:
            print(f"reusing the code cache {folder}")
    else:
        if meta is not None and rank == 0:
            print(f"the code cache {folder} was made by another tokenizer or image subset: encoding again")
        images = CodeImages(cfg, split, tok.cfg.image_size, views)
        runtime.check_classes(images.classes, classes, cfg.data, "the tokenizer")  # before the encoding
        build_code_cache(tok, images, folder, views, cfg.encode_batch, rank, world, device,
                         data.workers(cfg.num_workers, device))
        if rank == 0:  # written last: marks the cache complete
            tok_name = cfg.tokenizer if model.is_url(cfg.tokenizer) else os.path.abspath(cfg.tokenizer)
            runtime.write_json(meta_path, dict(made_by, tokenizer=tok_name, classes=images.classes,
                                               names=images.names))
        runtime.barrier()
        meta = runtime.read_json(meta_path)
    codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")  # (n, views, N), read lazily
    return codes, np.load(os.path.join(folder, "labels.npy")), meta


def unigram_entropy(codes, vocab_size, chunk=4096):
    """Entropy (nats) of the code distribution: the cross-entropy of a model that ignores the context."""
    counts = np.zeros(vocab_size, np.float64)
    for s in range(0, len(codes), chunk):  # in chunks: ImageNet's cache is 6.5 GB
        counts += np.bincount(np.asarray(codes[s:s + chunk]).ravel(), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()  # the empirical code distribution
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------------------
# Optimisation

def validate(cfg):
    """Every training field in its range, before anything starts (the flag, its value and what is valid);
    --precision is runtime.autocast_for's to check."""
    runtime.check(cfg, [
        (cfg.max_steps >= 0, "max_steps", "0 or more"), (cfg.batch_size >= 1, "batch_size", "1 or more"),
        (cfg.lr > 0, "lr", "a number above 0"), (cfg.warmup >= 0, "warmup", "0 or more"),
        (cfg.schedule in ("wsd", "cosine"), "schedule", "wsd or cosine"),
        (0 < cfg.decay_frac <= 1, "decay_frac", "in (0, 1]"),
        (0 <= cfg.beta1 < 1, "beta1", "in [0, 1)"), (0 <= cfg.beta2 < 1, "beta2", "in [0, 1)"),
        (cfg.grad_clip > 0, "grad_clip", "a number above 0"), (cfg.cfg_scale >= 0, "cfg_scale", "0 or more"),
        *[(getattr(cfg, k) >= 0, k, "0 or more")
          for k in ("weight_decay", "num_classes", "per_class", "threads", "max_bad_steps", "plan_world")],
        (cfg.num_workers >= -1, "num_workers", "-1 (auto) or 0 or more"),
        *[(getattr(cfg, k) >= 1, k, "1 or more")
          for k in ("log_interval", "eval_interval", "ckpt_interval", "encode_batch")]])
    return cfg


def get_lr(step, cfg):
    """The official WSD schedule (tokenizer/tokenizer_image/scheduler.py; or a cosine, --schedule cosine) laid
    out over schedule_steps (default max_steps)."""
    total = cfg.schedule_steps if cfg.schedule_steps > 0 else cfg.max_steps
    return runtime.get_lr(step, cfg.lr, cfg.warmup, total, schedule=cfg.schedule, decay_frac=cfg.decay_frac)


def make_optimizer(gpt, cfg, device, precision):
    """AdamW with weight decay on the parameters of dim >= 2 (matrices, embeddings, position table) only, and
    its GradScaler (runtime.adamw), as the official autoregressive/train/train_c2i.py."""
    params = [p for p in gpt.parameters() if p.requires_grad]
    # matrices and embeddings decay; norms' weights do not
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return runtime.adamw(groups, cfg, device, precision)


def code_batch(codes, labels, start, size, seed):
    """The sequences at stream positions start .. start+size-1 (the stream of data.TrainBatches, over the
    images of the code cache), each access drawing one of the views: a pure function of (seed, start), so a
    resumed run sees the same batches. codes (n, views, N) -> (codes (size, N), labels (size,))."""
    n, views = codes.shape[:2]
    idx = data.stream_indices(n, start, size, seed)  # (size,) image indices
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    view = torch.randint(views, (size,), generator=g).numpy()  # one of the ten crops per access
    order = np.argsort(idx)                      # memory-mapped reads in increasing order
    x = np.empty((size, codes.shape[2]), np.int64)
    x[order] = codes[idx[order], view[order]]
    return torch.from_numpy(x), torch.from_numpy(labels[idx])


@torch.no_grad()
def validation_loss(gpt, codes, labels, batch, rank, world, device, autocast):
    """Mean next-token cross-entropy (nats) over all held-out images (view 0: the center crop)."""
    gpt.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of codes)
    # as many batches on every process: a sharded GPT gathers its weights in each
    rounds = -(-len(codes) // (world * batch))
    for s in range(rank * batch, rounds * world * batch, world * batch):
        rows = slice(s, s + batch) if s < len(codes) else slice(0, 1)  # past the end: a stand-in, not counted
        x = torch.from_numpy(codes[rows, 0].astype(np.int64)).to(device)               # (B, N)
        y = torch.from_numpy(labels[rows]).to(device)
        with autocast:
            logits = gpt(x, y)                                                         # (B, N, vocab)
        if s < len(codes):  # summed, then divided once
            stats[0] += F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").double()
            stats[1] += x.numel()
    runtime.all_reduce(stats)
    gpt.train()
    return (stats[0] / stats[1]).item()


def summary(cfg, gcfg, gpt, codes, val_codes, classes, world, micro, device, precision, step, entropy,
            data_from=""):
    """The start-up lines, each short enough for a terminal: the model, the data (and the subset a preset
    uses), the batch and the device, the schedule, the reference losses."""
    lines = [f"AR {cfg.gpt}: {runtime.count(gpt) / 1e6:.2f}M params; {gcfg.block_size} tokens of "
             f"{gcfg.vocab_size} codes, {len(classes)} classes",
             f"data {cfg.data}{data_from}: {len(codes)} training images x {codes.shape[1]} views, "
             f"{len(val_codes)} held out"]
    if cfg.per_class:
        lines.append(f"the preset's subset: {cfg.per_class} training images per class "
                     f"(--per-class 0 for all)")
    lines += [f"{cfg.batch_size} sequences per step = {world} processes x {cfg.grad_accum} micro-steps x "
              f"{micro}; device {device}, {precision}",
              f"steps {step} -> {cfg.max_steps}, lr {cfg.lr:g} ({cfg.schedule}, warmup {cfg.warmup})"
              + (f"; resuming from step {step}" if step else ""),
              f"reference cross-entropies (nats per code): log(vocab) {math.log(gcfg.vocab_size):.3f}; "
              f"unigram entropy of the training codes {entropy:.3f}"]
    return "\n".join(lines)


def memory_plan(cfg, gcfg, world, precision):
    """The memory per process of this run over `world` processes (runtime.memory_plan), from one forward and
    backward of a micro-batch on fake tensors."""
    micro = runtime.micro_batch(cfg, world)
    mode, (gpt,) = runtime.fake_modules(lambda: (GPT(gcfg),))
    # CPU autocast stands in for CUDA's (fake tensors: this CPU's own bf16 does not matter)
    autocast = runtime.autocast_for(precision, torch.device("cpu"), planning=True)[1]

    def step():
        with autocast:
            x = torch.randint(gcfg.vocab_size, (micro, gcfg.block_size))  # (B, N) codes
            logits = gpt(x, torch.randint(gcfg.num_classes, (micro,)))     # (B, N, vocab)
            return F.cross_entropy(logits.flatten(0, 1), x.flatten())
    plan = runtime.memory_plan(mode, gpt, step, world, cfg.fsdp, cfg.checkpointing, precision, micro)
    return runtime.describe_plan(plan, world, cfg.fsdp, precision)


def plan_only(cfg):
    """--plan true (runtime.plan_only). The vocabulary and length are the tokenizer checkpoint's when it names
    them, else the paper's (16384 codes x 256 tokens)."""
    tcfg = (model.read_checkpoint(cfg.tokenizer).get("config") or {}).get("tokenizer") \
        if os.path.exists(cfg.tokenizer) or model.is_url(cfg.tokenizer) else None
    # no checkpoint: the paper's, 16384 codes x 256 tokens
    tcfg = model.TokenizerConfig(**tcfg) if tcfg else model.TokenizerConfig()
    gcfg = dataclasses.replace(GPT_PRESETS[cfg.gpt], vocab_size=tcfg.codebook_size,
                               block_size=tcfg.num_tokens,
                               num_classes=cfg.num_classes or GPT_PRESETS[cfg.gpt].num_classes)
    return runtime.plan_only(cfg, lambda world, precision: memory_plan(cfg, gcfg, world, precision))

# -----------------------------------------------------------------------------------------------------------
# Training

def main(cfg: ARConfig):
    cfg = validate(resolve(cfg))  # every flag checked before anything is loaded
    if cfg.plan:  # the memory plan alone: no processes, no models
        return plan_only(cfg)
    rank, world, device = runtime.setup(cfg)
    master = rank == 0
    micro = runtime.micro_batch(cfg, world)
    precision, autocast = runtime.autocast_for(cfg.precision, device)
    if not (os.path.exists(cfg.tokenizer) or model.is_url(cfg.tokenizer)):
        raise runtime.UserError(f"no tokenizer checkpoint at {cfg.tokenizer}: train one first "
                                f"(`python train_tokenizer.py` for the toy), or pass --tokenizer <ours or an "
                                f"official GigaTok checkpoint>")
    tok_ckpt = model.read_checkpoint(cfg.tokenizer)  # read once: the weights and what they were trained on
    tok = model.load_tokenizer(tok_ckpt, device=device)  # eval mode, frozen; encodes in fp32 as official
    # --data "": the data the tokenizer was trained on, whose classes it recorded
    cfg, data_from, tok_classes = runtime.trained_data(cfg, tok_ckpt.get("config"),
                                                       "the tokenizer checkpoint")
    del tok_ckpt

    # 1. the codes (training: ten crops of the 1.1x center crop; validation: the center crop), cached
    (codes, labels, meta), (val_codes, val_labels, _) = (
        code_cache(tok, cfg, split, views, rank, world, device, tok_classes)
        for split, views in (("train", 10), ("val", 1)))
    classes, names = meta["classes"], meta.get("names", meta["classes"])
    fingerprint, tcfg = tokenizer_fingerprint(tok), tok.cfg
    del tok  # the tokenizer is not needed while the GPT trains

    # 2. the model, its optimizer, and the checkpoint to continue from
    # the tokenizer decides vocab and length
    gcfg = dataclasses.replace(GPT_PRESETS[cfg.gpt], vocab_size=tcfg.codebook_size,
                               block_size=tcfg.num_tokens, num_classes=len(classes))
    torch.manual_seed(cfg.seed)  # the GPT's init: a function of the seed
    gpt = runtime.build(lambda: GPT(gcfg), cfg, world, rank, device)  # under FSDP: in memory on rank 0 only
    train = runtime.wrap(gpt, cfg, world, device, precision)  # gpt: no wrapper prefixes
    # made after FSDP, which replaces the parameters
    optimizer, scaler = make_optimizer(gpt, cfg, device, precision)
    # what a checkpoint holds (the scaler: fp16's loss scale)
    parts = dict(model=gpt, optimizer=(gpt, optimizer), scaler=scaler)
    ckpt_path, step = os.path.join(cfg.out_dir, "ckpt.pt"), 0
    dataset = dict(data=cfg.data, classes=classes)  # what the model's class embeddings stand for
    # one decision for all processes (rank 0's); the same data, codes and model, or another run (a line)
    if runtime.on_rank0(os.path.exists(ckpt_path)) and not cfg.fresh:
        identity = dict(dataset=dataset, tokenizer_fingerprint=fingerprint, gpt=asdict(gcfg))
        step = runtime.resume(ckpt_path, parts, identity, asdict(cfg), master)
    config = dict(gpt=asdict(gcfg), dataset=dataset, train=asdict(cfg), classes=classes, names=names,
                  tokenizer_fingerprint=fingerprint)
    save = lambda: runtime.save(ckpt_path, parts, step=step, config=config)
    # for the log, on the main process only
    entropy = unigram_entropy(codes, gcfg.vocab_size) if master else None
    log = runtime.Logger(cfg.out_dir, master)
    if master:  # the start-up lines
        log.say(summary(cfg, gcfg, gpt, codes, val_codes, classes, world, micro, device, precision, step,
                        entropy, data_from))
        # the memory plan where it informs: on CUDA, beside the peak measured after the first step (and
        # alone with --plan)
        if device.type == "cuda":
            log.say(memory_plan(cfg, gcfg, world, precision))

    # 3. the loop: next-token cross-entropy, AdamW, clipping, per-step lr
    evaluate = lambda: validation_loss(gpt, val_codes, val_labels, micro, rank, world, device, autocast)
    val = None
    train.train()
    bad = runtime.BadSteps(cfg.max_bad_steps, ckpt_path)
    first = step  # this launch's first step
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"AR {cfg.gpt}", disable=not master)
    t0, start = time.time(), step
    stop = runtime.Interrupt()  # Ctrl-C: the step in progress ends, then the run is saved
    while step < cfg.max_steps and not stop(device):
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout masks: a function of the step
        for k in range(cfg.grad_accum):
            position = ((step * cfg.grad_accum + k) * world + rank) * micro  # in the stream of sequences
            # (B, N) codes, (B,) labels
            x, y = (t.to(device) for t in code_batch(codes, labels, position, micro, cfg.seed))
            sync = k == cfg.grad_accum - 1 or world == 1                     # DDP: on the last micro-step
            with runtime.grad_sync(train, sync), autocast:
                logits = train(x, y)                                         # (B, N, vocab), fp32
                loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())    # logits[:, i] predicts x[:, i]
            scaler.scale(loss / cfg.grad_accum).backward()  # gradients accumulate over the micro-steps
        # clipped at 1, as the official trainer
        grad_norm = runtime.optimizer_step(optimizer, scaler, train.parameters(), cfg.grad_clip)
        bad(grad_norm, step, scaler)  # a non-finite loss skipped this update (fp16: unless calibrating)
        step += 1
        bar.update()
        if step == first + 1 and master and device.type == "cuda":  # beside the memory plan printed above
            log.say(runtime.measured_peak(device))
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            step_time, t0, start = (time.time() - t0) / (step - start), time.time(), step
            log(step, loss=loss.item(), grad_norm=grad_norm.item(), lr=lr, step_time=step_time,
                skipped=bad.total)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val = evaluate()
            log(step, val_loss=val, code_entropy=entropy)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save()
    bar.close()
    stop.end(save, log.say, step, ckpt_path, cfg.fresh)  # Ctrl-C: saved at the step reached, then exit
    val = evaluate() if val is None else val
    if master:
        print(f"validation cross-entropy {val:.4f} nats per code at step {step} (unigram entropy of the "
              f"training codes {entropy:.4f}, log(vocab) {math.log(gcfg.vocab_size):.4f}); "
              f"checkpoint {ckpt_path}")
    runtime.cleanup_distributed()
    return dict(val_loss=val, code_entropy=entropy, step=step)


if __name__ == "__main__":
    runtime.run(main, ARConfig())
