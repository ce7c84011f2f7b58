"""
The vector quantizer of GigaTok (paper Sec. 3.1; official VectorQuantizer in
tokenizer/tokenizer_image/vq/vq_vit_model.py).

Each latent token z (dim d = 8) and each of the K = 16384 codes e are l2-normalized, so the nearest code
by Euclidean distance is the code with the largest cosine. The codebook is learned by gradient only:
no EMA updates, no dead-code restarts, no k-means init.

The quantizer returns its three loss terms unweighted; train_tokenizer.py weighs them in the one loss
expression:

    codebook   = mean (sg[z] - e)^2                    pulls the codes toward the encoder
    commitment = mean (z - sg[e])^2                    pulls the encoder toward the codes (weight beta = 0.25)
    entropy    = H[p(code|z)] - H[mean_z p(code|z)]    Sec. 3.3 (weight 0.005 for XL-XXL)

The entropy loss makes each token's assignment confident (low per-token entropy) while spreading the batch
over the whole codebook (high entropy of the average assignment). The paper needs it to make the 2.9B
tokenizer converge with good codebook usage.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def entropy_loss(logits):
    """Per-token entropy minus the entropy of the batch-averaged distribution. logits: (T, K)."""
    probs = F.softmax(logits, dim=-1)                                    # (T, K) p(code | token)
    log_probs = F.log_softmax(logits, dim=-1)
    sample_entropy = -(probs * log_probs).sum(-1).mean()                 # low: each token is sure of its code
    avg_probs = probs.mean(0)                                            # (K,) the batch's code distribution
    # high: the batch spreads over all codes (the +1e-5 inside the log is the official one)
    codebook_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_entropy - codebook_entropy


@torch.compiler.disable  # flips a global flag: kept out of compiled graphs (one graph break)
def distances(z, e):
    """Squared Euclidean distances (rows, K) between z (rows, d) and the codes e (K, d), in full float32: TF32
    (which the trainers turn on for CUDA's matmuls) is off for this matmul. Inputs float32, autocast off."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def rotate_to(z, q):
    """The rotation trick (Fifty et al. 2024): returns R z where R is the (detached) rotation taking
    z/|z| to q/|q|, rescaled by |q|/|z|. Its value is q, but the gradient reaches z through a fixed rotation
    instead of the identity of the straight-through estimator. z, q: (T, d)."""
    u = z / (z.norm(dim=-1, keepdim=True) + 1e-6)
    qn = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
    w = F.normalize(u + qn, dim=-1).detach()  # the axis half-way between u and q
    # R z = z - 2 (z.w) w + 2 (z.u) q: a reflection about w, then one that lands u on q
    out = (z - 2 * (z * w).sum(-1, keepdim=True) * w
           + 2 * (z * u.detach()).sum(-1, keepdim=True) * qn.detach())
    return out * (q.norm(dim=-1, keepdim=True) / (z.norm(dim=-1, keepdim=True) + 1e-6)).detach()


class VectorQuantizer(nn.Module):

    def __init__(self, codebook_size=16384, dim=8, entropy_temperature=0.01, rotation_trick=True,
                 usage_window=65536, search_elements=2 ** 24):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        # Ours: without the entropy loss, the nearest codes are searched over at most search_elements
        # (token, code) distances at a time (64 MiB in fp32). The codes are the same; extracting codes for
        # the AR model (32 images x 10 crops x 256 tokens against 16384 codes) would otherwise hold
        # (81920, 16384) distance matrices, 5.4 GB each.
        self.search_rows = max(1, search_elements // codebook_size)
        self.entropy_temperature, self.rotation_trick = entropy_temperature, rotation_trick
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():  # the official init: tiny uniform values, then unit rows
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # the most recent assigned indices (-1 = empty slot), for the codebook-usage log only
        self.register_buffer("recent_codes", torch.full((usage_window,), -1, dtype=torch.long),
                             persistent=False)

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)  # (K, d), re-normalized every call

    def lookup(self, codes):
        """indices (...) -> unit code vectors (..., d)"""
        return self.codebook()[codes]

    def usage(self):
        """Fraction of the codebook used by the most recent `usage_window` assigned tokens (this process)."""
        recent = self.recent_codes[self.recent_codes >= 0]
        return recent.unique().numel() / self.codebook_size

    def forward(self, z, entropy=False):
        """z: (B, N, d) continuous latents -> (z_q (B, N, d), codes (B, N), losses). In training, losses holds
        the unweighted codebook and commitment terms, and the entropy term when entropy=True (it costs a
        (B*N, K) softmax, so it is computed only when its weight is not zero); in eval mode it is empty."""
        # everything here in float32, whatever the autocast or FSDP's bf16 weights (runtime.shard keeps this
        # module's fp32): among 16384 unit vectors, bf16 or TF32 rounding flips near-ties of the code choice
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)  # unit latents: distance ~ -cosine
            e = self.codebook().float()  # (K, d) unit codes
            zf = z.reshape(-1, self.dim)                                   # (B*N, d)
            if self.training and entropy:  # the entropy loss needs every distance
                d = distances(zf, e)                                       # (B*N, K)
                codes = d.argmin(dim=1)                                    # (B*N,) the nearest code
            else:                          # only the nearest code: a block of rows at a time
                codes = torch.cat([distances(zs, e).argmin(dim=1) for zs in zf.split(self.search_rows)])
            z_q = e[codes].view_as(z)                                      # (B, N, d)
            losses = {}
            if self.training:
                losses["codebook"] = (z_q - z.detach()).pow(2).mean()  # moves only the codes
                losses["commitment"] = (z_q.detach() - z).pow(2).mean()  # moves only the encoder
                losses["entropy"] = (entropy_loss(-d / self.entropy_temperature) if entropy
                                     else z.new_zeros(()))
                with torch.no_grad():
                    n = min(codes.numel(), self.recent_codes.numel())
                    # a sliding window
                    self.recent_codes.copy_(torch.cat([self.recent_codes[n:], codes[-n:]]))
                # gradients: through a fixed rotation, or straight through
                if self.rotation_trick:
                    z_q = rotate_to(z.reshape(-1, self.dim), z_q.reshape(-1, self.dim)).view_as(z)
                else:
                    z_q = z + (z_q - z).detach()  # straight-through: value z_q, gradient identity
        # in eval mode z_q is exactly the codebook lookup, so decode(encode(x)) == forward(x)
        return z_q, codes.view(z.shape[:-1]), losses
