"""
The images every script reads, and the stream of training batches.

    make_dataset(data, split, size, ...)   "synthetic" (drawn here, no download) or an ImageFolder root;
                                            item i -> (x (3, S, S) float in [-1, 1], label), the center crop;
                                            .train_item(i, rng) -> the augmented training view;
                                            .classes (ids), .names (readable), .layout (what was found)
    find_layout(folder)                    the dataset layouts recognized: Tiny ImageNet, ImageNet, class
                                            folders train/ + val/ or test/, a flat folder of photos
    train_batches(dataset, batch, ...)     augmented micro-batches, a pure function of (seed, rank, step)
    in_order(dataset, lo, hi, batch, ...)  the items lo .. hi-1 in order, batched: for encoding and evaluation
    workers(n, device)                     what --num-workers -1 means: 6 loading processes on CUDA, 0 on CPU
    stream_indices(n, start, count, seed)  which images the batch stream visits (the AR trainer walks it too)
    pixel_values / to_uint8 / to_tensor    [-1, 1] floats <-> the uint8 values a PNG holds
    psnr(a, b), image_grid(rows)           the project's one PSNR, and the PNG grids of the scripts
"""
import functools
import dataclasses
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
    """Float images in [-1, 1] -> uint8 tensor of the same shape and device, rounded as the official code
    saves PNGs (tokenizer/tokenizer_image/reconstruction_ddp.py, inherited from LlamaGen): 127.5 x + 128,
    clamped, truncated (+128, not +127.5). Every PNG and pixel metric of the project uses this."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8 numpy array, the PNG layout (see pixel_values)."""
    return pixel_values(x).permute(0, 2, 3, 1).cpu().numpy()  # (B, 3, H, W) -> (B, H, W, 3)


def to_tensor(img):
    """(H, W, 3) uint8 array or RGB PIL image -> (3, H, W) float in [-1, 1]"""
    # (H, W, 3) -> (3, H, W)
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return a / 127.5 - 1


def psnr(a, b):
    """PSNR in dB of uint8 images (numpy arrays or tensors, any layout): one image -> float, a batch
    (B, ...) -> (B,) float64 numpy, one per image. Computed in float64 on the CPU, which is exact for uint8
    values: equals skimage.metrics.peak_signal_noise_ratio (data range 255), and inf for identical images."""
    # exact: integers
    a, b = (torch.as_tensor(np.asarray(t.cpu() if torch.is_tensor(t) else t)).double() for t in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    single = a.ndim == 3
    mse = (a - b).pow(2).reshape(1 if single else len(a), -1).mean(1)                # (B,)
    out = (10 * torch.log10(255.0 ** 2 / mse)).numpy()                                # 0 -> inf, as skimage
    return float(out[0]) if single else out


def image_grid(rows):
    """rows: a list of (n, H, W, 3) uint8 arrays -> one (len(rows) * H, n * W, 3) array, rows top to
    bottom."""
    # images side by side, rows stacked
    return np.concatenate([np.concatenate(list(row), 1) for row in rows], 0)

# -----------------------------------------------------------------------------------------------------------
# The synthetic set: 10 classes of shapes and patterns, drawn on demand at any resolution (no download).
# Item i is a pure function of (seed, split, i); class = i % 10.

SYNTHETIC_CLASSES = ["circle", "square", "triangle", "ring", "cross", "star", "crescent",
                     "stripes", "checker", "dots"]
SYNTHETIC_SIZES = {"train": 10000, "val": 500}  # images per split (classes balanced: class = index % 10)


def _star_radius(alpha, outer=1.0, inner=0.45):
    """Radius of a five-pointed star's outline at angle alpha in [0, 36 deg] from an outer vertex."""
    a = np.array([outer, 0.0])  # the outer vertex, on the x axis
    b = inner * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])  # the inner vertex, 36 degrees on
    e = b - a
    cross = lambda u, v: u[0] * v[1] - u[1] * v[0]
    # where the ray at alpha meets the edge a -> b
    return cross(a, e) / (np.cos(alpha) * e[1] - np.sin(alpha) * e[0])


# Flat colours and centred, nearly upright shapes: simple enough that the toy AR model learns the classes
# in a short CPU run (README, "The AR model").
PALETTE = np.array([(0.9, 0.15, 0.15), (1.0, 0.6, 0.1), (0.95, 0.9, 0.2), (0.2, 0.7, 0.25), (0.15, 0.7, 0.85),
                    (0.15, 0.25, 0.8), (0.6, 0.25, 0.7), (0.95, 0.95, 0.95), (0.12, 0.12, 0.12)])


def render_synthetic(index, split, size, seed=0):
    """One procedurally drawn image, (size, size, 3) uint8, and its label: a shape or a pattern in one
    palette colour on another. Shapes and checkers are nearly upright, shapes near the center with random
    scale; patterns have random frequency, stripes and dots random orientation. A pure function of
    (seed, split, index); drawn at `size` directly (edges anti-aliased to one pixel), so any resolution
    works."""
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
    # stripes and dots take any orientation; shapes and checkers stay nearly upright
    free = name in ("stripes", "dots")
    th = rng.uniform(0, 2 * np.pi) if free else np.pi / 2 + rng.uniform(-0.25, 0.25)
    u = np.cos(th) * (X - cx) + np.sin(th) * (Y - cy)          # rotated coordinates
    v = -np.sin(th) * (X - cx) + np.cos(th) * (Y - cy)
    rad = np.hypot(u, v)
    # d: (approximate) signed distance to the outline, negative inside
    if name == "circle":
        d = rad - r
    elif name == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    elif name == "triangle":
        # apex up (+u), so that its mirror image (the flip augmentation) is the same shape
        d = np.max([np.cos(k) * u + np.sin(k) * v
                    for k in np.pi / 3 + np.arange(3) * 2 * np.pi / 3], 0) - 0.6 * r
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
        self.names, self.layout = self.classes, "drawn on demand, no files"
        n = SYNTHETIC_SIZES[split]
        idx = [i for i in range(n) if i % k < self.num_classes]  # class = index % 10
        if per_class:
            idx = [i for i in idx if i // k < per_class]  # the first per_class images of each class
        self.index = idx

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        # (S, S, 3) uint8, drawn now
        img, y = render_synthetic(self.index[i], self.split, self.size, self.seed)
        return to_tensor(img), y

    def train_item(self, i, rng):
        x, y = self[i]
        return (x.flip(-1) if rng.uniform() < 0.5 else x), y  # a horizontal flip half of the time



# -----------------------------------------------------------------------------------------------------------
# Image folders: the layouts of ImageNet, Tiny ImageNet, class folders, any folder of photos; the official
# crops (dataset/augmentation.py in SilentView/GigaTok).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
_unreadable = [0]  # images this process could not decode


def open_rgb(path):
    """An image file in any Pillow mode -> an RGB image: its EXIF orientation applied, transparency
    composited over white, 16-bit and float images scaled to 8 bits (convert("RGB") alone would clip them)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)                     # phone photos: upright, as a viewer shows them
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(img, dtype=np.float64)
            a = a / 257 if a.max() > 255 else a * 255 if a.max() <= 1 else a   # 16-bit, or floats in [0, 1]
            img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))  # rounded to 8 bits
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            # over white
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        return img.convert("RGB")


def resize_short_side(img, s):
    """Resize so that the short side is s: halve with BOX while the image is >= 2x too big, then BICUBIC
    (as the official center_crop_arr / random_crop_arr, dataset/augmentation.py)."""
    while min(img.size) >= 2 * s:  # BOX halving first: cheap, and alias-free
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = s / min(img.size)
    # the short side exactly s
    return img.resize(tuple(max(s, round(x * scale)) for x in img.size), resample=Image.BICUBIC)


def center_crop(img, s):
    img = resize_short_side(img, s)
    left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2  # the centered s x s window
    return img.crop((left, top, left + s, top + s))


def random_crop(img, s, rng):
    """The official training augmentation (random_crop_arr, dataset/augmentation.py): the short side resized
    to a random size in [s, 1.25 s] (crop fraction 0.8-1), a random s x s crop, a horizontal flip half of the
    time."""
    img = resize_short_side(img, int(rng.integers(s, math.ceil(s * 1.25) + 1)))  # a random zoom
    # a random window
    left, top = int(rng.integers(0, img.size[0] - s + 1)), int(rng.integers(0, img.size[1] - s + 1))
    img = img.crop((left, top, left + s, top + s))  # (left, upper, right, lower)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.uniform() < 0.5 else img


# The layouts a --data folder may have, recognized by their folder names and annotation files (find_layout).
SPLITS = ("train", "val", "test")  # folder names that are splits, never classes


def dataset_top(root):
    """The folder that holds the splits: root, or its parent when root is itself a split folder beside a
    train/ (the README's torchrun examples pass --data /data/imagenet/train: the val/ beside it is found), or
    a val/ (ImageNet's val/ downloaded alone, to evaluate on)."""
    root = os.path.abspath(root)
    parent, name = os.path.dirname(root), os.path.basename(root)
    split_folder = name in SPLITS and (os.path.isdir(os.path.join(parent, "train")) or name == "val")
    return parent if split_folder else root


def classes_in(folder, loose_name):
    """The classes of a folder of images -> {class id: (folder, recursive)}, sorted by id. Each sub-folder is
    a class, its images found at any depth (Tiny ImageNet's train/<wnid>/images/ too); images lying loose in
    the folder are one more class named loose_name (so a flat folder is that one class), with a warning when
    there are class folders beside them. Hidden folders are skipped."""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    subs = {e.name: (e.path, True) for e in entries if e.is_dir()}
    loose = sum(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
    if loose and subs:
        warnings.warn(f"{folder}: {loose} images lie beside {len(subs)} class folders; they are one more "
                      f"class, {loose_name!r}")
    if loose or not subs:
        subs[loose_name] = (folder, False)
    return dict(sorted(subs.items()))


def class_names(top):
    """{class id: readable name} from Tiny ImageNet's words.txt ("n01443537<TAB>goldfish, Carassius auratus")
    or ImageNet's LOC_synset_mapping.txt ("n01443537 goldfish, Carassius auratus"): the first name; or {}."""
    for f in ("words.txt", "LOC_synset_mapping.txt"):
        if os.path.isfile(os.path.join(top, f)):
            with open(os.path.join(top, f)) as lines:
                pairs = [line.split(None, 1) for line in lines]
            return {p[0]: p[1].split(",")[0].strip() for p in pairs if len(p) == 2}
    return {}


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]  # "val/images/val_0.JPEG" -> "val_0"


@dataclasses.dataclass
class Layout:
    """What find_layout recognized in a dataset folder, and where each split's images and labels are."""
    what: str            # a few words for the logs: "Tiny ImageNet (...)", "a flat folder", ...
    train_dir: str       # the training images
    train: dict          # the training classes {class id: (folder, recursive)}; None where there is no train/
    held_dir: str = ""   # the held-out images; "" = carved out of the training images (hold_out_stride)
    held: dict = None    # held_dir's class folders {class id: (folder, recursive)}; None if it is flat and
    labels: dict = None  # labelled by a file: {file stem: class id}, read from label_file
    label_file: str = ""


def find_layout(top):
    """The layout of the dataset folder top -> Layout, one of:
      Tiny ImageNet     train/<wnid>/images/*.JPEG; val/images/ labelled by val/val_annotations.txt
                        (tab-separated: file, wnid, box); test/ is unlabelled and unused
      class folders     train/<class>/ + val/<class>/ (ImageNet, Imagenette, Imagewoof), or + test/<class>/
                        where there is no val/ (CIFAR as folders)
      ImageNet flat val train/<wnid>/ + a flat val/ labelled by LOC_val_solution.csv beside it (rows
                        "ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...": the first word is the wnid)
                        or by val.txt ("ILSVRC2012_val_00000001.JPEG 65": an index into the sorted wnids)
      train/ alone      (or beside an unlabelled flat test/): the held-out images are carved out of train/
      any other folder  no train/, val/ or test/: its sub-folders are the classes (or it is one class); carved
    A flat train/ is one class named after top, and so is a flat val/ or test/ beside it. A val/ or test/
    without a train/ is read with its own classes (evaluation only)."""
    path = lambda *p: os.path.join(top, *p)
    name = os.path.basename(top)
    if not any(os.path.isdir(path(s)) for s in SPLITS):
        train = classes_in(top, name)
        return Layout("a flat folder" if train == {name: (top, False)} else "class folders", top, train)
    train = classes_in(path("train"), name) if os.path.isdir(path("train")) else None
    flat_train = train == {name: (path("train"), False)}
    if os.path.isfile(path("val", "val_annotations.txt")):
        with open(path("val", "val_annotations.txt")) as lines:
            labels = {_stem(row[0]): row[1] for row in (line.split("\t") for line in lines) if len(row) > 1}
        return Layout("Tiny ImageNet (val/images/ labelled by val_annotations.txt; test/ unlabelled, unused)",
                      path("train"), train, path("val", "images"), labels=labels,
                      label_file=path("val", "val_annotations.txt"))
    held = "val" if os.path.isdir(path("val")) else "test" if os.path.isdir(path("test")) else None
    if held is None:
        return Layout("class folders train/" if not flat_train else "a flat train/", path("train"), train)
    folders = classes_in(path(held), name)
    flat_held = folders == {name: (path(held), False)}
    if flat_held and not flat_train and held == "val":  # a flat val/: its labels are in a file beside it
        if os.path.isfile(path("LOC_val_solution.csv")):
            with open(path("LOC_val_solution.csv")) as lines:
                next(lines, None)                                   # the header: ImageId,PredictionString
                rows = [line.strip().split(",", 1) for line in lines]
            labels = {row[0]: row[1].split()[0] for row in rows if len(row) == 2 and row[1].split()}
            return Layout("ImageNet (flat val/ labelled by LOC_val_solution.csv)", path("train"), train,
                          path("val"), labels=labels, label_file=path("LOC_val_solution.csv"))
        if os.path.isfile(path("val.txt")):
            if train is None:
                raise runtime.UserError(f"--data {top}: val.txt numbers the classes of a train/ folder; "
                                        "there is none")
            wnids = list(train)
            with open(path("val.txt")) as lines:
                rows = [line.split() for line in lines if line.strip()]
            bad = [row for row in rows if len(row) != 2 or not row[1].isdigit() or int(row[1]) >= len(wnids)]
            if bad:
                raise runtime.UserError(f"{path('val.txt')}: {' '.join(bad[0])!r} is not \"<file> <class "
                                        f"index below {len(wnids)}>\"")
            return Layout("ImageNet (flat val/ labelled by val.txt)", path("train"), train, path("val"),
                          labels={_stem(f): wnids[int(k)] for f, k in rows}, label_file=path("val.txt"))
        raise runtime.UserError(f"--data {top}: val/ holds images but no class folders, and there is no "
                                f"LOC_val_solution.csv or val.txt beside it to label them")
    if flat_held and train is not None and not flat_train:  # Kaggle's unlabelled test/: of no use here
        return Layout("class folders train/ (test/ unlabelled, unused)", path("train"), train)
    known = [n for n in ("Imagenette", "Imagewoof") if os.path.isfile(path(f"noisy_{n.lower()}.csv"))]
    what = ("flat folders" if flat_held else "class folders") + \
        (f" train/ + {held}/" if train is not None else f" {held}/ (no train/: for evaluation)")
    return Layout(": ".join(known + [what]), path("train"), train, path(held), folders)


def hold_out_stride(counts):
    """The held-out split of a set without val/ or test/: every s-th image of each class (sorted by path: the
    s-th, the 2s-th, ...) for s = 20 (5%), or in a small set the largest s < 20 that holds out at least
    min(8, max(1, n // 4)) of its n images (s = 2 when none does). counts: images per class -> s.
    A flat folder of 28 photos holds out every 4th: 7 images; ImageNet's train/ alone, every 20th."""
    want = min(8, max(1, sum(counts) // 4))
    return next((s for s in range(20, 1, -1) if sum(c // s for c in counts) >= want), 2)


def _ordinal(s):
    return f"{s}{'nd' if s == 2 else 'rd' if s == 3 else 'th'}"  # 2 -> "2nd", 4 -> "4th" (s <= 20)


def interleave(groups):
    """[[a0, a1, a2], [b0], [c0, c1]] -> [a0, b0, c0, a1, c1, a2]: any prefix covers every class it can."""
    return [x for row in itertools.zip_longest(*groups) for x in row if x is not None]


def _images(folder, recursive):
    """-> the image files in folder (at any depth if recursive), sorted, and the number of other files (hidden
    files and Tiny ImageNet's <wnid>_boxes.txt beside each class's images/ do not count)."""
    files = [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns] if recursive else \
        [e.path for e in os.scandir(folder) if e.is_file()]
    files = [p for p in files if not os.path.basename(p).startswith(".") and not p.endswith("_boxes.txt")]
    images = sorted(p for p in files if p.lower().endswith(IMAGE_EXTENSIONS))  # by extension (see load())
    return images, len(files) - len(images)


class ImageFolder:
    """A dataset folder in one of the layouts of find_layout: item i -> (x (3, S, S) in [-1, 1], label).
      .classes  the training classes' ids (folder names, wnids), sorted; labels index it in both splits: a
                held-out image's class is matched to the training classes by its id (an unknown one: an error)
      .names    their readable names (words.txt, LOC_synset_mapping.txt: "goldfish"), else the ids
      .layout   what was recognized, in a few words (train_tokenizer prints it)
    Without val/ or test/, the held-out images are carved out of the training images (hold_out_stride), and
    are not trained on. Subsets for classroom runs, both splits alike: the first num_classes classes (sorted),
    the first per_class images of each (sorted). Training items are in class order; held-out items interleave
    the classes (class 0's first image, class 1's first, ..., class 0's second, ...), so that the first n
    cover every class they can. Files that are not images (by extension) and empty class folders are skipped
    with a warning; see load() for unreadable images."""

    def __init__(self, root, split, size, num_classes=0, per_class=0):
        if not os.path.isdir(root):
            raise runtime.UserError(f"--data {root!r}: no such folder (or pass --data synthetic)")
        if split not in ("train", "val"):
            raise runtime.UserError(f"--split {split!r}: train or val")
        self.size = size
        top = dataset_top(root)
        lay = find_layout(top)
        train = lay.train or lay.held or dict.fromkeys(sorted(set(lay.labels.values())))  # no train/: val's
        if split == "train" and lay.train is None:
            raise runtime.UserError(f"--data {root}: no train/ folder beside {lay.held_dir}")
        self.classes = list(train)[:num_classes or None]  # a classroom subset: the first classes, sorted
        names = class_names(top)
        self.names = [names.get(c, c) for c in self.classes]
        self.layout = lay.what
        carve = not lay.held_dir
        where = lay.train_dir if split == "train" or carve else lay.held_dir
        if split == "train" or carve:  # a carved split needs every class's count to choose its stride
            found, others, empty = self._scan(lay.train if carve else {c: lay.train[c] for c in self.classes})
            if carve:
                s = hold_out_stride([len(f) for f in found.values()])
                found = {c: [p for j, p in enumerate(f) if (j % s == s - 1) == (split == "val")]
                         for c, f in found.items()}
                self.layout += f", every {_ordinal(s)} image of each class held out"
        elif lay.held is not None:  # class folders
            self._check_known(root, [c for c in lay.held if c not in train], lay.held_dir)
            found, others, empty = self._scan({c: lay.held[c] for c in self.classes if c in lay.held})
        else:  # a flat folder and its labels
            images, others = _images(lay.held_dir, False)
            missing = [p for p in images if _stem(p) not in lay.labels]
            if missing:
                raise runtime.UserError(f"--data {root}: {len(missing)} images in {lay.held_dir} have no "
                                        f"label in {lay.label_file} (e.g. {os.path.basename(missing[0])})")
            found, empty = {}, []
            for p in images:  # sorted, so each class's images are too
                found.setdefault(lay.labels[_stem(p)], []).append(p)
            self._check_known(root, [c for c in found if c not in train], lay.label_file)
        groups = [[(p, y) for p in found.get(c, [])[:per_class or None]] for y, c in enumerate(self.classes)]
        self.samples = [s for g in groups for s in g] if split == "train" else interleave(groups)  # (path, y)
        if others or empty:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            warnings.warn(f"{where}: skipped {others} files that are not images ({kinds})"
                          + (f" and {len(empty)} class folders without images ({', '.join(empty[:5])})"
                             if empty else ""))
        if not self.samples:  # nothing to train or evaluate on: say so before anything starts
            why = " (a held-out split carved out of the training images needs a class of at least 2 images)"
            raise runtime.UserError(f"--data {root}: no {split} images ({', '.join(IMAGE_EXTENSIONS)}) under "
                                    f"{where}{why if carve else ''}")

    @staticmethod
    def _scan(classes):
        """{class id: (folder, recursive)} -> ({class id: sorted images}, other files, empty classes)"""
        found, others, empty = {}, 0, []
        for c, (folder, recursive) in classes.items():
            found[c], n = _images(folder, recursive)
            others, empty = others + n, empty + ([c] if not found[c] else [])
        return found, others, empty

    def _check_known(self, root, unknown, where):
        if unknown:  # matched by id: a class the training set lacks has no label to give
            raise runtime.UserError(f"--data {root}: held-out class {sorted(unknown)[0]!r} ({where}) is not "
                                    f"one of the training classes ({len(unknown)} unknown)")

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """-> (RGB PIL image, label). An unreadable file (truncated, corrupt, empty, not an image) is counted
        in a warning and replaced by the next one, so a run never stops on a bad file."""
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
# The batch stream: a pure function of (seed, rank, step), so a resumed run sees the batches it would have
# seen.

def make_dataset(data, split, size, seed=0, num_classes=0, per_class=0):
    """data: "synthetic" or an ImageFolder root; split: "train" or "val"; size: image side in pixels."""
    if data == "synthetic":  # drawn on demand: no files, any resolution
        return SyntheticImages(split, size, seed, num_classes, per_class)
    # a folder of photos (ImageNet's layout, or flat)
    return ImageFolder(data, split, size, num_classes, per_class)


@functools.lru_cache(maxsize=2)
def _epoch_order(n, epoch, seed):
    # (n,): the order in which epoch `epoch` visits the n images
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()


def stream_indices(n, start, count, seed):
    """The images at positions start .. start+count-1 of the stream that walks through one random
    permutation of the n images per epoch (position p is image order_{p // n}[p % n]) -> (count,) int
    array."""
    return np.array([_epoch_order(n, p // n, seed)[p % n] for p in range(start, start + count)],
                    dtype=np.int64)


class TrainBatches(torch.utils.data.Dataset):
    """Item k = this process's k-th micro-batch (k = step * grad_accum + micro): the images at global
    stream positions [(k * world + rank) * batch, ... + batch) (see stream_indices), each augmented with its
    own generator seeded by (seed, position). A pure function of (seed, rank, k), so a resumed run sees
    exactly the batches it would have seen."""

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
    # Each item is a whole batch (batch_size=None); the sampler yields k = start, start + 1, ...
    return iter(torch.utils.data.DataLoader(TrainBatches(dataset, batch, rank, world, seed), batch_size=None,
                                            sampler=itertools.count(start), num_workers=num_workers,
                                            pin_memory=torch.cuda.is_available(),
                                            persistent_workers=num_workers > 0))


def in_order(dataset, lo, hi, batch, num_workers=0):
    """Iterable over the items lo .. hi-1 of dataset in order, `batch` at a time: (x (b, ...), y (b,)),
    loaded by num_workers background processes (the DataLoader keeps the order). Code extraction and
    evaluation read this."""
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch,
                                       num_workers=num_workers, pin_memory=torch.cuda.is_available())


def workers(n, device):
    """The flag --num-workers: n, or for -1 six loading processes on CUDA (decoding JPEGs would starve the
    GPU) and none on a CPU, whose cores are the compute."""
    return (6 if torch.device(device).type == "cuda" else 0) if n < 0 else n

