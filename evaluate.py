"""
The paper's numbers, in plain PyTorch + numpy: rFID, gFID, IS, precision/recall, PSNR, SSIM, LPIPS, codebook
usage, AR linear probing, and the PCA picture of Figure 8.

Protocol (spec section 6, and README "Evaluation"):
- rFID compares the reconstructions with the *same* images (ImageNet val, 50k, center crop 256);
  gFID compares samples with ADM's VIRTUAL_imagenet256_labeled reference batch.
- Every image is quantized to uint8 exactly as it would be saved as a PNG before any metric sees it
  (clamp(127.5 * x + 128), the official rounding), except LPIPS, which the official code takes on the
  unclamped float reconstruction.
- PSNR / SSIM follow scikit-image (data_range 255 on uint8). The official numbers used data_range=2 on
  [0, 1] images, which inflates SSIM; see the README.
- FID features come from the pytorch-fid port of the 2015 TensorFlow Inception graph (written here,
  loading pytorch-fid's weights file), not from the TensorFlow evaluator itself; values differ slightly.

    python evaluate.py --tokenizer=out/tok/ckpt.pt                  # reconstruction report, synthetic set
    python evaluate.py --samples=out/samples.npz --ref=VIRTUAL_imagenet256_labeled.npz   # generation report
    python evaluate.py --gpt=out/ar/ckpt.pt --tokenizer=out/tok/ckpt.pt --probe=True      # AR linear probe
    torchrun --nproc_per_node=8 evaluate.py ...                     # sharded over ranks
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Pixel metrics on saved (uint8) images


def to_uint8(x):
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8, the PNG the official code saves (+128, not +127.5)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _pair(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.shape[-1] == 3 and a.ndim in (3, 4), (a.shape, b.shape)
    return a.astype(np.float64), b.astype(np.float64), a.ndim == 3


def psnr(a, b, data_range=255.0):
    """PSNR in dB of uint8 images (H, W, 3) -> float, or batches (B, H, W, 3) -> (B,) per image.
    Equals skimage.metrics.peak_signal_noise_ratio(a, b) (data range 255 inferred from uint8)."""
    a, b, single = _pair(a, b)
    mse = ((a - b) ** 2).mean(axis=None if single else (1, 2, 3))
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(data_range ** 2 / mse)
    return float(out) if single else out


def ssim(a, b, data_range=255.0, win=7, k1=0.01, k2=0.03):
    """Mean SSIM of uint8 images (H, W, 3) -> float, or batches (B, H, W, 3) -> (B,) per image. Equals
    skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=255) with its defaults: 7x7
    uniform window, sample covariance (N / (N - 1)), averaged over the windows that lie fully inside the
    image (skimage filters with reflection, then crops (win - 1) / 2 pixels, which leaves exactly those),
    then over channels. Float64 throughout."""
    a, b, single = _pair(a, b)
    x = torch.from_numpy(a).reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)  # (B, 3, H, W)
    y = torch.from_numpy(b).reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    mean = lambda t: F.avg_pool2d(t, win, stride=1)                          # the valid windows only
    mx, my = mean(x), mean(y)
    cov_norm = win * win / (win * win - 1)
    vx = cov_norm * (mean(x * x) - mx * mx)
    vy = cov_norm * (mean(y * y) - my * my)
    vxy = cov_norm * (mean(x * y) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    out = s.mean((2, 3)).mean(1).numpy()                                      # per channel, then over channels
    return float(out[0]) if single else out


# -----------------------------------------------------------------------------------------------------------
# The FID network: InceptionV3 as ported by pytorch-fid from TensorFlow's 2015-12-05 graph. It differs from
# torchvision's InceptionV3 in its weights, in 1008 output classes, in average pools that ignore the padding
# (TensorFlow's behaviour) and in a max pool in the last block's pool branch. Names match the weights file.

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

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
                h = torch.cat([getattr(self, m)(h) for m in n], 1) if isinstance(n, tuple) else getattr(self, n)(h)
            outs.append(h)
        if self.pool == "avg":
            outs.append(self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        elif self.pool == "max":
            outs.append(self.branch_pool(F.max_pool2d(x, 3, 1, 1)))
        else:
            outs.append(F.max_pool2d(x, 3, 2))
        return torch.cat(outs, 1)


def inception_a(cin, pool_ch):  # 35x35
    return Mixed({"branch1x1": [(cin, 64, 1)],
                  "branch5x5": [(cin, 48, 1), (48, 64, 5, 1, 2)],
                  "branch3x3dbl": [(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1)]}, "avg", (cin, pool_ch, 1))


def inception_b(cin):  # 35x35 -> 17x17
    return Mixed({"branch3x3": [(cin, 384, 3, 2)],
                  "branch3x3dbl": [(cin, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 2)]}, "max_s2")


def inception_c(cin, c7):  # 17x17, factorized 7x7 convs
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed({"branch1x1": [(cin, 192, 1)],
                  "branch7x7": [(cin, c7, 1), (c7, c7, *row), (c7, 192, *col)],
                  "branch7x7dbl": [(cin, c7, 1), (c7, c7, *col), (c7, c7, *row), (c7, c7, *col), (c7, 192, *row)]},
                 "avg", (cin, 192, 1))


def inception_d(cin):  # 17x17 -> 8x8
    return Mixed({"branch3x3": [(cin, 192, 1), (192, 320, 3, 2)],
                  "branch7x7x3": [(cin, 192, 1), (192, 192, (1, 7), 1, (0, 3)), (192, 192, (7, 1), 1, (3, 0)),
                                  (192, 192, 3, 2)]}, "max_s2")


def inception_e(cin, pool):  # 8x8, split 3x3 convs
    pair = {"a": (384, 384, (1, 3), 1, (0, 1)), "b": (384, 384, (3, 1), 1, (1, 0))}
    return Mixed({"branch1x1": [(cin, 320, 1)],
                  "branch3x3": [(cin, 384, 1), {"2" + k: v for k, v in pair.items()}],
                  "branch3x3dbl": [(cin, 448, 1), (448, 384, 3, 1, 1), {"3" + k: v for k, v in pair.items()}]},
                 pool, (cin, 192, 1))


class InceptionV3(nn.Module):
    """x: (B, 3, H, W) float in [0, 1] (uint8 / 255) -> (pool (B, 2048), logits (B, 1008)).
    Bilinear resize to 299x299 (align_corners=False), scale to [-1, 1], the 2015 graph, global average pool.
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
                           f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/ or pass --inception_path")
    net = InceptionV3()
    sd = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
          if not k.endswith("num_batches_tracked")}
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
        a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                 # S1^(1/2)
        m = a @ s2 @ a
        return np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()

    diff = mu1 - mu2
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
    does) -> (mean, std) over the chunks. logits: (N, 1008)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    logp = torch.log_softmax(logits, 1)
    n = len(logp) // splits
    scores = []
    for k in range(splits):
        part = logp[k * n:(k + 1) * n]                                  # (n, C) log p(y|x)
        log_py = torch.logsumexp(part, 0) - math.log(len(part))          # (C,) log p(y) of this chunk
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_nn_radius(x, k, chunk=4096):
    """(N, D) -> (N,) distance of each point to its k-th nearest neighbour in x, itself excluded."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)                    # +1: the point itself is at 0
    return torch.cat(radii)


def _in_manifold(query, ref, radii, chunk=4096):
    """Fraction of `query` points inside at least one ball (ref_j, radius_j)."""
    inside = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], ref)
        inside.append((d <= radii[None]).any(1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019, k = 3, as ADM's evaluator): each set's
    manifold is the union of balls reaching each point's k-th nearest neighbour; precision = fraction of
    fake points inside the real manifold, recall = fraction of real points inside the fake one."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float32)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float32)
    precision = _in_manifold(fake, real, _kth_nn_radius(real, k))
    recall = _in_manifold(real, fake, _kth_nn_radius(fake, k))
    return precision, recall
