"""
The images every script reads, and the stream of training batches.

    make_dataset(data, split, size, ...)   "synthetic" (drawn here, no download) or an ImageFolder root;
                                            item i -> (x (3, S, S) float in [-1, 1], label), the center crop;
                                            .train_item(i, rng) -> the augmented training view
    train_batches(dataset, batch, ...)     augmented micro-batches, a pure function of (seed, rank, step)
    in_order(dataset, lo, hi, batch, ...)  the items lo .. hi-1 in order, batched: for encoding and evaluation
    workers(n, device)                     what --num-workers -1 means: 6 loading processes on CUDA, 0 on CPU
    stream_indices(n, start, count, seed)  which images the batch stream visits (the AR trainer walks it too)
    pixel_values / to_uint8 / to_tensor    [-1, 1] floats <-> the uint8 values a PNG holds
    psnr(a, b), image_grid(rows)           the project's one PSNR, and the PNG grids of the scripts
"""
import functools
import itertools
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

import runtime

# -----------------------------------------------------------------------------------------------------------
# Pixels: every PNG and every pixel metric of the project sees the images through pixel_values.


def pixel_values(x):
    """Float images in [-1, 1] -> uint8 tensor of the same shape and device, rounded as the official code saves PNGs
    (127.5 x + 128, clamped, truncated: +128, not +127.5). Every PNG and pixel metric of the project uses this."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 numpy array, the PNG layout (see pixel_values)."""
    return pixel_values(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)


def to_tensor(img):
    """(H, W, 3) uint8 array or RGB PIL image -> (3, H, W) float in [-1, 1]"""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()  # (H, W, 3) -> (3, H, W)
    return a / 127.5 - 1


def psnr(a, b):
    """PSNR in dB of uint8 images (numpy arrays or tensors, any layout): one image -> float, a batch (B, ...) ->
    (B,) float64 numpy, one per image. Computed in float64 on the CPU, which is exact for uint8 values: equals
    skimage.metrics.peak_signal_noise_ratio (data range 255), and inf for identical images."""
    # exact: integers
    a, b = (torch.as_tensor(np.asarray(t.cpu() if torch.is_tensor(t) else t)).double() for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    single = a.ndim == 3
    mse = (a - b).pow(2).reshape(1 if single else len(a), -1).mean(1)                # (B,)
    out = (10 * torch.log10(255.0 ** 2 / mse)).numpy()                                # 0 -> inf, as skimage
    return float(out[0]) if single else out


def image_grid(rows):
    """rows: a list of (n, H, W, 3) uint8 arrays -> one (len(rows) * H, n * W, 3) array, rows top to bottom."""
    return np.concatenate([np.concatenate(list(row), 1) for row in rows], 0)  # images side by side, rows stacked

# -----------------------------------------------------------------------------------------------------------
# The synthetic set: 10 classes of shapes and patterns, drawn on demand at any resolution (no download).
# Item i is a pure function of (seed, split, i); class = i % 10.

SYNTHETIC_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star", "crescent", "stripes", "checker",
                     "dots"]
SYNTHETIC_SIZES = {"train": 10000, "val": 500}  # images per split (classes balanced: class = index % 10)


def _star_radius(alpha, outer=1.0, inner=0.45):
    """Radius of a five-pointed star's outline at angle alpha in [0, 36 deg] from an outer vertex."""
    a = np.array([outer, 0.0])  # the outer vertex, on the x axis
    b = inner * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])  # the inner vertex, 36 degrees on
    e = b - a
    cross = lambda u, v: u[0] * v[1] - u[1] * v[0]
    return cross(a, e) / (np.cos(alpha) * e[1] - np.sin(alpha) * e[0])  # where the ray at alpha meets edge a -> b


# Flat colours and centred, nearly upright shapes: simple enough that the toy AR model learns the classes in a few
# CPU minutes (README, "The AR model").
PALETTE = np.array([(0.9, 0.15, 0.15), (1.0, 0.6, 0.1), (0.95, 0.9, 0.2), (0.2, 0.7, 0.25), (0.15, 0.7, 0.85),
                    (0.15, 0.25, 0.8), (0.6, 0.25, 0.7), (0.95, 0.95, 0.95), (0.12, 0.12, 0.12)])


def render_synthetic(index, split, size, seed=0):
    """One procedurally drawn image, (size, size, 3) uint8, and its label: a shape or a pattern in one palette
    colour on another. Shapes and checkers are nearly upright, shapes near the center with random scale; patterns
    have random frequency, stripes and dots random orientation. A pure function of (seed, split, index); drawn at
    `size` directly (edges anti-aliased to one pixel), so any resolution works."""
    label = index % len(SYNTHETIC_CLASSES)  # balanced classes
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], index])  # one generator per image
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
    # coverage from the signed distance: 1 inside, 0 outside, a one-pixel ramp on the edge
    mask = np.clip(0.5 - d / px, 0, 1)[..., None]              # anti-aliased coverage
    img = bg * (1 - mask) + fg * mask  # (S, S, 3) floats in [0, 1]
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


class SyntheticImages:
    """The embedded labelled set: SYNTHETIC_SIZES[split] images of 10 classes, drawn on demand at any size.
    Training views are flipped at random (the drawing itself already varies position, scale and colour)."""

    def __init__(self, split, size, seed=0, num_classes=0, per_class=0):
        if split not in SYNTHETIC_SIZES:
            raise runtime.UserError(f"--split {split!r}: one of {', '.join(SYNTHETIC_SIZES)}")
        self.split, self.size, self.seed = split, size, seed
        k = len(SYNTHETIC_CLASSES)
        self.num_classes = min(num_classes or k, k)
        self.classes = SYNTHETIC_CLASSES[:self.num_classes]
        n = SYNTHETIC_SIZES[split]
        idx = [i for i in range(n) if i % k < self.num_classes]  # class = index % 10
        if per_class:
            idx = [i for i in idx if i // k < per_class]  # the first per_class images of each class
        self.index = idx

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        img, y = render_synthetic(self.index[i], self.split, self.size, self.seed)  # (S, S, 3) uint8, drawn now
        return to_tensor(img), y

    def train_item(self, i, rng):
        x, y = self[i]
        return (x.flip(-1) if rng.uniform() < 0.5 else x), y  # a horizontal flip half of the time



# -----------------------------------------------------------------------------------------------------------
# Image folders: ImageNet's layout (and any folder of photos), with the official crops.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
_unreadable = [0]  # images this process could not decode


def open_rgb(path):
    """An image file in any Pillow mode -> an RGB image: its EXIF orientation applied, transparency composited over
    white, 16-bit and float images scaled to 8 bits (convert("RGB") alone would clip them)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)                     # phone photos: upright, as a viewer shows them
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            a = a / 257 if a.max() > 255 else a * 255 if a.max() <= 1 else a   # 16-bit, or floats in [0, 1]
            img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))  # rounded to 8 bits
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))  # over white
        return img.convert("RGB")


def resize_short_side(img, s):
    """Resize so that the short side is s: halve with BOX while the image is >= 2x too big, then BICUBIC
    (as the official center_crop_arr / random_crop_arr)."""
    while min(img.size) >= 2 * s:  # BOX halving first: cheap, and alias-free
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = s / min(img.size)
    return img.resize(tuple(max(s, round(x * scale)) for x in img.size), resample=Image.BICUBIC)  # short side exactly s


def center_crop(img, s):
    img = resize_short_side(img, s)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2  # the centered s x s window
    return img.crop((left, top, left + s, top + s))


def random_crop(img, s, rng):
    """The official training augmentation (random_crop_arr): the short side resized to a random size in
    [s, 1.25 s] (crop fraction 0.8-1), a random s x s crop, a horizontal flip half of the time."""
    img = resize_short_side(img, int(rng.integers(s, math.ceil(s * 1.25) + 1)))  # a random zoom
    left, top = int(rng.integers(0, img.size[0] - s + 1)), int(rng.integers(0, img.size[1] - s + 1))  # a random window
    img = img.crop((left, top, left + s, top + s))  # (left, upper, right, lower)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else img


class ImageFolder:
    """Images under root, one class per top-level folder, files found recursively (ImageNet's and
    Tiny-ImageNet's layouts); a folder of images without class folders is one class. The split is root/<split>
    when it exists (or a sibling train/ or val/ of root); otherwise every 20th image of each class is held out
    as "val" (a class of 2 to 19 images: its last one) and the rest is "train". Subsets for classroom runs: the
    first num_classes classes (sorted), the first per_class images of each (sorted). Files that are not images
    (by extension) and empty class folders are skipped with a warning; see load() for unreadable images."""

    def __init__(self, root, split, size, num_classes=0, per_class=0):
        if not os.path.isdir(root):
            raise runtime.UserError(f"--data {root!r}: no such folder (or pass --data synthetic)")
        self.size = size
        base, held_out = root, None
        if os.path.isdir(os.path.join(root, split)):
            base = os.path.join(root, split)
        elif os.path.basename(os.path.normpath(root)) in ("train", "val") and \
                os.path.isdir(os.path.join(os.path.dirname(os.path.normpath(root)), split)):
            base = os.path.join(os.path.dirname(os.path.normpath(root)), split)
        else:
            held_out = split == "val"
        is_img = lambda f: f.lower().endswith(IMAGE_EXTENSIONS)  # by extension; a misnamed file fails in load()
        folders = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
        if not folders or any(is_img(e.name) for e in os.scandir(base)):
            folders = [""]                                      # flat: the folder is one class
        folders = folders[:num_classes or None]  # a classroom subset: the first classes, sorted
        self.classes = [f or os.path.basename(os.path.normpath(base)) for f in folders]  # a flat folder's class: its name
        self.samples, others, empty = [], 0, []
        for label, f in enumerate(folders):
            top = os.path.join(base, f)
            names = sorted(os.path.join(d, n) for d, _, ns in os.walk(top) for n in ns if not n.startswith(".")) \
                if f else sorted(os.path.join(base, n) for n in os.listdir(base) if os.path.isfile(os.path.join(base, n)))
            files = [p for p in names if is_img(p)]
            others, empty = others + len(names) - len(files), empty + ([self.classes[label]] if not files else [])
            if held_out is not None:  # 5% held out, the same files every run; a small class holds out its last
                # indices held out
                val = {j for j in range(len(files)) if j % 20 == 19} or ({len(files) - 1} if len(files) >= 2 else set())
                files = [p for j, p in enumerate(files) if (j in val) == held_out]
            self.samples += [(p, label) for p in files[:per_class or None]]  # (path, class index) pairs
        if others or empty:
            warnings.warn(f"{base}: skipped {others} files that are not images ({', '.join(IMAGE_EXTENSIONS)})"
                          + (f" and {len(empty)} class folders without images ({', '.join(empty[:5])})" if empty else ""))
        if not self.samples:  # nothing to train or evaluate on: say so before anything starts
            why = " (a held-out split needs classes of at least 2 images)" if held_out else ""
            raise runtime.UserError(f"--data {root}: no {split} images ({', '.join(IMAGE_EXTENSIONS)}) under {base}{why}")

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """-> (RGB PIL image, label). An unreadable file (truncated, corrupt, empty, not an image) is counted in a
        warning and replaced by the next one, so a run never stops on a bad file."""
        for k in range(len(self.samples)):
            path, y = self.samples[(i + k) % len(self.samples)]
            try:
                return open_rgb(path), y  # any mode -> RGB
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                _unreadable[0] += 1
                warnings.warn(f"unreadable image {path} ({type(e).__name__}: {e}); using the next one "
                              f"({_unreadable[0]} unreadable so far in this process)")
        raise RuntimeError("no readable image in the dataset")

    def __getitem__(self, i):
        img, y = self.load(i)
        return to_tensor(center_crop(img, self.size)), y  # the evaluation view: (3, S, S)

    def train_item(self, i, rng):
        img, y = self.load(i)
        return to_tensor(random_crop(img, self.size, rng)), y  # the training view: (3, S, S)



# -----------------------------------------------------------------------------------------------------------
# The batch stream: a pure function of (seed, rank, step), so a resumed run sees the batches it would have seen.

def make_dataset(data, split, size, seed=0, num_classes=0, per_class=0):
    """data: "synthetic" or an ImageFolder root; split: "train" or "val"; size: image side in pixels."""
    if data == "synthetic":  # drawn on demand: no files, any resolution
        return SyntheticImages(split, size, seed, num_classes, per_class)
    return ImageFolder(data, split, size, num_classes, per_class)  # a folder of photos (ImageNet's layout, or flat)


@functools.lru_cache(maxsize=2)
def _epoch_order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()   # (n,)


def stream_indices(n, start, count, seed):
    """The images at positions start .. start+count-1 of the stream that walks through one random permutation of
    the n images per epoch (position p is image order_{p // n}[p % n]) -> (count,) int array."""
    return np.array([_epoch_order(n, p // n, seed)[p % n] for p in range(start, start + count)], dtype=np.int64)


class TrainBatches(torch.utils.data.Dataset):
    """Item k = this process's k-th micro-batch (k = step * grad_accum + micro): the images at global stream
    positions [(k * world + rank) * batch, ... + batch) (see stream_indices), each augmented with its own
    generator seeded by (seed, position). A pure function of (seed, rank, k), so a resumed run sees exactly the
    batches it would have seen."""

    def __init__(self, dataset, batch, rank=0, world=1, seed=0):
        self.dataset, self.batch, self.rank, self.world, self.seed = dataset, batch, rank, world, seed

    def __len__(self):
        return 2 ** 62                               # endless: the trainer decides when to stop

    def __getitem__(self, k):  # -> x (batch, 3, S, S), y (batch,)
        start = (k * self.world + self.rank) * self.batch
        items = [self.dataset.train_item(int(i), np.random.default_rng([self.seed, start + j]))
                 for j, i in enumerate(stream_indices(len(self.dataset), start, self.batch, self.seed))]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def train_batches(dataset, batch, rank=0, world=1, seed=0, start=0, num_workers=0):
    """Iterator over this process's micro-batches k = start, start + 1, ... (see TrainBatches), loaded by
    num_workers background processes."""
    # each item is a whole batch
    return iter(torch.utils.data.DataLoader(TrainBatches(dataset, batch, rank, world, seed), batch_size=None,
                                            # k = start, start+1, ...
                                            sampler=itertools.count(start), num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available(),
                                            persistent_workers=num_workers > 0))


def in_order(dataset, lo, hi, batch, num_workers=0):
    """Iterable over the items lo .. hi-1 of dataset in order, `batch` at a time: (x (b, ...), y (b,)), loaded by
    num_workers background processes (the DataLoader keeps the order). Code extraction and evaluation read this."""
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available())


def workers(n, device):
    """The flag --num-workers: n, or for -1 six loading processes on CUDA (decoding JPEGs would starve the GPU)
    and none on a CPU, whose cores are the compute."""
    return (6 if torch.device(device).type == "cuda" else 0) if n < 0 else n

