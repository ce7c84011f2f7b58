"""
Train a GigaTok tokenizer with the paper's full objective (spec sections 3 and 4), from a laptop toy run to
torchrun on many GPUs.

    python train_tokenizer.py                                   # the toy, on the embedded synthetic images (CPU ok)
    python train_tokenizer.py --size s-s --data /data/imagenet  # one GPU, the paper's S-S
    torchrun --nproc_per_node=8 train_tokenizer.py --size xl-xxl --data /data/imagenet/train

Re-running a command continues from <out-dir>/ckpt.pt (pass --fresh to start over).

The first part of this file is the plumbing the other scripts import (train_ar.py, sample.py, evaluate.py):
    parse_config(cfg)                      dataclass defaults <- command line (--field-name value), --help
    setup_distributed(device="")           -> (rank, world, device); torchrun -> DDP, else one process
    barrier(), all_reduce(t), cleanup_distributed()
    save_checkpoint(obj, path), load_checkpoint(path, device)   plain dicts, atomic, weights_only
    Logger(out_dir, master)(step, **numbers)                    fixed-format line + log.jsonl
    make_dataset(data, split, size, ...)   "synthetic" or an ImageFolder path; item i -> (x (3,S,S) in [-1,1], y)
    eval_dataset(data, split, size)        the same (center crops), as evaluate.py and train_ar.py read it
    train_batches(dataset, ...)            augmented micro-batches, a pure function of (seed, rank, step)
"""
import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------------------
# Command-line configuration: every field of a config dataclass is a flag, `--field-name value` (or
# `--field_name=value`); a bare `--flag` sets a bool field to True. Unknown flags are an error. The text of
# --help is the comment written after each field in the dataclass's source.

def field_help(cls):
    """{field name: the comment after it in the class source (and comment-only lines right below it)}"""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, last = {}, None
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s?(.*)$", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last and re.match(r"\s+#", line):
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def _convert(text, default, name):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"--{name}: expected true or false, got {text!r}")
    try:
        if isinstance(default, tuple):
            return tuple(type(default[0])(t) if default else t for t in text.split(","))
        return type(default)(text)
    except ValueError:
        raise SystemExit(f"--{name}: expected a {type(default).__name__}, got {text!r}") from None


def parse_config(cfg, argv=None):
    """A copy of the dataclass instance `cfg` with the fields set on the command line (sys.argv by default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [f.name for f in dataclasses.fields(cfg)]
    updates, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            doc = field_help(type(cfg))
            print(f"usage: {os.path.basename(sys.argv[0])} [--field-name value ...]   ({type(cfg).__name__})\n")
            for n in names:
                d = getattr(cfg, n)
                shown = ",".join(map(str, d)) if isinstance(d, tuple) else d
                print(f"  --{n.replace('_', '-'):<20} {type(d).__name__:<5} {str(shown)!r:<24} {doc.get(n, '')}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: flags look like --field-name value (see --help)")
        key, eq, value = arg[2:].partition("=")
        name = key.replace("-", "_")
        if name not in names:
            raise SystemExit(f"unknown flag --{key}; known: {' '.join('--' + n.replace('_', '-') for n in names)}")
        default = getattr(cfg, name)
        if not eq:
            if isinstance(default, bool) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 == len(argv):
                raise SystemExit(f"--{key} needs a value")
            else:
                i += 1
                value = argv[i]
        updates[name] = _convert(value, default, key)
        i += 1
    return dataclasses.replace(cfg, **updates)

# -----------------------------------------------------------------------------------------------------------
# Distributed (nanoGPT's idiom): no RANK in the environment -> one plain process; under torchrun -> one
# process per device, DDP over nccl (CUDA) or gloo (CPU). Multi-node is torchrun's business (--nnodes ...).

def setup_distributed(device=""):
    """-> (rank, world size, device). device "" picks cuda, then mps, then cpu. Under torchrun each process
    takes the GPU of its LOCAL_RANK (so the local rank is device.index)."""
    if not device:
        device = "cuda" if torch.cuda.is_available() else \
            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op="sum"):
    """In-place sum (or "max") over the processes; a no-op in a single process. Returns t."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()

# -----------------------------------------------------------------------------------------------------------
# Checkpoints: one plain dict (tensors, numbers, strings, config dicts), readable with weights_only=True.

def save_checkpoint(obj, path):
    """Write obj to path atomically (a temporary file moved into place), from rank 0 only: a crash while
    writing leaves the previous checkpoint intact."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device="cpu"):
    return torch.load(path, map_location=device, weights_only=True)


class Logger:
    """log(step, **numbers): one fixed-format line on the main process, the same numbers appended to
    <out_dir>/log.jsonl (with the step and the wall-clock time)."""

    def __init__(self, out_dir, master=True, name="log.jsonl"):
        self.master, self.path = master, os.path.join(out_dir, name)
        if master:
            os.makedirs(out_dir, exist_ok=True)

    def __call__(self, step, **numbers):
        if not self.master:
            return
        fmt = lambda v: f"{v:.3e}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else \
            f"{v:.4f}" if isinstance(v, float) else str(v)
        tqdm.write(f"step {step:>7d} | " + " | ".join(f"{k} {fmt(v)}" for k, v in numbers.items()))
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=step, time=round(time.time(), 3), **numbers)) + "\n")

# -----------------------------------------------------------------------------------------------------------
# Images. A dataset here has .classes (names), len(), and item i -> (x, y) with x a float tensor (3, S, S) in
# [-1, 1] (the evaluation view: center crop) and y an int; .train_item(i, rng) gives the augmented view.

SYNTHETIC_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star", "crescent", "stripes", "checker",
                     "dots"]
SYNTHETIC_SIZES = {"train": 10000, "val": 500}  # images per split (classes balanced: class = index % 10)


def _star_radius(alpha, outer=1.0, inner=0.45):
    """Radius of a five-pointed star's outline at angle alpha in [0, 36 deg] from an outer vertex."""
    a = np.array([outer, 0.0])
    b = inner * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])
    e = b - a
    cross = lambda u, v: u[0] * v[1] - u[1] * v[0]
    return cross(a, e) / (np.cos(alpha) * e[1] - np.sin(alpha) * e[0])


# Flat colours and centred, nearly upright shapes: simple enough that the toy AR model learns the classes in a few
# CPU minutes (README, "The AR model").
PALETTE = np.array([(0.9, 0.15, 0.15), (1.0, 0.6, 0.1), (0.95, 0.9, 0.2), (0.2, 0.7, 0.25), (0.15, 0.7, 0.85),
                    (0.15, 0.25, 0.8), (0.6, 0.25, 0.7), (0.95, 0.95, 0.95), (0.12, 0.12, 0.12)])


def render_synthetic(index, split, size, seed=0):
    """One procedurally drawn image, (size, size, 3) uint8, and its label: a shape or a pattern in one palette
    colour on another. Shapes and checkers are nearly upright, shapes near the center with random scale; patterns
    have random frequency, stripes and dots random orientation. A pure function of (seed, split, index); drawn at
    `size` directly (edges anti-aliased to one pixel), so any resolution works."""
    label = index % len(SYNTHETIC_CLASSES)
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])
    t = (np.arange(size) + 0.5) / size * 2 - 1                 # pixel centers in [-1, 1]
    px = 2.0 / size                                            # one pixel in these units
    X, Y = np.meshgrid(t, -t)                                  # (S, S) each, y up
    bg, fg = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
    while np.abs(fg - bg).sum() < 0.9:                         # far enough apart to be seen at a glance
        bg, fg = PALETTE[rng.choice(len(PALETTE), 2, replace=False)]
    # the shape's frame: center, scale r, rotation
    name = SYNTHETIC_CLASSES[label]
    pattern = name in ("stripes", "checker", "dots")
    cx, cy = (0.0, 0.0) if pattern else rng.uniform(-0.1, 0.1, 2)
    r = rng.uniform(0.5, 0.7)
    free = name in ("stripes", "dots")                         # any orientation; shapes and checkers nearly upright
    th = rng.uniform(0, 2 * np.pi) if free else np.pi / 2 + rng.uniform(-0.25, 0.25)
    u = np.cos(th) * (X - cx) + np.sin(th) * (Y - cy)          # rotated coordinates
    v = -np.sin(th) * (X - cx) + np.cos(th) * (Y - cy)
    rad = np.hypot(u, v)
    # d: (approximate) signed distance to the outline, negative inside
    if name == "circle":
        d = rad - r
    elif name == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    elif name == "triangle":  # apex up (+u), so that its mirror image, the flip augmentation, is the same shape
        d = np.max([np.cos(k) * u + np.sin(k) * v for k in np.pi / 3 + np.arange(3) * 2 * np.pi / 3], 0) - 0.6 * r
    elif name == "ring":
        d = np.abs(rad - 0.75 * r) - 0.22 * r
    elif name == "cross":
        arm = lambda p, q: np.maximum(np.abs(p) - r, np.abs(q) - 0.28 * r)
        d = np.minimum(arm(u, v), arm(v, u))
    elif name == "star":
        alpha = np.pi / 5 - np.abs(np.mod(np.arctan2(v, u), 2 * np.pi / 5) - np.pi / 5)
        d = rad - 1.1 * r * _star_radius(alpha)
    elif name == "crescent":
        d = np.maximum(rad - r, 0.8 * r - np.hypot(u - 0.45 * r, v))
    elif name == "stripes":
        f = rng.uniform(1.2, 2.2)                              # stripe pairs per unit length
        d = -np.sin(2 * np.pi * f * u + rng.uniform(0, 6.3)) / (2 * np.pi * f)
    elif name == "checker":
        f = rng.uniform(0.6, 1.1)
        d = -np.sin(2 * np.pi * f * u) * np.sin(2 * np.pi * f * v) / (2 * np.pi * f)
    else:  # dots on a lattice
        period = rng.uniform(0.4, 0.6)
        qu, qv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        d = np.hypot(qu, qv) - rng.uniform(0.25, 0.35) * period
    mask = np.clip(0.5 - d / px, 0, 1)[..., None]              # anti-aliased coverage
    img = bg * (1 - mask) + fg * mask
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


def pixel_values(x):
    """Float images in [-1, 1] -> uint8 tensor of the same shape and device, rounded as the official code saves PNGs
    (127.5 x + 128, clamped, truncated: +128, not +127.5). Every PNG and pixel metric of the project uses this."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 numpy array, the PNG layout (see pixel_values)."""
    return pixel_values(x).permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(img):
    """(H, W, 3) uint8 array or RGB PIL image -> (3, H, W) float in [-1, 1]"""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1


class SyntheticImages:
    """The embedded labelled set: SYNTHETIC_SIZES[split] images of 10 classes, drawn on demand at any size.
    Training views are flipped at random (the drawing itself already varies position, scale and colour)."""

    def __init__(self, split, size, seed=0, num_classes=0, per_class=0):
        assert split in SYNTHETIC_SIZES, f"split must be one of {list(SYNTHETIC_SIZES)}, got {split!r}"
        self.split, self.size, self.seed = split, size, seed
        k = len(SYNTHETIC_CLASSES)
        self.num_classes = min(num_classes or k, k)
        self.classes = SYNTHETIC_CLASSES[:self.num_classes]
        n = SYNTHETIC_SIZES[split]
        idx = [i for i in range(n) if i % k < self.num_classes]
        if per_class:
            idx = [i for i in idx if i // k < per_class]
        self.index = idx

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        img, y = render_synthetic(self.index[i], self.split, self.size, self.seed)
        return to_tensor(img), y

    def train_item(self, i, rng):
        x, y = self[i]
        return (x.flip(-1) if rng.uniform() < 0.5 else x), y


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
_unreadable = [0]  # images this process could not decode


def resize_short_side(img, s):
    """Resize so that the short side is s: halve with BOX while the image is >= 2x too big, then BICUBIC
    (as the official center_crop_arr / random_crop_arr)."""
    while min(img.size) >= 2 * s:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = s / min(img.size)
    return img.resize(tuple(max(s, round(x * scale)) for x in img.size), resample=Image.BICUBIC)


def center_crop(img, s):
    img = resize_short_side(img, s)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
    return img.crop((left, top, left + s, top + s))


def random_crop(img, s, rng):
    """The official training augmentation (random_crop_arr): the short side resized to a random size in
    [s, 1.25 s] (crop fraction 0.8-1), a random s x s crop, a horizontal flip half of the time."""
    img = resize_short_side(img, int(rng.integers(s, math.ceil(s * 1.25) + 1)))
    left, top = int(rng.integers(0, img.size[0] - s + 1)), int(rng.integers(0, img.size[1] - s + 1))
    img = img.crop((left, top, left + s, top + s))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else img


class ImageFolder:
    """Images under root, one class per top-level folder, files found recursively (ImageNet's and
    Tiny-ImageNet's layouts); a folder of images without class folders is one class. The split is root/<split>
    when it exists (or a sibling train/ or val/ of root); otherwise every 20th image of each class is held out
    as "val" and the rest is "train". Subsets for classroom runs: the first num_classes classes (sorted), the
    first per_class images of each (sorted)."""

    def __init__(self, root, split, size, num_classes=0, per_class=0):
        assert os.path.isdir(root), f"--data {root}: no such folder (or pass --data synthetic)"
        self.size = size
        base, held_out = root, None
        if os.path.isdir(os.path.join(root, split)):
            base = os.path.join(root, split)
        elif os.path.basename(os.path.normpath(root)) in ("train", "val") and \
                os.path.isdir(os.path.join(os.path.dirname(os.path.normpath(root)), split)):
            base = os.path.join(os.path.dirname(os.path.normpath(root)), split)
        else:
            held_out = split == "val"
        is_img = lambda f: f.lower().endswith(IMAGE_EXTENSIONS)
        folders = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        if not folders or any(is_img(e.name) for e in os.scandir(base)):
            folders = [""]                                      # flat: the folder is one class
        folders = folders[:num_classes or None]
        self.classes = [f or os.path.basename(os.path.normpath(base)) for f in folders]
        self.samples = []
        for label, f in enumerate(folders):
            top = os.path.join(base, f)
            files = sorted(os.path.join(d, n) for d, _, names in os.walk(top) for n in names if is_img(n)) \
                if f else sorted(os.path.join(base, n) for n in os.listdir(base) if is_img(n))
            if held_out is not None:
                files = [p for j, p in enumerate(files) if (j % 20 == 19) == held_out]
            self.samples += [(p, label) for p in files[:per_class or None]]
        assert self.samples, f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {base}"

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """-> (RGB PIL image, label). An unreadable file is reported and replaced by the next one."""
        for k in range(len(self.samples)):
            path, y = self.samples[(i + k) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    return img.convert("RGB"), y
            except (OSError, ValueError, SyntaxError) as e:
                _unreadable[0] += 1
                warnings.warn(f"unreadable image {path} ({type(e).__name__}: {e}); using the next one "
                              f"({_unreadable[0]} unreadable so far in this process)")
        raise RuntimeError("no readable image in the dataset")

    def __getitem__(self, i):
        img, y = self.load(i)
        return to_tensor(center_crop(img, self.size)), y

    def train_item(self, i, rng):
        img, y = self.load(i)
        return to_tensor(random_crop(img, self.size, rng)), y


def make_dataset(data, split, size, seed=0, num_classes=0, per_class=0):
    """data: "synthetic" or an ImageFolder root; split: "train" or "val"; size: image side in pixels."""
    if data == "synthetic":
        return SyntheticImages(split, size, seed, num_classes, per_class)
    return ImageFolder(data, split, size, num_classes, per_class)


def eval_dataset(data, split, size):
    """The evaluation view of a split (center crops), as the other scripts read it."""
    return make_dataset(data, split, size)


@functools.lru_cache(maxsize=2)
def _epoch_order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()


class TrainBatches(torch.utils.data.Dataset):
    """Item k = this process's k-th micro-batch (k = step * grad_accum + micro): the images at global stream
    positions [(k * world + rank) * batch, ... + batch) of a stream that walks through one random permutation
    per epoch, each augmented with its own generator seeded by (seed, position). A pure function of
    (seed, rank, k), so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, dataset, batch, rank=0, world=1, seed=0):
        self.dataset, self.batch, self.rank, self.world, self.seed = dataset, batch, rank, world, seed

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, k):  # -> x (batch, 3, S, S), y (batch,)
        n, start = len(self.dataset), (k * self.world + self.rank) * self.batch
        xs, ys = [], []
        for pos in range(start, start + self.batch):
            i = int(_epoch_order(n, pos // n, self.seed)[pos % n])
            x, y = self.dataset.train_item(i, np.random.default_rng([self.seed, pos]))
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.tensor(ys)


def train_batches(dataset, batch, rank=0, world=1, seed=0, start=0, num_workers=0):
    """Iterator over this process's micro-batches k = start, start + 1, ... (see TrainBatches), loaded by
    num_workers background processes."""
    return iter(torch.utils.data.DataLoader(TrainBatches(dataset, batch, rank, world, seed), batch_size=None,
                                            sampler=itertools.count(start), num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available(),
                                            persistent_workers=num_workers > 0))

# ===========================================================================================================
# Training the tokenizer

import model  # noqa: E402  (below the plumbing, which the other scripts import without needing the model)
from model import LPIPS, TOKENIZER_PRESETS, PatchDiscriminator, Tokenizer  # noqa: E402


@dataclass
class TrainConfig:
    size: str = "toy"            # tokenizer preset (model.TOKENIZER_PRESETS): toy, s-s, s-b, s-l, b-l, xl-xxl, *-2d
    data: str = "synthetic"      # "synthetic" (embedded, no download) or an ImageFolder root (see ImageFolder)
    num_classes: int = 0         # use only the first N classes of the data (0 = all)
    per_class: int = 0           # use only the first M images of each class (0 = all)
    out_dir: str = ""            # "" = out/tokenizer-<size>; holds ckpt.pt, log.jsonl, recon-*.png
    fresh: bool = False          # start over even if out_dir holds a checkpoint (default: continue from it)
    init_from: str = ""          # a new run starts from these tokenizer weights (official GigaTok or ours; same size)
    max_steps: int = -1          # optimizer steps; -1 = the preset's (paper: epochs * 1.28M / batch)
    batch_size: int = -1         # global batch (all processes and accumulation steps); -1 = the preset's
    grad_accum: int = 1          # micro-steps per optimizer step (per-process micro-batch = batch / world / accum)
    lr: float = -1.0             # peak learning rate of both optimizers; -1 = the preset's (paper 1e-4)
    end_lr: float = -1.0         # cosine decay floor; -1 = the preset's (paper 1e-5)
    warmup: int = -1             # linear warmup steps from lr/100; -1 = the preset's (0, or 5000 for XL-XXL)
    weight_decay: float = 1e-4   # AdamW, on every parameter (official DDP trainer)
    beta1: float = 0.9           # AdamW betas (official 0.9, 0.95)
    beta2: float = 0.95
    grad_clip: float = 10.0      # max gradient norm, tokenizer and discriminator alike
    entropy_weight: float = -1.0  # entropy loss weight; -1 = the preset's (0.005 for XL-XXL, Sec. 3.3)
    aux_loss_end: int = -1       # the shortcut reconstruction + feature loss run until this step; -1 = preset's
    disc_start: int = -1         # step at which the PatchGAN starts; -1 = the preset's (paper 20k)
    disc_weight: float = 0.5     # g: weight of the hinge GAN terms, generator and discriminator
    perceptual_weight: float = 1.0  # LPIPS weight
    semantic_weight: float = 0.5    # weight of the semantic regularization (Sec. 3.2)
    teacher: str = ""            # DINOv2 hub entry; "" = the preset's (dinov2_vitb14; toy dinov2_vits14); "none" = off
    teacher_repo: str = "facebookresearch/dinov2"  # torch.hub repo, or a local checkout (offline clusters)
    lpips: bool = True           # perceptual loss; false = opt out (e.g. offline without the weight files)
    vgg_path: str = ""           # local VGG16 ImageNet state dict (torchvision's vgg16-397923af.pth); "" = download
    lpips_lin_path: str = ""     # local LPIPS v0.1 vgg.pth linear heads; "" = download
    precision: str = "auto"      # "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16", "fp16" (GradScaler), "fp32"
    compile: bool = False        # torch.compile the tokenizer
    device: str = ""             # "" = cuda, else mps, else cpu
    num_workers: int = -1        # data-loading processes per GPU process; -1 = 6 on CUDA, 0 on CPU
    threads: int = 0             # torch CPU threads (0 = torch's default)
    seed: int = 0                # model init, data order and augmentation
    log_interval: int = -1       # steps between log lines; -1 = the preset's
    image_interval: int = -1     # steps between PNG grids of held-out reconstructions; -1 = the preset's
    ckpt_interval: int = -1      # steps between checkpoints (and at the end); -1 = the preset's
    eval_images: int = 500       # held-out images for the final PSNR and codebook usage


# Training defaults per preset (spec 1.8, 4.3): global batch, warmup, entropy weight, aux-loss end, disc start,
# and length (epochs of ImageNet's 1.28M images, as the official scripts count them: steps = epochs*1.28M/batch).
# S-L has no official yaml: B-L's values. The 2D presets' lengths are not stated: those of their 1D twins.
# The toy's numbers are ours: a small batch at a high lr for as many steps as ~6 CPU minutes allow.
TRAIN_PRESETS = {  # batch, warmup, entropy, aux_end, disc_start, epochs | steps
    "toy":    dict(batch_size=16, warmup=50, entropy_weight=0.005, aux_loss_end=0, disc_start=10 ** 9, max_steps=450,
                   lr=1e-3, end_lr=1e-4, log_interval=50, image_interval=250, ckpt_interval=250),
    "s-s":    dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=100),
    "s-b":    dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=200),
    "s-l":    dict(batch_size=256, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=200),
    "b-l":    dict(batch_size=256, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=200),
    "xl-xxl": dict(batch_size=256, warmup=5000, entropy_weight=0.005, aux_loss_end=0, disc_start=20000, epochs=300),
    "s-s-2d": dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=100),
    "s-b-2d": dict(batch_size=128, warmup=0, entropy_weight=0.0, aux_loss_end=15000, disc_start=20000, epochs=200),
    "b-l-2d": dict(batch_size=256, warmup=0, entropy_weight=0.005, aux_loss_end=15000, disc_start=20000, epochs=200),
}
PAPER_DEFAULTS = dict(lr=1e-4, end_lr=1e-5, log_interval=100, image_interval=2000, ckpt_interval=5000)
IMAGENET_TRAIN_IMAGES = 1_280_000  # 5000 * 256, the official scripts' epoch


def resolve(cfg):
    """cfg with every -1 / "" default filled from the preset's training defaults."""
    assert cfg.size in TRAIN_PRESETS, f"unknown --size {cfg.size!r}; known: {', '.join(TRAIN_PRESETS)}"
    p = {**PAPER_DEFAULTS, **TRAIN_PRESETS[cfg.size]}
    if "epochs" in p:
        p["max_steps"] = p.pop("epochs") * IMAGENET_TRAIN_IMAGES // p["batch_size"]
    fill = {k: v for k, v in p.items() if getattr(cfg, k) == -1}
    fill["out_dir"] = cfg.out_dir or f"out/tokenizer-{cfg.size}"
    fill["teacher"] = cfg.teacher or ("dinov2_vits14" if cfg.size == "toy" else "dinov2_vitb14")
    return dataclasses.replace(cfg, **fill)


def get_lr(step, cfg):
    """Linear warmup from lr/100, then half a cosine down to end_lr at max_steps (official cosine_v2)."""
    if step < cfg.warmup:
        return cfg.lr / 100 + (cfg.lr - cfg.lr / 100) * step / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.end_lr + 0.5 * (cfg.lr - cfg.end_lr) * (1 + math.cos(math.pi * progress))

# -----------------------------------------------------------------------------------------------------------
# The frozen helpers: the DINOv2 teacher (semantic regularization) and the LPIPS network.

class Teacher(torch.nn.Module):
    """A frozen DINOv2 from torch.hub (github, or a local checkout with source='local'), fed as the official
    code does: [-1, 1] -> ImageNet normalization -> bicubic resize to grid * patch, so that its patch grid is
    the decoder's token grid. -> x_norm_patchtokens (B, grid*grid, dim)."""

    def __init__(self, name, repo, grid):
        super().__init__()
        local = os.path.isdir(repo)
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
        x = ((x + 1) / 2 - self.mean) / self.std
        x = F.interpolate(x, size=self.grid * self.patch, mode="bicubic", align_corners=False)
        return self.net.forward_features(x)["x_norm_patchtokens"].float()   # (B, grid*grid, dim)


def semantic_loss(student, teacher):
    """-mean over tokens and images of cos(student, teacher) (spec 3: not 1 - cos). (B, L, C) twice -> scalar"""
    return -F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()


def load_frozen(what, load, required, rank, master):
    """Load a frozen helper (rank 0 first, so a download happens once). If it fails: a paper preset stops with
    the how-to-fix message; the toy says so once and trains without it."""
    def attempt():
        try:
            return load(), None
        except Exception as e:  # network, missing files, a broken checkout: all reported the same way
            return None, f"{type(e).__name__}: {e}"
    if rank == 0:
        net, err = attempt()
    barrier()
    if rank != 0:
        net, err = attempt()
    if err and required:
        raise SystemExit(f"could not load {what}: {err}\n{required}")
    if err and master:
        print(f"warning: could not load {what} ({err.splitlines()[0][:200]}); training without it")
    return net

# -----------------------------------------------------------------------------------------------------------
# Held-out evaluation and pictures

def psnr(x, y):
    """Per-image PSNR (dB) of images in [-1, 1], measured as evaluate.py does: on uint8 PNG values."""
    q = lambda t: pixel_values(t).float()                 # on the images' device
    mse = (q(x) - q(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_held_out(tok, data, n, batch, rank, world, device):
    """Mean PSNR and codebook usage (distinct codes / K) over the first n held-out images, in eval mode."""
    tok.eval()
    n = min(n, len(data))
    total, used = torch.zeros(2, device=device, dtype=torch.float64), torch.zeros(tok.cfg.codebook_size, device=device)
    mine = list(range(rank, n, world))
    for s in range(0, len(mine), batch):
        x = torch.stack([data[i][0] for i in mine[s:s + batch]]).to(device)
        codes = tok.encode(x)
        total += torch.stack([psnr(tok.decode(codes).float(), x).sum().double(),
                              torch.tensor(len(x), dtype=torch.float64, device=device)])
        used[codes.flatten().unique()] = 1
    all_reduce(total)
    all_reduce(used, "max")
    tok.train()
    return (total[0] / total[1]).item(), used.mean().item()


@torch.no_grad()
def save_grid(tok, x, path):
    """PNG: held-out originals (top row) over their reconstructions (bottom row)."""
    tok.eval()
    rec = tok.decode(tok.encode(x)).float()
    tok.train()
    rows = torch.cat([torch.cat(list(x), -1), torch.cat(list(rec), -1)], -2)      # (3, 2H, n*W)
    if x.shape[-1] < 128:                                                          # small images: enlarge 2x
        rows = rows.repeat_interleave(2, -1).repeat_interleave(2, -2)
    Image.fromarray(to_uint8(rows[None])[0]).save(path)

# -----------------------------------------------------------------------------------------------------------
# Training

def count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def batch_and_precision(cfg, world, device):
    """The per-process micro-batch of a global cfg.batch_size, and the precision with its autocast context
    (auto: bf16 on CUDA, fp32 elsewhere). Shared by the training scripts."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    assert micro * world * cfg.grad_accum == cfg.batch_size, \
        f"batch {cfg.batch_size} does not split into {world} processes x {cfg.grad_accum} accumulation steps"
    precision = ("bf16" if device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision
    assert precision in ("bf16", "fp16", "fp32"), f"--precision {cfg.precision!r}: auto, bf16, fp16 or fp32"
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[precision]
    return micro, precision, (torch.autocast(device.type, dtype) if precision != "fp32" else nullcontext())


def init_tokenizer(tok, path, master=True):
    """Fine-tuning: fill a new run's tokenizer from an official GigaTok or our checkpoint of the same architecture.
    A released checkpoint without the semantic head keeps this run's freshly initialized head (and says so)."""
    src = model.load_tokenizer(path).state_dict()
    mine = tok.state_dict()
    fresh_head = [k for k in mine if k.startswith("decoder.semantic_head.") and k not in src]
    wrong = sorted(set(src) ^ (set(mine) - set(fresh_head))) + \
        [k for k in src if k in mine and src[k].shape != mine[k].shape]
    if wrong:
        raise SystemExit(f"--init-from {path}: its tokenizer does not fit --size's ({len(wrong)} tensors differ, "
                         f"first {wrong[0]}); pass the --size it was trained as")
    tok.load_state_dict({**mine, **src})
    if master:
        print(f"initialized from {path}" + (" (semantic head absent there: freshly initialized)" if fresh_head else ""))


def main(cfg: TrainConfig):
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the official trainer
    paper = cfg.size != "toy"
    micro, precision, autocast = batch_and_precision(cfg, world, device)

    # 1. data
    train_set = make_dataset(cfg.data, "train", TOKENIZER_PRESETS[cfg.size].image_size, cfg.seed,
                             cfg.num_classes, cfg.per_class)
    val_set = make_dataset(cfg.data, "val", TOKENIZER_PRESETS[cfg.size].image_size, cfg.seed, cfg.num_classes)
    shown = torch.stack([val_set[i * len(val_set) // 8][0] for i in range(8)]).to(device)  # 8 held-out images

    # 2. models: the tokenizer, the discriminator, and the frozen teacher and LPIPS
    tcfg = dataclasses.replace(TOKENIZER_PRESETS[cfg.size], entropy_weight=cfg.entropy_weight)
    torch.manual_seed(cfg.seed)
    tok = Tokenizer(tcfg).to(device)
    disc = PatchDiscriminator().to(device)
    fix = "fix: give the machine network access, or pass --{} (local files), or opt out with --{}"
    teacher = None
    if tcfg.teacher_dim and cfg.teacher != "none":
        teacher = load_frozen(f"the DINOv2 teacher {cfg.teacher} from {cfg.teacher_repo}",
                              lambda: Teacher(cfg.teacher, cfg.teacher_repo, tcfg.grid).to(device),
                              paper and fix.format("teacher-repo <checkout of facebookresearch/dinov2 with the "
                                                   "weights in $TORCH_HOME/hub/checkpoints>", "teacher none"),
                              rank, master)
    lpips = None
    if cfg.lpips and cfg.perceptual_weight > 0:
        lpips = load_frozen("the LPIPS weights (VGG16 + linear heads)",
                            lambda: model.load_lpips(LPIPS(), cfg.vgg_path or None, cfg.lpips_lin_path or None)
                            .to(device).train(),  # train mode: dropout in its heads, as the official trainer
                            paper and fix.format("vgg-path ... --lpips-lin-path ...", "lpips false"), rank, master)
    opt = torch.optim.AdamW(tok.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    scaler, scaler_d = (torch.amp.GradScaler(device.type, enabled=precision == "fp16") for _ in range(2))

    # 3. resume from out_dir/ckpt.pt unless --fresh
    ckpt_path, step = os.path.join(cfg.out_dir, "ckpt.pt"), 0
    if os.path.exists(ckpt_path) and not cfg.fresh:
        ckpt = load_checkpoint(ckpt_path, device)
        same = lambda c: json.loads(json.dumps(c))  # tuples and lists compare equal
        if same(ckpt["config"]["tokenizer"]) != same(asdict(tcfg)):
            raise SystemExit(f"{ckpt_path} holds another tokenizer configuration: pass --fresh or another --out-dir")
        tok.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["discriminator"])
        opt.load_state_dict(ckpt["optimizer"])
        opt_d.load_state_dict(ckpt["optimizer_disc"])
        step = ckpt["step"]
        if ckpt["config"]["train"]["batch_size"] != cfg.batch_size and master:
            print(f"note: the checkpoint was trained at batch {ckpt['config']['train']['batch_size']}")
    elif cfg.init_from:
        init_tokenizer(tok, cfg.init_from, master)
    raw = tok
    if cfg.compile:
        tok = torch.compile(tok)
    if world > 1:  # find_unused: the semantic head idles without a teacher, the shortcut after aux_loss_end
        tok = torch.nn.parallel.DistributedDataParallel(tok, device_ids=[device.index] if device.type == "cuda"
                                                        else None, find_unused_parameters=True)

    def save():
        save_checkpoint(dict(model=raw.state_dict(), discriminator=disc.state_dict(), optimizer=opt.state_dict(),
                             optimizer_disc=opt_d.state_dict(), step=step, images_seen=step * cfg.batch_size,
                             config=dict(tokenizer=asdict(tcfg), train=asdict(cfg), classes=train_set.classes)),
                        ckpt_path)

    if master:
        parts = dict(cnn_encoder=raw.cnn_encoder, encoder=raw.encoder, decoder=raw.decoder, cnn_decoder=raw.cnn_decoder)
        other = count(raw) - sum(count(m) for m in parts.values())
        print(f"tokenizer {cfg.size}: {count(raw) / 1e6:.2f}M params (" + ", ".join(
            f"{k} {count(m) / 1e6:.2f}M" for k, m in parts.items()) + f", quantizer+projections {other / 1e6:.3f}M; "
            f"decoder includes the semantic head); discriminator {count(disc) / 1e6:.2f}M")
        print(f"data {cfg.data}: {len(train_set)} training / {len(val_set)} held-out images of {len(train_set.classes)}"
              f" classes at {tcfg.image_size}px; {cfg.batch_size} images per step = {world} processes x "
              f"{cfg.grad_accum} micro-steps x {micro}; device {device}, {precision}")
        print(f"teacher: {'%s (%.1fM, frozen)' % (cfg.teacher, count(teacher) / 1e6) if teacher else 'off'}; "
              f"LPIPS: {'on' if lpips else 'off'}; steps {step} -> {cfg.max_steps}, lr {cfg.lr:g} (warmup "
              f"{cfg.warmup}, cosine to {cfg.end_lr:g}), disc_start {cfg.disc_start}, aux_loss_end {cfg.aux_loss_end}"
              + (f"; resuming from {ckpt_path}" if step else ""))

    # 4. the loop. L_G = MSE + LPIPS + g*GAN + (vq + commit + entropy) + 0.5*semantic  [+ shortcut terms early]
    log = Logger(cfg.out_dir, master)
    batches = train_batches(train_set, micro, rank, world, cfg.seed, start=step * cfg.grad_accum,
                            num_workers=(6 if device.type == "cuda" else 0) if cfg.num_workers < 0 else cfg.num_workers)
    tok.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"tokenizer {cfg.size}", disable=not master)
    t0, seen = time.time(), 0
    while step < cfg.max_steps:
        lr = get_lr(step, cfg)
        for group in opt.param_groups + opt_d.param_groups:
            group["lr"] = lr
        g = cfg.disc_weight if step >= cfg.disc_start else 0.0  # the disc_start guard (adopt_weight)
        early = step < cfg.aux_loss_end                          # shortcut reconstruction + feature loss
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # dropout masks: a function of the step
        for k in range(cfg.grad_accum):
            x, _ = next(batches)
            x = x.to(device, non_blocking=True)
            sync = k == cfg.grad_accum - 1 or world == 1
            with (nullcontext() if sync else tok.no_sync()), autocast:
                t_feat = teacher(x) if teacher is not None else None
                recon, aux = tok(x, shortcut=early)
                recons = [recon] + ([aux["shortcut"]] if early else [])   # x_hat and, early on, x_hat_dir
                disc.requires_grad_(False)                               # D is a fixed critic in the G step
                terms = dict(
                    mse=sum(F.mse_loss(r.float(), x) for r in recons),
                    lpips=sum(lpips(x, r).mean() for r in recons) if lpips is not None else x.new_zeros(()),
                    gan=sum(-disc(r).float().mean() for r in recons) if g > 0 else x.new_zeros(()),
                    quant=aux["vq_loss"] + aux["commit_loss"] + aux["entropy_loss"],
                    feat=aux["feat_rec_loss"] if early else x.new_zeros(()),
                    semantic=semantic_loss(aux["sem_feat"], t_feat) if t_feat is not None else x.new_zeros(()))
                loss = (terms["mse"] + cfg.perceptual_weight * terms["lpips"] + g * terms["gan"] + terms["quant"]
                        + terms["feat"] + cfg.semantic_weight * terms["semantic"])
            scaler.scale(loss / cfg.grad_accum).backward()
            if g > 0:  # discriminator: hinge on real vs the same (detached) reconstructions, scaled by g
                disc.requires_grad_(True)
                with autocast:
                    real = disc(x).float()
                    d_loss = g * sum(0.5 * (F.relu(1 - real).mean() + F.relu(1 + disc(r.detach()).float()).mean())
                                     for r in recons)
                scaler_d.scale(d_loss / cfg.grad_accum).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(tok.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if g > 0:  # the discriminator is not wrapped in DDP: average its gradients here
            for p in disc.parameters():
                if p.grad is not None:
                    all_reduce(p.grad).div_(world)
            scaler_d.unscale_(opt_d)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            scaler_d.step(opt_d)
            scaler_d.update()
            opt_d.zero_grad(set_to_none=True)
        step += 1
        seen += cfg.batch_size
        bar.update()
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            dt, t0 = time.time() - t0, time.time()
            log(step, loss=loss.item(), **{k: v.item() for k, v in terms.items()},
                d_loss=d_loss.item() if g > 0 else 0.0, usage=aux["usage"], grad_norm=grad_norm.item(), lr=lr,
                img_per_s=seen / dt)
            seen = 0
        if step % cfg.image_interval == 0 or step == cfg.max_steps:
            if master:
                save_grid(raw, shown, os.path.join(cfg.out_dir, f"recon-{step:07d}.png"))
            if step < cfg.max_steps:  # a quick look at 100 held-out images (all of them at the end)
                log(step, val_psnr_100=evaluate_held_out(raw, val_set, 100, 32, rank, world, device)[0])
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save()
    bar.close()
    if not os.path.exists(ckpt_path):  # max_steps 0
        save()
    val_psnr, usage = evaluate_held_out(raw, val_set, cfg.eval_images, 32, rank, world, device)
    if master:
        log(step, val_psnr=val_psnr, val_usage=usage)
        print(f"held-out PSNR {val_psnr:.2f} dB, codebook usage {100 * usage:.1f}% over "
              f"{min(cfg.eval_images, len(val_set))} images; checkpoint {ckpt_path}")
    cleanup_distributed()
    return dict(step=step, val_psnr=val_psnr, usage=usage, tokenizer=raw, discriminator=disc, teacher=teacher)


if __name__ == "__main__":
    main(parse_config(TrainConfig()))
