"""
Train the class-conditional AR model (model.GPT) on the codes of a frozen tokenizer (spec 5.2).

    python train_ar.py                                     # toy AR on out/tokenizer-toy/ckpt.pt (run train_tokenizer.py first)
    torchrun --nproc_per_node=8 train_ar.py --tokenizer=out/tokenizer-b-l/ckpt.pt --data=/data/imagenet \
        --gpt=gpt-b --batch_size=32 --lr=1e-4 --max_steps=1500000 --warmup=5000   # the paper's GPT-B, 300 epochs

AR probing (the paper's proxy for a tokenizer's generation quality, spec 5.4) is the same command with the
probe protocol: GPT-B, global batch 256, lr 1e-4 held constant (WSD laid out for 1.5M steps, stopped at 250k),
then the validation cross-entropy is the number to compare:
    torchrun --nproc_per_node=8 train_ar.py --tokenizer=... --data=/data/imagenet --gpt=gpt-b --batch_size=32 \
        --lr=1e-4 --max_steps=250000 --schedule_steps=1500000 --out_dir=out/probe-b-l

The dataset is encoded once, before training, as the official extract_codes_c2i.py does: each training image is
center-cropped to 1.1x the tokenizer's size and cut into ten crops (four corners, center, and their mirror
images); training draws one of the ten views per access. Codes are cached under the tokenizer's folder and
reused by later runs (and by other AR models on the same tokenizer).
"""
import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model
from model import GPT, GPT_PRESETS
from train_tokenizer import (Logger, _epoch_order, all_reduce, barrier, cleanup_distributed, load_checkpoint,
                             make_dataset, parse_config, save_checkpoint, setup_distributed)


@dataclass
class ARConfig:
    tokenizer: str = "out/tokenizer-toy/ckpt.pt"  # frozen tokenizer checkpoint (ours or an official GigaTok one)
    data: str = "synthetic"     # "synthetic" (the embedded toy set) or an ImageFolder root with train/ and val/
    gpt: str = "toy"            # AR model size, a key of model.GPT_PRESETS
    out_dir: str = ""           # "" = out/ar-<gpt>
    code_dir: str = ""          # code cache; "" = <tokenizer folder>/codes-<data name>[-<subset>]
    num_classes: int = 0        # use the first num_classes classes only (0 = all)
    per_class: int = 100        # training images per class (0 = all: the paper). The toy encodes 100 x 10 classes
                                # (10 views each) to keep the encoding under two minutes on a CPU
    batch_size: int = 64        # per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1         # micro-steps per optimizer step
    max_steps: int = 1200       # optimizer steps (paper: 1.5M at global batch 256 = 300 epochs)
    schedule_steps: int = 0     # steps the lr schedule is laid out for; 0 = max_steps (AR probing: 1.5M, stopped at 250k)
    lr: float = 1e-3            # peak lr. Paper: 1e-4 at global batch 256; the toy uses 1e-3 to learn in minutes
    schedule: str = "wsd"       # "wsd" (official: warmup, hold, sqrt decay over the last decay_frac) or "cosine"
    warmup: int = 50            # linear warmup steps from lr/100 (paper: 5000 for GPT-B, 0 for probing)
    decay_frac: float = 0.2     # WSD: fraction of schedule_steps spent decaying to 0
    weight_decay: float = 0.05  # on matrices and embeddings (dim >= 2) only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    bf16: bool = True           # bf16 autocast on CUDA (fp32 on CPU)
    compile: bool = False       # torch.compile the AR model
    encode_batch: int = 64      # images per tokenizer call while building the code cache
    eval_interval: int = 200    # steps between validation cross-entropy measurements (and at the end)
    log_interval: int = 20
    ckpt_interval: int = 400    # steps between checkpoints (and at the end); training resumes from out_dir/ckpt.pt
    seed: int = 0


# -----------------------------------------------------------------------------------------------------------
# The code cache: codes (images, views, N) as uint16 when the codebook allows, labels (images,), one folder per
# (tokenizer, dataset, split); written once by all processes together, then memory-mapped.

def ten_crops(x, size):
    """(B, 3, S, S) -> (B, 10, 3, size, size): four corners, the center, and the mirror image of each."""
    S = x.shape[-1]
    c = (S - size) // 2
    corners = [(0, 0), (0, S - size), (S - size, 0), (S - size, S - size), (c, c)]
    crops = torch.stack([x[..., i:i + size, j:j + size] for i, j in corners], dim=1)  # (B, 5, 3, size, size)
    return torch.cat([crops, crops.flip(-1)], dim=1)


class CodeImages:
    """What gets encoded: the ten crops of the 1.1x center crop (training, views=10) or the center crop (views=1)."""

    def __init__(self, cfg, split, size, views):
        self.size, self.views = size, views
        self.images = make_dataset(cfg.data, split, int(size * 1.1) if views == 10 else size,  # center crops
                                   num_classes=cfg.num_classes, per_class=cfg.per_class if split == "train" else 0)
        self.classes = self.images.classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):  # -> ((views, 3, size, size), label)
        x, y = self.images[i]
        return (ten_crops(x[None], self.size)[0] if self.views == 10 else x[None]), y


def code_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32


@torch.no_grad()
def build_code_cache(tok, images, folder, views, batch, rank, world, device):
    """Encode every image of `images` (a dataset of ((V, 3, H, W) views, label)) into folder/codes.npy
    (n, V, N) and folder/labels.npy (n,). Each process encodes every world-th image into the shared memory maps;
    meta.json, written last by the caller, marks the cache complete."""
    n, N = len(images), tok.cfg.num_tokens
    os.makedirs(folder, exist_ok=True)
    codes_path = os.path.join(folder, "codes.npy")
    labels_path = os.path.join(folder, "labels.npy")
    if rank == 0:
        np.lib.format.open_memmap(codes_path, "w+", code_dtype(tok.cfg.codebook_size), (n, views, N)).flush()
        np.lib.format.open_memmap(labels_path, "w+", np.int64, (n,)).flush()
    barrier()
    codes, labels = np.load(codes_path, mmap_mode="r+"), np.load(labels_path, mmap_mode="r+")
    mine = list(range(rank, n, world))
    for s in tqdm(range(0, len(mine), batch), desc=f"encoding {folder}", disable=rank != 0):
        idx = mine[s:s + batch]
        items = [images[i] for i in idx]
        x = torch.stack([x for x, _ in items]).to(device)                         # (b, V, 3, H, W)
        codes[idx] = tok.encode(x.flatten(0, 1)).view(len(idx), views, N).cpu().numpy().astype(codes.dtype)
        labels[idx] = [int(y) for _, y in items]
    codes.flush()
    labels.flush()
    barrier()


def tokenizer_fingerprint(tok):
    """A short hash of the weights that decide the codes' identity (first conv, codebook): a retrained or
    resumed tokenizer invalidates its code cache."""
    import hashlib
    h = hashlib.sha1()
    for t in (tok.cnn_encoder.conv_in.weight, tok.quantizer.embedding.weight):
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def code_cache(tok, cfg, split, views, rank, world, device):
    """-> (codes (n, views, N) memory-mapped, labels (n,), class names) of one split, encoded now or reused. The
    cache is keyed by its folder and checked against what made it: the tokenizer's weights and the image subset."""
    data_name = "synthetic" if cfg.data == "synthetic" else os.path.basename(os.path.normpath(cfg.data))
    subset = (f"-{cfg.num_classes}classes" if cfg.num_classes else "") + (f"-{cfg.per_class}per-class" if cfg.per_class else "")
    folder = os.path.join(cfg.code_dir or os.path.join(os.path.dirname(cfg.tokenizer), f"codes-{data_name}{subset}"), split)
    made_by = dict(fingerprint=tokenizer_fingerprint(tok), data=cfg.data, num_classes=cfg.num_classes,
                   per_class=cfg.per_class if split == "train" else 0, views=views)
    meta_path = os.path.join(folder, "meta.json")
    meta = read_json(meta_path) if os.path.exists(meta_path) else None
    if meta is not None and all(meta.get(k) == v for k, v in made_by.items()):
        if rank == 0:
            print(f"reusing the code cache {folder}")
    else:
        if meta is not None and rank == 0:
            print(f"the code cache {folder} was made by another tokenizer or image subset: encoding again")
        images = CodeImages(cfg, split, tok.cfg.image_size, views)
        build_code_cache(tok, images, folder, views, cfg.encode_batch, rank, world, device)
        if rank == 0:  # written last: marks the cache complete
            write_json(meta_path, dict(made_by, tokenizer=os.path.abspath(cfg.tokenizer), classes=images.classes))
        barrier()
        meta = read_json(meta_path)
    codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r")
    return codes, np.load(os.path.join(folder, "labels.npy")), meta["classes"]


def unigram_entropy(codes, vocab_size):
    """Entropy (nats) of the code distribution: the cross-entropy of a model that ignores the context."""
    counts = np.bincount(np.asarray(codes).ravel(), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# -----------------------------------------------------------------------------------------------------------
# Optimisation

def get_lr(step, cfg):
    """Official WSD: linear warmup from lr/100, hold, then lr * (1 - sqrt(progress)) over the last decay_frac.
    Cosine: the same warmup, then half a cosine to 0."""
    total = cfg.schedule_steps or cfg.max_steps
    if step < cfg.warmup:
        return cfg.lr / 100 + (cfg.lr - cfg.lr / 100) * step / cfg.warmup
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))))
    assert cfg.schedule == "wsd", f"unknown schedule {cfg.schedule!r}; known: wsd, cosine"
    decay = int(cfg.decay_frac * total)
    hold = total - decay
    return cfg.lr if step < hold else cfg.lr * max(0.0, 1 - math.sqrt((step - hold) / decay))


def make_optimizer(gpt, cfg, device):
    """AdamW with weight decay on the parameters of dim >= 2 (matrices, embeddings, position table) only."""
    params = [p for p in gpt.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def batch_of(step, micro, rank, world, cfg, codes, labels):
    """The micro-batch of one process, a pure function of (step, micro, rank): the images walk through
    per-epoch permutations (the stream of train_tokenizer.TrainBatches), and each access draws one of the
    views. Resumed runs see the same batches."""
    n, views = codes.shape[:2]
    start = ((step * cfg.grad_accum + micro) * world + rank) * cfg.batch_size
    pos = torch.arange(start, start + cfg.batch_size)
    idx = np.array([_epoch_order(n, int(p) // n, cfg.seed)[int(p) % n] for p in pos])
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
    view = torch.randint(views, (cfg.batch_size,), generator=g).numpy()
    order = np.argsort(idx)                      # memory-mapped reads in increasing order
    x = np.empty((cfg.batch_size, codes.shape[2]), np.int64)
    x[order] = codes[idx[order], view[order]]
    return torch.from_numpy(x), torch.from_numpy(labels[idx])


@torch.no_grad()
def validation_loss(gpt, codes, labels, batch, rank, world, device, autocast):
    """Mean next-token cross-entropy (nats) over all held-out images (view 0: the center crop)."""
    gpt.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of codes)
    for s in range(rank * batch, len(codes), world * batch):
        x = torch.from_numpy(codes[s:s + batch, 0].astype(np.int64)).to(device)
        y = torch.from_numpy(labels[s:s + batch]).to(device)
        with autocast:
            logits = gpt(x, y)
        stats[0] += F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum").double()
        stats[1] += x.numel()
    all_reduce(stats)
    gpt.train()
    return (stats[0] / stats[1]).item()


# -----------------------------------------------------------------------------------------------------------
# Training

def main(cfg: ARConfig):
    rank, world, device = setup_distributed()
    master = rank == 0
    out_dir = cfg.out_dir or f"out/ar-{cfg.gpt}"
    if not os.path.exists(cfg.tokenizer):
        raise SystemExit(f"no tokenizer checkpoint at {cfg.tokenizer}: train one first (`python train_tokenizer.py` "
                         f"for the toy), or pass --tokenizer=<path to ours or an official GigaTok checkpoint>")
    tok = model.load_tokenizer(cfg.tokenizer, device=device)  # eval mode, frozen; encodes in fp32 as official
    tcfg = tok.cfg

    # 1. the codes (training: ten crops of the 1.1x center crop; validation: the center crop), cached
    (codes, labels, classes), (val_codes, val_labels, _) = (
        code_cache(tok, cfg, split, views, rank, world, device) for split, views in (("train", 10), ("val", 1)))
    fingerprint = tokenizer_fingerprint(tok)
    del tok

    # 2. the model, its optimizer, and the checkpoint to resume from
    gcfg = dataclasses.replace(GPT_PRESETS[cfg.gpt], vocab_size=tcfg.codebook_size, block_size=tcfg.num_tokens,
                               num_classes=len(classes))
    torch.manual_seed(cfg.seed)
    gpt = GPT(gcfg).to(device)
    optimizer = make_optimizer(gpt, cfg, device)
    ckpt_path, step = os.path.join(out_dir, "ckpt.pt"), 0
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, device)
        if ckpt["config"]["tokenizer_fingerprint"] != fingerprint:
            raise SystemExit(f"{ckpt_path} was trained on the codes of another tokenizer: pass a new --out_dir")
        gpt.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    raw = gpt
    if cfg.compile:
        gpt = torch.compile(gpt)
    if world > 1:
        gpt = torch.nn.parallel.DistributedDataParallel(gpt, device_ids=[device.index] if device.type == "cuda" else None)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    autocast = torch.autocast("cuda", torch.bfloat16) if use_bf16 else nullcontext()

    entropy = unigram_entropy(codes, gcfg.vocab_size)
    if master:
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"AR {cfg.gpt}: {n_params / 1e6:.2f}M params, {len(codes)} training images x {codes.shape[1]} views, "
              f"{len(val_codes)} held out, {gcfg.block_size} tokens of {gcfg.vocab_size} codes, {len(classes)} classes; "
              f"global batch {cfg.batch_size * cfg.grad_accum * world}")
        print(f"reference cross-entropies: uniform log(vocab) = {math.log(gcfg.vocab_size):.3f}, "
              f"unigram entropy of the training codes = {entropy:.3f} nats")

    def save():
        if master:
            save_checkpoint(dict(model=raw.state_dict(), optimizer=optimizer.state_dict(), step=step,
                                 config=dict(gpt=asdict(gcfg), train=asdict(cfg), classes=classes,
                                             tokenizer_fingerprint=fingerprint)), ckpt_path)

    # 3. the loop: next-token cross-entropy, AdamW, clipping, per-step lr
    log = Logger(out_dir, master)
    evaluate = lambda: validation_loss(raw, val_codes, val_labels, cfg.batch_size, rank, world, device, autocast)
    val = None
    gpt.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train_ar", disable=not master)
    t0 = time.time()
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout masks: a function of the step
        for micro in range(cfg.grad_accum):
            x, y = (t.to(device) for t in batch_of(step, micro, rank, world, cfg, codes, labels))
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (nullcontext() if sync else gpt.no_sync()), autocast:
                logits = gpt(x, y)                                              # (B, N, vocab), fp32
                loss = F.cross_entropy(logits.flatten(0, 1), x.flatten())      # logits[:, i] predicts x[:, i]
            (loss / cfg.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt, t0 = time.time() - t0, time.time()
            log(step, loss=loss.item(), grad_norm=grad_norm.item(), lr=lr, step_time=dt / cfg.log_interval)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val = evaluate()
            log(step, val_loss=val, code_entropy=entropy)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save()
    bar.close()
    val = evaluate() if val is None else val
    if master:
        print(f"validation cross-entropy {val:.4f} nats at step {step} (unigram entropy of the training codes "
              f"{entropy:.4f}, log(vocab) {math.log(gcfg.vocab_size):.4f}); checkpoint {ckpt_path}")
    cleanup_distributed()
    return dict(val_loss=val, code_entropy=entropy, step=step)


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main(parse_config(ARConfig()))
