"""
The paper's numbers, in plain PyTorch + numpy: rFID, gFID, IS, precision/recall, PSNR, SSIM, LPIPS, codebook
usage, AR linear probing, and the PCA picture of Figure 8.

Protocol (the official tokenizer/tokenizer_image/reconstruction_ddp.py and tokenizer/validation/val_ddp.py,
then ADM's evaluator; README "Evaluation"):
- rFID compares the reconstructions with the *same* images (ImageNet val, 50k, center crop 256);
  gFID compares samples with ADM's VIRTUAL_imagenet256_labeled reference batch.
- Every image is quantized to uint8 exactly as it would be saved as a PNG before any metric sees it
  (clamp(127.5 * x + 128), the official rounding), except LPIPS, which the official code takes on the
  unclamped float reconstruction.
- PSNR / SSIM follow scikit-image (data_range 255 on uint8). The official numbers used data_range=2 on
  [0, 1] images, which inflates SSIM; see the README.
- FID features come from the pytorch-fid port of TensorFlow's Inception graph (classify_image_graph_def.pb,
  the one ADM's evaluator loads; written here, loading pytorch-fid's weights file), not from the TensorFlow
  evaluator itself; values differ slightly.

    python evaluate.py --tokenizer out/tokenizer-toy/ckpt.pt        # reconstruction report (its own data)
    python evaluate.py --tokenizer <ckpt or URL> --reconstruct a.jpg,b.png   # your images, reconstructed
    python evaluate.py --samples out/samples.npz --ref VIRTUAL_imagenet256_labeled.npz   # generation report
    python evaluate.py --ckpt out/ar-toy/ckpt.pt                    # AR linear probe, on the AR model's codes
    torchrun --nproc_per_node=8 evaluate.py --tokenizer ... --data /data/imagenet/val   # sharded per process
"""
import dataclasses
import math
import os
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model
import runtime
# the project's one PSNR (float64, as scikit-image) lives in data.py
from data import image_grid, psnr, to_uint8
from runtime import all_reduce
from train_ar import ARConfig, check_tokenizer, code_cache

# -----------------------------------------------------------------------------------------------------------
# Pixel metrics on saved (uint8) images: PSNR (data.psnr) and SSIM


def _pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.shape[-1] == 3 and a.ndim in (3, 4), (a.shape, b.shape)
    return a.astype(np.float64), b.astype(np.float64), a.ndim == 3


def ssim(a, b, data_range=255.0, win=7, k1=0.01, k2=0.03):
    """Mean SSIM of uint8 images (H, W, 3) -> float, or batches (B, H, W, 3) -> (B,) per image. Equals
    skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255) with its defaults: 7x7
    uniform window, sample covariance (N / (N - 1)), averaged over the windows that lie fully inside the
    image (skimage filters with reflection, then crops (win - 1) / 2 pixels, which leaves exactly those),
    then over channels. Float64 throughout."""
    a, b, single = _pair(a, b)
    # SSIM compares local means, variances and the covariance over every 7x7 window
    x = torch.from_numpy(a).reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)  # (B, 3, H, W)
    y = torch.from_numpy(b).reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    mean = lambda t: F.avg_pool2d(t, win, stride=1)                          # the valid windows only
    mx, my = mean(x), mean(y)
    cov_norm = win * win / (win * win - 1)
    vx = cov_norm * (mean(x * x) - mx * mx)
    vy = cov_norm * (mean(y * y) - my * my)
    vxy = cov_norm * (mean(x * y) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2  # stabilizers for flat windows
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = s.mean((2, 3)).mean(1).numpy()                                    # per channel, then over channels
    return float(out[0]) if single else out


# -----------------------------------------------------------------------------------------------------------
# The FID network: InceptionV3 as ported by pytorch-fid from TensorFlow's Inception graph
# (classify_image_graph_def.pb). It differs from torchvision's InceptionV3 in its weights, in 1008 output
# classes, in average pools that ignore the padding (TensorFlow's behaviour) and in a max pool in the last
# block's pool branch. Names match the weights file.

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)  # the batch norm carries the bias
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)  # TensorFlow's epsilon

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Mixed(nn.Module):
    """One Inception block: parallel branches, concatenated on channels. `branches` maps a branch name to a
    chain of convs (cin, cout, k, stride, pad) named `<branch>_1, _2, ...` (a single conv: just `<branch>`);
    a chain may end in a pair of convs applied to the same input ("2a"/"2b" style, concatenated). `pool` is
    the pool branch: "avg" (3x3, padding not counted) or "max" (3x3, stride 1) before the conv named
    branch_pool, or "max_s2" (3x3, stride 2, no conv)."""
    def __init__(self, branches, pool, pool_conv=None):
        super().__init__()
        self.chains = []
        for name, chain in branches.items():
            names = []
            for i, spec in enumerate(chain):
                if isinstance(spec, dict):  # the final pair: {suffix: conv spec}
                    for suffix, s in spec.items():
                        self.add_module(f"{name}_{suffix}", BasicConv2d(*s))
                    names.append(tuple(f"{name}_{suffix}" for suffix in spec))
                else:
                    n = name if len(chain) == 1 else f"{name}_{i + 1}"
                    self.add_module(n, BasicConv2d(*spec))
                    names.append(n)
            self.chains.append(names)
        self.pool = pool
        if pool_conv is not None:
            self.branch_pool = BasicConv2d(*pool_conv)

    def forward(self, x):
        outs = []
        for names in self.chains:
            h = x
            for n in names:
                # a tuple: the final pair, both on the same input, concatenated on channels
                h = (torch.cat([getattr(self, m)(h) for m in n], 1) if isinstance(n, tuple)
                     else getattr(self, n)(h))
            outs.append(h)
        if self.pool == "avg":
            outs.append(self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        elif self.pool == "max":
            outs.append(self.branch_pool(F.max_pool2d(x, 3, 1, 1)))
        else:
            outs.append(F.max_pool2d(x, 3, 2))  # the reduction blocks: a stride-2 pool, no conv
        return torch.cat(outs, 1)  # (B, sum of the branch widths, h, w)


def inception_a(cin, pool_ch):  # 35x35
    return Mixed({"branch1x1": [(cin, 64, 1)],
                  "branch5x5": [(cin, 48, 1), (48, 64, 5, 1, 2)],
                  "branch3x3dbl": [(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1)]},
                 "avg", (cin, pool_ch, 1))


def inception_b(cin):  # 35x35 -> 17x17
    return Mixed({"branch3x3": [(cin, 384, 3, 2)],
                  "branch3x3dbl": [(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 2)]}, "max_s2")


def inception_c(cin, c7):  # 17x17, factorized 7x7 convs
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed({"branch1x1": [(cin, 192, 1)],
                  "branch7x7": [(cin, c7, 1), (c7, c7, *row), (c7, 192, *col)],
                  "branch7x7dbl": [(cin, c7, 1), (c7, c7, *col), (c7, c7, *row), (c7, c7, *col),
                                   (c7, 192, *row)]},
                 "avg", (cin, 192, 1))


def inception_d(cin):  # 17x17 -> 8x8
    return Mixed({"branch3x3": [(cin, 192, 1), (192, 320, 3, 2)],
                  "branch7x7x3": [(cin, 192, 1), (192, 192, (1, 7), 1, (0, 3)), (192, 192, (7, 1), 1, (3, 0)),
                                  (192, 192, 3, 2)]}, "max_s2")


def inception_e(cin, pool):  # 8x8, split 3x3 convs
    pair = {"a": (384, 384, (1, 3), 1, (0, 1)), "b": (384, 384, (3, 1), 1, (1, 0))}
    return Mixed({"branch1x1": [(cin, 320, 1)],
                  "branch3x3": [(cin, 384, 1), {"2" + k: v for k, v in pair.items()}],
                  "branch3x3dbl": [(cin, 448, 1), (448, 384, 3, 1, 1),
                                   {"3" + k: v for k, v in pair.items()}]},
                 pool, (cin, 192, 1))


class InceptionV3(nn.Module):
    """x: (B, 3, H, W) float in [0, 1] (uint8 / 255) -> (pool (B, 2048), logits (B, 1008)).
    Bilinear resize to 299x299 (align_corners=False), scale to [-1, 1], the TensorFlow graph, global average
    pool.
    The logits are pool @ fc.weight.T without the bias: the graph's softmax/logits/MatMul, which is what the
    original Inception Score code (Salimans et al. 2016) takes the softmax of."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, 1, 1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = inception_a(192, 32)
        self.Mixed_5c = inception_a(256, 64)
        self.Mixed_5d = inception_a(288, 64)
        self.Mixed_6a = inception_b(288)
        self.Mixed_6b = inception_c(768, 128)
        self.Mixed_6c = inception_c(768, 160)
        self.Mixed_6d = inception_c(768, 160)
        self.Mixed_6e = inception_c(768, 192)
        self.Mixed_7a = inception_d(768)
        self.Mixed_7b = inception_e(1280, "avg")
        self.Mixed_7c = inception_e(2048, "max")  # the graph's quirk: a max pool here
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))          # (B, 64, 147, 147)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))           # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, 2)                                                    # (B, 192, 35, 35)
        for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
            x = getattr(self, "Mixed_" + name)(x)                                    # ... (B, 2048, 8, 8)
        pool = x.mean((2, 3))
        return pool, pool @ self.fc.weight.t()


def load_inception(path=None, device="cpu"):
    """InceptionV3 with pytorch-fid's weights file, from `path`, or torch.hub's cache (where pytorch-fid puts
    it). Strict: every tensor of ours must be in the file with its shape, and every tensor of the file used
    (BatchNorm's num_batches_tracked counters, unused in eval, are ignored on both sides).
    Raises RuntimeError saying which file to put where when it is absent."""
    name = os.path.basename(INCEPTION_URL)
    path = path or os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.exists(path):
        raise RuntimeError(f"FID Inception weights not found at {path}: download {INCEPTION_URL} to "
                           f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/ or pass --inception-path")
    net = InceptionV3()
    sd = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
          if not k.endswith("num_batches_tracked")}
    # BatchNorm's counters: ours, kept as is
    sd.update({k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")})
    net.load_state_dict(sd, strict=True)
    return net.eval().to(device)


# -----------------------------------------------------------------------------------------------------------
# Statistics of features


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.
    tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric positive semi-definite, so
    both roots come from symmetric eigen-decompositions (no complex parts, no iterative sqrtm), and tiny
    negative eigenvalues from rounding are clamped to 0. As pytorch-fid does, if the result is not finite
    (an ill-posed input), eps * I is added to both covariances and it is computed again."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu1.shape == mu2.shape and s1.shape == s2.shape == (len(mu1), len(mu1)), (mu1.shape, s1.shape)

    def trace_sqrt_product(s1, s2):
        w, v = np.linalg.eigh((s1 + s1.T) / 2)
        # the symmetric square root from the eigen-decomposition S1 = V diag(w) V^T
        a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                 # S1^(1/2)
        m = a @ s2 @ a
        return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()

    diff = mu1 - mu2
    # the Frechet distance of two Gaussians
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    if not np.isfinite(d):
        offset = np.eye(len(mu1)) * eps
        d = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1 + offset, s2 + offset)
    return float(d)


def feature_stats(feats):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64, sigma with the N - 1 normalisation (np.cov)."""
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal chunks (the remainder is dropped, as the original code
    does) -> (mean, std) over the chunks. logits: (n, 1008)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    logp = torch.log_softmax(logits, 1)  # (n, 1008) log p(y|x)
    splits = min(splits, len(logp))                                      # tiny test sets: one image per chunk
    n = len(logp) // splits
    scores = []
    for k in range(splits):
        part = logp[k * n:(k + 1) * n]                                  # (n, C) log p(y|x)
        log_py = torch.logsumexp(part, 0) - math.log(len(part))          # (C,) log p(y) of this chunk
        kl = (part.exp() * (part - log_py)).sum(1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_nn_radius(x, k, chunk=4096):
    """(N, D) -> (N,) distance of each point to its k-th nearest neighbour in x, itself excluded."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)                    # +1: the point itself is at 0
    return torch.cat(radii)                                              # (N,)


def _in_manifold(query, ref, radii, chunk=4096):
    """Fraction of `query` points inside at least one ball (ref_j, radius_j)."""
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside.append((d <= radii[None]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real, fake, k=3, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3, as ADM's evaluator): each set's
    manifold is the union of balls reaching each point's k-th nearest neighbour; precision = fraction of
    fake points inside the real manifold, recall = fraction of real points inside the fake one."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = _in_manifold(fake, real, _kth_nn_radius(real, k))
    recall = _in_manifold(real, fake, _kth_nn_radius(fake, k))
    return precision, recall


# -----------------------------------------------------------------------------------------------------------
# Across processes: each rank measures one contiguous block of the images; the rows come back together on
# rank 0, in the original order, and the statistics (FID, IS, precision/recall, the probe) are computed there,
# once.


def gather_rows(x, world):
    """(n_rank, ...) numpy array on every rank -> on rank 0 all ranks' rows concatenated (rank-major order);
    None on the other ranks."""
    if world == 1:
        return x
    parts = [None] * world if dist.get_rank() == 0 else None  # every rank's rows, filled in rank order
    dist.gather_object(x, parts, dst=0)
    return np.concatenate(parts) if parts is not None else None


@torch.no_grad()
def inception_features(net, images, batch=50, device="cpu"):
    """(n, H, W, 3) uint8 -> pool (n, 2048), logits (n, 1008), float64 numpy."""
    pools, logits = [], []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[i:i + batch])).to(device).permute(0, 3, 1, 2).float() / 255
        p, l = net(x)
        pools.append(p.double().cpu().numpy())
        logits.append(l.double().cpu().numpy())
    if not pools:
        return np.zeros((0, 2048)), np.zeros((0, 1008))
    return np.concatenate(pools), np.concatenate(logits)


class ImageSet:
    """Images to measure, read in row ranges so that 50k of them never sit in memory at once: a folder
    (searched recursively, sorted by path) or an .npz whose arr_0 is (n, H, W, 3) uint8 (sample.py's and ADM's
    format). `has_images` is False for an .npz that only holds statistics (mu, sigma)."""

    def __init__(self, path):
        self.path, self.files, self.n = path, None, 0
        if os.path.isdir(path):
            self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path)
                                for f in fs if f.lower().endswith(data.IMAGE_EXTENSIONS))
            self.n = len(self.files)
        elif not zipfile.is_zipfile(path):
            raise runtime.UserError(f"{path}: not a folder of images nor an .npz "
                                    f"(arr_0 images and/or mu, sigma)")
        elif "arr_0.npy" in zipfile.ZipFile(path).namelist():
            with zipfile.ZipFile(path).open("arr_0.npy") as f:          # the .npy header, then raw rows
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, fortran, self.dtype = read(f)
                self.offset = f.tell()
            if fortran or len(shape) != 4 or shape[-1] != 3 or self.dtype != np.uint8:
                raise runtime.UserError(f"{path}: arr_0 must be (n, H, W, 3) uint8, not {shape} {self.dtype}")
            self.n, self.shape = shape[0], shape[1:]
        self.has_images = self.n > 0

    def __len__(self):
        return self.n

    def rows(self, i, j):  # -> (j - i, H, W, 3) uint8
        from PIL import Image
        if self.files is not None:
            return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in self.files[i:j]])
        size = int(np.prod(self.shape))
        with zipfile.ZipFile(self.path).open("arr_0.npy") as f:
            f.seek(self.offset + i * size)
            return np.frombuffer(f.read((j - i) * size), np.uint8).reshape(j - i, *self.shape)


def shard(n, rank, world):
    """Contiguous row range of this rank, so that gathering in rank order restores the original order."""
    return n * rank // world, n * (rank + 1) // world


def image_set_features(net, images, batch, device, rank, world, desc):
    """Inception features of every image of an ImageSet, computed in shards, gathered on rank 0 (None
    elsewhere)."""
    lo, hi = shard(len(images), rank, world)
    pools, logits = [], []
    for i in tqdm(range(lo, hi, batch), desc=desc, disable=rank != 0):
        p, l = inception_features(net, images.rows(i, min(i + batch, hi)), batch, device)
        pools.append(p.astype(np.float32))
        logits.append(l.astype(np.float32))
    # a rank with no rows sends an empty block
    pools = np.concatenate(pools) if pools else np.zeros((0, 2048), np.float32)
    logits = np.concatenate(logits) if logits else np.zeros((0, 1008), np.float32)
    return gather_rows(pools, world), gather_rows(logits, world)


def reference_stats(ref, net, batch, device, rank, world, cache):
    """-> dict(mu, sigma[, pool]) of a reference: an .npz with mu/sigma (ADM's reference batches, or our
    cache) and/or images (arr_0), or a folder. Stored mu/sigma win, as in ADM's evaluator (for ADM's files
    they come from the TensorFlow graph); pool features (for precision/recall) come from the images. Computed
    ones are cached in `cache` (.npz with mu, sigma, pool), which can be passed as the reference next time."""
    stored, images = {}, ImageSet(ref)       # ImageSet refuses a file of another format
    if not os.path.isdir(ref):
        with np.load(ref) as z:
            stored = {k: z[k] for k in ("mu", "sigma", "pool") if k in z.files}
    if "pool" not in stored and images.has_images:
        pool, _ = image_set_features(net, images, batch, device, rank, world,
                                     f"reference {os.path.basename(ref)}")
        if rank == 0:  # the statistics once, where the features were gathered
            stored["pool"] = pool  # (n, 2048) Inception features of the reference images
            if "mu" not in stored:
                stored["mu"], stored["sigma"] = feature_stats(pool)
            np.savez(cache, **stored)
            print(f"reference statistics cached in {cache}")
    elif "mu" not in stored:
        raise runtime.UserError(f"--ref {ref}: neither images (arr_0, or a folder) "
                                f"nor statistics (mu, sigma) there")
    return stored


# -----------------------------------------------------------------------------------------------------------
# Reports


@torch.no_grad()
def reconstruction_report(tok, dataset, cfg, device, rank, world, inception=None, lpips=None, out_dir="."):
    """Reconstruct every image of `dataset` (items (x (3, H, W) in [-1, 1], label), center-cropped by the
    dataset) through the codes, as the official evaluation does: encode -> indices -> decode. PSNR and SSIM
    compare the uint8 images one would save (the original quantized the same way); LPIPS takes the float
    images, the reconstruction unclamped; usage counts distinct codes over the whole set; rFID compares the
    Inception statistics of the reconstructions with those of the same originals."""
    n = min(len(dataset), cfg.num_images or len(dataset))
    lo, hi = shard(n, rank, world)  # this rank's contiguous block of images
    sums = torch.zeros(3, dtype=torch.float64)                              # psnr, ssim, lpips
    used = torch.zeros(tok.cfg.codebook_size, dtype=torch.bool)
    feats = {"orig": [], "recon": []}
    grid = None
    batches = data.in_order(dataset, lo, hi, cfg.batch_size, data.workers(cfg.num_workers, device))
    for x, _ in tqdm(batches, desc="reconstructing", disable=rank != 0):
        x = x.to(device)                                                    # (B, 3, H, W)
        # through the codes, as the official tokenizer/tokenizer_image/reconstruction_ddp.py: encode ->
        # indices -> decode
        codes = tok.encode(x)                                               # (B, N)
        recon = tok.decode(codes).float()                                   # (B, 3, H, W), unclamped
        orig8, recon8 = to_uint8(x), to_uint8(recon)
        sums[0] += psnr(orig8, recon8).sum()
        sums[1] += ssim(orig8, recon8).sum()  # per-image SSIM, summed
        if lpips is not None:
            sums[2] += lpips(x, recon).double().sum().cpu()
        used[codes.flatten().cpu()] = True  # (K,) codes seen anywhere in the set
        if inception is not None:
            feats["orig"].append(inception_features(inception, orig8, len(orig8), device)[0])
            feats["recon"].append(inception_features(inception, recon8, len(recon8), device)[0])
        if grid is None:
            grid = image_grid([orig8[:8], recon8[:8]])                      # originals over reconstructions
    sums = all_reduce(sums.to(device)).cpu()                                # NCCL reduces CUDA tensors only
    used = all_reduce(used.to(device=device, dtype=torch.uint8), "max").bool().cpu()
    out = dict(images=n, psnr=float(sums[0]) / n, ssim=float(sums[1]) / n)
    if lpips is not None:
        out["lpips"] = float(sums[2]) / n
    out.update(codebook_usage=float(used.float().mean()), codes_used=int(used.sum()))
    if inception is not None:
        orig, recon = (gather_rows(np.concatenate(feats[k]) if feats[k] else np.zeros((0, 2048)), world)
                       for k in ("orig", "recon"))
        if rank == 0:  # the same images, before and after
            out["rfid"] = frechet_distance(*feature_stats(orig), *feature_stats(recon))
    if rank == 0 and grid is not None:
        from PIL import Image
        out["grid"] = os.path.join(out_dir, "reconstructions.png")
        Image.fromarray(grid).save(out["grid"])  # top: originals, bottom: reconstructions
    return out


def generation_inputs(samples, ref):
    """The samples as an ImageSet; a UserError when they hold no images or either file is of another
    format."""
    images = ImageSet(samples)
    if not images.has_images:
        raise runtime.UserError(f"--samples {samples}: no images there "
                                f"(a folder of images, or an .npz with arr_0)")
    if ref:
        ImageSet(ref)
    return images


def generation_report(samples, ref, cfg, device, rank, world, inception, out_dir="."):
    """gFID, IS, precision and recall of a folder or .npz of samples against a reference (see
    reference_stats)."""
    images = generation_inputs(samples, ref)
    pool, logits = image_set_features(inception, images, cfg.batch_size, device, rank, world, "samples")
    if ref:  # every rank takes part in the reference's features
        name = os.path.splitext(os.path.basename(os.path.normpath(ref)))[0]
        stats = reference_stats(ref, inception, cfg.batch_size, device, rank, world,
                                os.path.join(out_dir, f"ref-{name}-inception.npz"))
    if rank != 0:  # the statistics are rank 0's
        return None
    out = dict(samples=len(images))
    out["inception_score"], out["inception_score_std"] = inception_score(logits, splits=10)
    if ref:  # samples vs the reference batch
        out["gfid"] = frechet_distance(*feature_stats(pool), stats["mu"], stats["sigma"])
        if "pool" in stats:
            out["precision"], out["recall"] = precision_recall(stats["pool"], pool, k=3, device=device)
    return out


# -----------------------------------------------------------------------------------------------------------
# AR linear probing (paper Sec. 4.1; the official autoregressive/lin_probe/lin_probe.py): what the AR model's
# hidden states know about the class, without being told it.


@torch.no_grad()
def probe_features(gpt, codes, batch=64, device="cpu"):
    """codes (n, N) -> (n, dim): the GPT run with the null class on [null, codes[:, :-1]], the hidden state
    after layer n_layer // 2, mean-pooled over all N positions (null position included), as the official
    probe."""
    gpt.eval()
    feats = []
    for i in range(0, len(codes), batch):
        c = torch.as_tensor(codes[i:i + batch]).long().to(device)
        null = torch.full((len(c),), gpt.cfg.num_classes, dtype=torch.long, device=device)
        h = gpt(c, null, hidden_layer=gpt.cfg.n_layer // 2)                 # (B, N, dim)
        feats.append(h.float().mean(1).cpu())  # (B, dim): the mean over all N positions
    return torch.cat(feats)


def train_linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=90, lr=0.1, batch=128, seed=0,
                       device="cpu"):
    """BatchNorm1d(no affine) + Linear on frozen features, trained with cross-entropy; -> top-1 on val (%).
    As the official probe: lr = base lr * batch / 256, 10/90 of the epochs of linear warmup, then a
    half-cosine to 0, no weight decay, weight init N(0, 0.01) truncated. Ours uses SGD with momentum 0.9
    instead of LARS."""
    g = torch.Generator().manual_seed(seed)  # the probe's init and order: a function of the seed
    dim = train_x.shape[1]
    # the official probe head
    probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.no_grad():
        nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=g)
        probe[1].bias.zero_()
    # on the run's device (the init and the order drawn on the CPU, the same on any device)
    probe, train_x, train_y, val_x, val_y = (t.to(device) for t in (probe, train_x, train_y, val_x, val_y))
    peak = lr * batch / 256  # the linear scaling rule
    opt = torch.optim.SGD(probe.parameters(), lr=peak, momentum=0.9, weight_decay=0)
    steps_per_epoch = math.ceil(len(train_x) / batch)  # the last batch may be short
    total, warmup = epochs * steps_per_epoch, epochs * steps_per_epoch // 9
    step = 0
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch].to(device)
            if len(idx) < 2:                                                  # BatchNorm needs two samples
                continue
            t = (step - warmup) / max(1, total - warmup)
            for group in opt.param_groups:
                # linear warmup, then a half-cosine to 0
                group["lr"] = (peak * (step + 1) / warmup if step < warmup
                               else peak * 0.5 * (1 + math.cos(math.pi * t)))
            # on frozen features: only the probe learns
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        return 100.0 * float((probe(val_x).argmax(1) == val_y).float().mean())


# -----------------------------------------------------------------------------------------------------------
# The semantic picture (paper Figure 8)


def first_of_one_class(data, k):
    """The first k images of the first class that has k of them -> ((k, 3, H, W), label). An image folder's
    labels are read from its file list, without decoding (its held-out images interleave the classes);
    otherwise from the first 2000 items."""
    labels = [y for _, y in data.samples] if hasattr(data, "samples") else \
        [int(data[i][1]) for i in range(min(len(data), 2000))]
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
        if len(by_class[y]) == k:
            break
    y = max(by_class, key=lambda c: len(by_class[c]))  # the first to reach k, else the largest
    return torch.stack([data[i][0] for i in by_class[y]]), y


@torch.no_grad()
def pca_picture(tok, x, path):
    """Decoder features at the semantically regularized layer (aux['dec_feat'], (B, grid^2, C)) of a few
    images of one class; one PCA over all their tokens; the first three components, each min-max scaled over
    the set, shown as RGB under each image. With semantic regularization, the same parts of different images
    get the same colours."""
    from PIL import Image
    _, aux = tok(x)
    f = aux["dec_feat"].double()                                            # (B, g*g, C)
    B, L, C = f.shape
    g = math.isqrt(L)
    flat = f.reshape(-1, C)
    flat = flat - flat.mean(0)  # centered (B*g*g, C) features of all images together
    _, vecs = torch.linalg.eigh(flat.T @ flat)                             # ascending eigenvalues
    proj = flat @ vecs[:, -3:].flip(1)                                      # (B*g*g, 3): components 1, 2, 3
    # each component to [0, 1]
    proj = (proj - proj.min(0).values) / (proj.max(0).values - proj.min(0).values + 1e-12)
    maps = proj.reshape(B, g, g, 3).permute(0, 3, 1, 2).float()  # (B, 3, g, g): one RGB pixel per grid cell
    maps = F.interpolate(maps, size=x.shape[-2:], mode="nearest")          # (B, 3, H, W) in [0, 1]
    top = to_uint8(x)
    bottom = (maps * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    Image.fromarray(image_grid([top, bottom])).save(path)
    return path


# -----------------------------------------------------------------------------------------------------------
# The script


@dataclass
class EvalConfig:
    tokenizer: str = ""         # tokenizer checkpoint or URL (ours or official): reconstruction report + PCA
                                # picture
    data: str = ""              # images to reconstruct: "" = what the tokenizer was trained on (its
                                # checkpoint says; an official one: synthetic), "synthetic" (embedded set) or
                                # an ImageFolder root; probe: the AR model's own data (official AR
                                # checkpoints: this)
    reconstruct: tuple = ()     # image files (comma-separated): each beside its reconstruction by
                                # --tokenizer, with its PSNR, in <out-dir>/reconstruct.png (instead of the
                                # report)
    num_classes: int = 0        # reconstruct only the first N classes of the data (0 = all; with --data "":
                                # the tokenizer's)
    split: str = "val"          # split to reconstruct (the paper: ImageNet val, 50k, center crop)
    num_images: int = 0         # reconstruct only the first n images of the split; 0 = all
    samples: str = ""           # generated images, a folder or an .npz with arr_0 (sample.py): generation
                                # report
    ref: str = ""               # gFID reference: .npz (ADM reference batch arr_0/mu/sigma, or our cache) or
                                # a folder
    ckpt: str = ""              # AR checkpoint: linear probe (tokenizer: --tokenizer, else the one it was
                                # trained on)
    probe_epochs: int = 90      # official: 90 (10 of warmup)
    probe_lr: float = 0.1       # base lr, scaled by probe_batch / 256 (official blr 0.1)
    probe_batch: int = 128      # official: 128 per GPU
    pca: bool = True            # with --tokenizer: the PCA picture of one class's decoder features (Fig. 8)
    inception_path: str = ""    # pt_inception-2015-12-05-6726825d.pth; "" = torch.hub's cache
    lpips: bool = True          # LPIPS-VGG in the reconstruction report (needs the VGG16 and LPIPS weights)
    vgg_path: str = ""          # VGG16 ImageNet weights; "" = torch.hub's cache (downloads if online)
    lpips_lin_path: str = ""    # LPIPS v0.1 linear heads (vgg.pth); "" = torch.hub's cache
    batch_size: int = 32        # images per forward pass, per process
    num_workers: int = -1       # image-loading processes per process; -1 = 6 on CUDA, 0 on CPU
    out_dir: str = ""           # eval.json and PNGs; "" = beside the first checkpoint / samples given
    device: str = ""            # "" = cuda, else mps, else cpu
    threads: int = 0            # torch CPU threads (0 = torch's default)
    seed: int = 0


def print_table(results):
    for section, values in results.items():
        print(f"{section}:")
        for k, v in values.items():
            print(f"  {k:<22} {v:.4f}" if isinstance(v, float) else f"  {k:<22} {v}")


def probe_codes(tok, tok_path, cfg, ar_train, split, device, rank, world):
    """Codes (n, N), labels (n,) and the data they came from, of a split for the probe: the codes the AR model
    was trained / validated on, from train_ar.py's code cache (encoded now if absent), the center view of the
    ten training crops. An AR checkpoint without our training config (an official one) gets every image of
    --data."""
    fields = {f.name for f in dataclasses.fields(ARConfig)}  # what train_ar.py stored about its data
    ar_cfg = dataclasses.replace(ARConfig(data=cfg.data, per_class=0),
                                 **{**{k: v for k, v in ar_train.items() if k in fields},
                                    "tokenizer": tok_path, "num_workers": cfg.num_workers})
    # the cache's layout: ten crops for training, the center crop held out
    views = 10 if split == "train" else 1
    # (n, views, N), memory-mapped
    codes, labels, _ = code_cache(tok, ar_cfg, split, views, rank, world, device)
    center = 4 if views == 10 else 0  # ten crops: 4 corners, then the center
    return np.asarray(codes[:, center]).astype(np.int64), np.asarray(labels), ar_cfg.data


def linear_probe(gpt, tok, tok_path, cfg, ar_train, device, rank, world):
    """The AR linear probe (paper Sec. 4.1) -> its report section (on rank 0; None elsewhere)."""
    feats = {}
    # center views for both splits (the official probe trains on random crops and flips)
    for split in ("train", "val"):
        codes, labels, used = probe_codes(tok, tok_path, cfg, ar_train, split, device, rank, world)
        lo, hi = shard(len(codes), rank, world)
        f = probe_features(gpt, codes[lo:hi], cfg.batch_size, device).numpy()
        f = gather_rows(f, world)  # on rank 0
        feats[split] = (torch.from_numpy(f) if f is not None else None, torch.from_numpy(labels))
    if rank != 0:
        return None  # the other ranks have sent their features
    acc = train_linear_probe(*feats["train"], *feats["val"], gpt.cfg.num_classes, cfg.probe_epochs,
                             cfg.probe_lr, cfg.probe_batch, cfg.seed, device)
    return dict(data=used, layer=gpt.cfg.n_layer // 2, train_images=len(feats["train"][0]),
                val_images=len(feats["val"][0]), top1=acc, chance=100.0 / gpt.cfg.num_classes)


@torch.no_grad()
def reconstruct_files(tok, paths, out_dir, device):
    """--reconstruct: each image center-cropped at the tokenizer's resolution (data.center_crop, as the
    held-out images), beside its reconstruction through the codes, one row per image -> (the PNG's path,
    [PSNR in dB])."""
    from PIL import Image
    S = tok.cfg.image_size
    crops = []
    for p in paths:
        try:
            crops.append(data.to_tensor(data.center_crop(data.open_rgb(p), S)))  # (3, S, S) in [-1, 1]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise runtime.UserError(f"--reconstruct {p}: not a readable image ({type(e).__name__}: {e})") \
                from None
    x = torch.stack(crops).to(device)                                                     # (n, 3, S, S)
    rec = tok.decode(tok.encode(x)).float()
    psnrs = psnr(data.pixel_values(rec), data.pixel_values(x))                # (n,), on the PNG's values
    path = os.path.join(out_dir, "reconstruct.png")
    rows = [np.stack(pair) for pair in zip(to_uint8(x), to_uint8(rec))]  # (2, S, S, 3): original, its rec.
    Image.fromarray(image_grid(rows)).save(path)                          # (n S, 2 S, 3)
    return path, [float(v) for v in psnrs]


def main(cfg: EvalConfig):
    if not (cfg.tokenizer or cfg.samples or cfg.ckpt):
        raise runtime.UserError("nothing to evaluate: pass --tokenizer, --samples and/or --ckpt")
    if cfg.reconstruct and not cfg.tokenizer:
        raise runtime.UserError("--reconstruct needs --tokenizer <checkpoint or URL>")
    runtime.check(cfg, [(cfg.split in ("train", "val"), "split", "train or val"),
                        (cfg.num_images >= 0, "num_images", "0 (all) or more"),
                        (cfg.num_classes >= 0, "num_classes", "0 (all) or more"),
                        (cfg.batch_size >= 1, "batch_size", "1 or more"),
                        (cfg.probe_epochs >= 1, "probe_epochs", "1 or more"),
                        (cfg.probe_lr > 0, "probe_lr", "above 0"),
                        (cfg.probe_batch >= 2, "probe_batch", "2 or more (BatchNorm)"),
                        (cfg.threads >= 0, "threads", "0 or more"),
                        (cfg.num_workers >= -1, "num_workers", "-1 (auto) or 0 or more"),
                        *[(not p or os.path.exists(p) or (k in ("tokenizer", "ckpt") and model.is_url(p)), k,
                           "no such file or folder")
                          for k, p in (("tokenizer", cfg.tokenizer), ("ckpt", cfg.ckpt),
                                       ("samples", cfg.samples), ("ref", cfg.ref))]])
    for p in cfg.reconstruct:
        if not os.path.isfile(p):
            raise runtime.UserError(f"--reconstruct {p}: no such file")
    # the flags first: a wrong path, a folder without samples or a file of another format is one line before
    # Inception or a checkpoint is read
    if cfg.samples:
        generation_inputs(cfg.samples, cfg.ref)
    rank, world, device = runtime.setup(cfg)
    master = rank == 0
    # beside its input (a URL's: out/)
    first = cfg.tokenizer or cfg.ckpt or cfg.samples
    out_dir = cfg.out_dir or ("out" if model.is_url(first) else
                              os.path.dirname(os.path.normpath(first)) or ".")
    os.makedirs(out_dir, exist_ok=True)
    if cfg.reconstruct:  # the user's own images, and nothing else
        tok = model.load_tokenizer(cfg.tokenizer, device=device)
        path, psnrs = reconstruct_files(tok, cfg.reconstruct, out_dir, device)
        if master:
            for p, v in zip(cfg.reconstruct, psnrs):
                print(f"{p}: PSNR {v:.2f} dB at {tok.cfg.image_size}x{tok.cfg.image_size}")
            print(f"wrote {path} (each image, center-cropped, beside its reconstruction)")
        runtime.cleanup_distributed()
        return dict(reconstruct=dict(zip(cfg.reconstruct, psnrs)), path=path)
    torch.manual_seed(cfg.seed)
    results, notes, inception = {}, [], None
    if cfg.tokenizer or cfg.samples:  # FID, IS, precision and recall need Inception; the probe does not
        try:
            inception = load_inception(cfg.inception_path or None, device)
        except RuntimeError as e:
            notes.append(f"{e}. FID, IS, precision and recall are skipped; the other metrics are computed.")

    gpt_config = {}
    if cfg.ckpt:
        ckpt = model.read_checkpoint(cfg.ckpt)
        gpt_config = ckpt.get("config") or {}
        gpt = model.load_gpt(ckpt, device=device)
    # an AR checkpoint names its tokenizer
    tok_path = cfg.tokenizer or gpt_config.get("train", {}).get("tokenizer")
    tok_ckpt = model.read_checkpoint(tok_path) if tok_path else None  # read once: weights and config
    tok = model.load_tokenizer(tok_ckpt, device=device) if tok_path else None  # eval mode, fp32 as official
    # --data "": what the tokenizer was trained on
    cfg, data_from, tok_classes = runtime.trained_data(
        cfg, tok_ckpt.get("config") if tok_path else None, "the tokenizer checkpoint")
    if cfg.ckpt and tok is not None:  # the probe's codes must be the tokenizer's whose codes the GPT learned
        check_tokenizer(tok, tok_path, gpt_config, cfg.ckpt)

    if cfg.tokenizer:
        lpips = None
        if cfg.lpips:
            try:
                lpips = model.load_lpips(model.LPIPS(), cfg.vgg_path or None, cfg.lpips_lin_path or None)
                lpips = lpips.to(device).eval()
            except RuntimeError as e:
                notes.append(f"LPIPS skipped: {e}; pass --vgg-path and --lpips-lin-path (local files)")
        # center crops, [-1, 1]
        images = data.make_dataset(cfg.data, cfg.split, tok.cfg.image_size, num_classes=cfg.num_classes)
        runtime.check_classes(images.classes, tok_classes, cfg.data, "the tokenizer")
        if master:
            print(f"data {cfg.data}{data_from}: {len(images)} {cfg.split} images of {len(images.classes)} "
                  f"classes")
        rec = dict(data=cfg.data,
                   **reconstruction_report(tok, images, cfg, device, rank, world, inception, lpips, out_dir))
        if cfg.pca and master:
            x, y = first_of_one_class(images, 6)
            rec["pca"] = pca_picture(tok, x.to(device), os.path.join(out_dir, f"pca-class{y}.png"))
        results["reconstruction"] = rec

    if cfg.samples:
        if inception is None:
            notes.append("generation report skipped: it needs the Inception weights")
        else:
            results["generation"] = generation_report(cfg.samples, cfg.ref, cfg, device, rank, world,
                                                      inception, out_dir)

    if cfg.ckpt:
        if tok is None:
            raise runtime.UserError(f"{cfg.ckpt} does not name its tokenizer: pass --tokenizer <checkpoint>")
        # the codes must be the vocabulary the GPT was trained on
        if (tok.cfg.codebook_size, tok.cfg.num_tokens) != (gpt.cfg.vocab_size, gpt.cfg.block_size):
            raise runtime.UserError(f"--tokenizer {tok_path} ({tok.cfg.codebook_size} codes x "
                                    f"{tok.cfg.num_tokens}) does not fit the AR model "
                                    f"({gpt.cfg.vocab_size} x {gpt.cfg.block_size})")
        probe = linear_probe(gpt, tok, tok_path, cfg, gpt_config.get("train", {}), device, rank, world)
        if master:
            results["linear_probe"] = probe

    if master:
        for note in notes:
            print("note:", note)
        print_table(results)
        path = os.path.join(out_dir, "eval.json")
        runtime.write_json(path, dict(results=results, notes=notes, config=asdict(cfg)))
        print(f"wrote {path}")
    runtime.cleanup_distributed()
    return results


if __name__ == "__main__":
    runtime.run(main, EvalConfig())
