"""
GigaTok in one file: the tokenizer (CNN encoder -> Q-Former -> VQ -> Q-Former -> CNN decoder) and the
LlamaGen-style AR model trained on its tokens; then our additions: fp32 attention under a CPU autocast, the
toy's initialization, the LPIPS network and PatchGAN discriminator of the training loss, and the loaders of
our and the official checkpoints.

Paper: "GigaTok: Scaling Visual Tokenizers to 3 Billion Parameters for Autoregressive Image Generation"
(arXiv 2504.08736). The math follows the official code (github.com/SilentView/GigaTok), so that its released
checkpoints load into these modules (see load_tokenizer / load_gpt at the end). Where the paper and the code
differ, we follow the code.

Layout conventions: images are (B, 3, H, W) in [-1, 1]; CNN feature maps are (B, C, h, w); transformer
sequences are batch-first (B, L, C); latent tokens are (B, N, C). For the paper's S-S at 256x256: the CNN
grid is g x g = 16 x 16 with z = 256 channels, the transformer width w = 512, N = 256 latent tokens of d = 8.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantizer import VectorQuantizer

# -----------------------------------------------------------------------------------------------------------
# Configuration (the paper's, Tables 1, 2 and 9; the toy preset at the end is ours)

# width, depth, heads of the Q-Former / ViT sizes (paper Table 1; official ViTEncoder)
TRANSFORMER_SIZES = {
    "tiny": (256, 4, 4),
    "small": (512, 6, 8),       # S
    "base": (768, 12, 12),      # B
    "large": (1024, 24, 16),    # L
    "xl": (1280, 36, 20),       # XL
    "xxl": (1536, 48, 24),      # XXL
    "toy": (128, 3, 4),         # ours: the laptop toy
}


@dataclass
class TokenizerConfig:
    image_size: int = 256            # input resolution (square)
    kind: str = "1d"                 # "1d": Q-Former with 1D latent tokens; "2d": ViT on the 2D grid
    encoder_size: str = "small"      # transformer encoder size, a key of TRANSFORMER_SIZES
    decoder_size: str = "small"      # transformer decoder size; the paper scales it more than the encoder
    layer_type: str = "detr"         # 2D only: "detr" (DETR decoder layer, S-S)
                                     # or "vit" (plain pre-norm, S-B, B-L)
    num_latent_tokens: int = 256     # 1D only: number of latent tokens N (a power of two, <= 2 * grid**2)
    ch: int = 128                    # CNN base channels
    ch_mult: tuple = (1, 1, 2, 2, 4)  # CNN channel multipliers; downsample factor = 2 ** (len - 1) = 16
    norm_groups: int = 32            # CNN GroupNorm groups (official 32;
                                     # with 32 channels that is InstanceNorm)
    num_res_blocks: int = 2          # residual blocks per CNN encoder level (decoder: one more)
    z_channels: int = 256            # channels between the CNN and the transformers
    codebook_size: int = 16384       # K codes ...
    codebook_dim: int = 8            # ... of dimension d, l2-normalized
    entropy_temperature: float = 0.01  # the entropy loss's softmax over -distance / temperature (Sec. 3.3)
    rotation_trick: bool = True      # rotation trick gradients (on in all released tokenizers)
    teacher_dim: int = 768           # semantic regularization target width (DINOv2-B: 768); 0 = no MLP head
    distill_depth: int = 3           # decoder layer whose output is aligned to the teacher (Sec. 3.2, l = 3)
    dropout: float = 0.0
    init: str = "official"           # "official" (trunc-normal 0.02) or "identity"
                                     # (ours, for short runs; see identity_init)
    query_init_2d: str = "token0"    # 1D only: how the decoder's g*g queries start (QFormerDecoder);
                                     # "token0" official

    # side of the CNN feature grid = of the decoder's 2D queries = of the teacher's patch grid
    @property
    def grid(self):
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self):  # code sequence length
        return self.num_latent_tokens if self.kind == "1d" else self.grid ** 2


def _preset(enc, dec, kind="1d", **kw):
    layer_type = "vit" if kind == "2d" and (enc, dec) != ("small", "small") else "detr"
    return TokenizerConfig(encoder_size=enc, decoder_size=dec, kind=kind, layer_type=layer_type, **kw)


# what the two toys share (ours): 64x64 images, the "toy" transformers, a 4-level CNN with 8 GroupNorm groups,
# 1024 codes, DINOv2-S/14's width as the semantic target, and identity_init. (4096 codes reconstruct better,
# on photos too, but cost the 1D toy a slower step and its AR model worse samples: see EXPERIMENTS.md, "How
# the toy tokenizer was chosen" and "Photos")
_TOY = dict(image_size=64, encoder_size="toy", decoder_size="toy", ch_mult=(1, 2, 2, 4), num_res_blocks=1,
            z_channels=64, norm_groups=8, codebook_size=1024, teacher_dim=384, init="identity")

# Every configuration of the paper (Tables 2 and 9), named as the user types it, with the official counts.
# The loss weights (commitment, entropy, ...) are training fields: train_tokenizer.TRAIN_PRESETS.
TOKENIZER_PRESETS = {
    "s-s": _preset("small", "small"),                                   # 136.07M
    "s-b": _preset("small", "base"),                                    # 232.40M
    "s-l": _preset("small", "large"),                                   # 532.85M
    "b-l": _preset("base", "large"),                                    # 621.64M
    "xl-xxl": _preset("xl", "xxl"),                                     # 2893.97M (paper: 2.9B)
    "s-s-2d": _preset("small", "small", kind="2d"),                     # 135.55M
    "s-b-2d": _preset("small", "base", kind="2d"),                      # 197.13M
    "b-l-2d": _preset("base", "large", kind="2d"),                      # 491.41M
    # ours: the laptop toy, the paper's 1D Q-Former tokenizer with smaller numbers (64x64 images, 8x8 grid,
    # CNN width 16). 128 latent tokens (= 2 * 8 * 8, the most the multi-level pooling allows) make its finest
    # level one token per grid cell, and the decoder's queries start from those tokens (the official
    # last_level_2d_query_init; from the official token0 the toy learns far more slowly: see EXPERIMENTS.md,
    # "How the toy tokenizer was chosen")
    "toy": TokenizerConfig(**_TOY, kind="1d", layer_type="detr", num_latent_tokens=128, ch=16,
                           query_init_2d="last_level"),
    # ours: the 2D toy (ViT on the 8x8 grid = 64 tokens, CNN width 32), for the paper's 1D-vs-2D
    # comparison (Fig. 9)
    "toy-2d": TokenizerConfig(**_TOY, kind="2d", layer_type="vit", num_latent_tokens=64, ch=32),
}

# -----------------------------------------------------------------------------------------------------------
# CNN encoder and decoder (paper Sec. 3.1, Fig. 10; official Encoder / Decoder in
# tokenizer/tokenizer_image/vq/blocks.py, no attention anywhere).
# The CNNs do the pixel work at full resolution; the transformers between them only ever see the g x g grid.


def Normalize(groups, channels, affine=True):
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=affine)


class ResnetBlock(nn.Module):
    """(B, cin, h, w) -> (B, cout, h, w): two GroupNorm-SiLU-conv3x3 stages on a residual branch."""
    def __init__(self, cin, cout, groups=32, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        # a 1x1 conv when the widths differ
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """(B, C, h, w) -> (B, C, h/2, w/2): a stride-2 3x3 conv after zero-padding right and bottom only
    (asymmetric, as the official code)."""
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # (left, right, top, bottom) padding


def depth_to_space(x, block=2):
    """(B, b*b*C, H, W) -> (B, C, b*H, b*W), the official DCR order: channel index = (i*b + j)*C + c goes to
    output pixel (b*h + i, b*w + j). F.pixel_shuffle uses c*b*b + i*b + j instead; the weights need this
    one."""
    B, C4, H, W = x.shape
    x = x.view(B, block, block, C4 // block ** 2, H, W)  # (B, i, j, C, H, W)
    x = x.permute(0, 3, 4, 1, 5, 2)                      # (B, C, H, i, W, j)
    return x.reshape(B, C4 // block ** 2, H * block, W * block)


class Upsample(nn.Module):
    """(B, C, h, w) -> (B, C, 2h, 2w): a 3x3 conv to 4C channels, then depth-to-space (a learned
    upsampling)."""
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, padding=1)

    def forward(self, x):
        return depth_to_space(self.conv(x))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, whose scale and shift are predicted from the channel statistics of the
    decoder input z (MAGVIT-v2 style): h = gamma(std(z)) * GN(h) + beta(mean(z)).
    h (B, C, h, w), z (B, Cz, g, g)."""
    def __init__(self, z_channels, c, groups=32):
        super().__init__()
        self.gn = Normalize(groups, c, affine=False)
        self.gamma, self.beta = nn.Linear(z_channels, c), nn.Linear(z_channels, c)

    def forward(self, h, z):
        z = z.flatten(2)                                       # (B, Cz, g*g)
        # the unbiased variance, torch's default, as in the official code
        std = (z.var(dim=-1) + 1e-6).sqrt()                    # (B, Cz)
        return self.gamma(std)[..., None, None] * self.gn(h) + self.beta(z.mean(-1))[..., None, None]


class EncoderLevel(nn.Module):
    """One resolution level of the CNN encoder: blocks ResnetBlocks cin -> cout, then (but the last) a
    Downsample. A module of its own so that FSDP shards and activation checkpointing recomputes it as one
    unit."""
    def __init__(self, cin, cout, blocks, groups, dropout, down):
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups, dropout)
                                 for j in range(blocks))
        self.downsample = Downsample(cout) if down else nn.Identity()

    def forward(self, h):                                     # (B, cin, h, w) -> (B, cout, h/2, w/2)
        for block in self.res:
            h = block(h)
        return self.downsample(h)


class DecoderLevel(nn.Module):
    """One resolution level of the CNN decoder: an adaptive GroupNorm conditioned on the decoder input z,
    blocks ResnetBlocks cin -> cout, then (but the last) an Upsample."""
    def __init__(self, z_channels, cin, cout, blocks, groups, dropout, up):
        super().__init__()
        self.adaptive = AdaptiveGroupNorm(z_channels, cin, groups)
        self.res = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, groups, dropout)
                                 for j in range(blocks))
        self.upsample = Upsample(cout) if up else nn.Identity()

    def forward(self, h, z):                          # (B, cin, h, w), z (B, z, g, g) -> (B, cout, 2h, 2w)
        h = self.adaptive(h, z)                               # scale and shift from z's channel statistics
        for block in self.res:
            h = block(h)
        return self.upsample(h)


class CNNEncoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f), f = 2 ** (len(ch_mult) - 1): one level per multiplier, each
    of num_res_blocks ResnetBlocks and (but the last) a Downsample, then two more blocks and a conv to
    z_channels."""
    def __init__(self, cfg):
        super().__init__()
        ch, mult, G = cfg.ch, cfg.ch_mult, cfg.norm_groups
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            self.down.append(EncoderLevel(cin, ch * m, cfg.num_res_blocks, G, cfg.dropout, i < len(mult) - 1))
            cin = ch * m
        self.mid = nn.Sequential(ResnetBlock(cin, cin, G, cfg.dropout), ResnetBlock(cin, cin, G, cfg.dropout))
        self.norm_out = Normalize(G, cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)                                   # (B, ch, H, W)
        for level in self.down:
            h = level(h)                                      # halves h and w, but at the last level
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class CNNDecoder(nn.Module):
    """(B, z_channels, g, g) -> (B, 3, f*g, f*g), the encoder mirrored: each level starts with an adaptive
    GroupNorm conditioned on the decoder's input, has num_res_blocks + 1 blocks and (but the last) an
    Upsample."""
    def __init__(self, cfg):
        super().__init__()
        ch, mult, G = cfg.ch, cfg.ch_mult, cfg.norm_groups
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(ResnetBlock(cin, cin, G, cfg.dropout), ResnetBlock(cin, cin, G, cfg.dropout))
        self.up = nn.ModuleList()
        for i, m in enumerate(reversed(mult)):
            self.up.append(DecoderLevel(cfg.z_channels, cin, ch * m, cfg.num_res_blocks + 1, G, cfg.dropout,
                                        i < len(mult) - 1))
            cin = ch * m
        self.norm_out = Normalize(G, cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))                         # (B, ch * ch_mult[-1], g, g)
        for level in self.up:
            h = level(h, z)                                   # doubles h and w, but at the last level
        return self.conv_out(F.silu(self.norm_out(h)))        # (B, 3, H, W)

# -----------------------------------------------------------------------------------------------------------
# Transformer layers (torch's nn.MultiheadAttention, as the official code, so the weights map one to one; each
# attention goes through fp32_on_cpu, ours, below: fp32 attention under a CPU autocast, for speed)


class QFormerLayer(nn.Module):
    """DETR's pre-norm decoder layer (official TransformerDecoderLayer in
    tokenizer/tokenizer_image/vq/blocks.py): self-attention over the queries, cross-attention from the queries
    to a fixed memory, MLP. Positional embeddings are added to queries and keys, never to values."""
    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.norm1, self.self_attn = (nn.LayerNorm(width),
                                      nn.MultiheadAttention(width, heads, dropout, batch_first=True))
        self.norm2, self.cross_attn = (nn.LayerNorm(width),
                                       nn.MultiheadAttention(width, heads, dropout, batch_first=True))
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, q, memory, q_pos, mem_pos):
        # q (B, Lq, C), memory (B, Lm, C), q_pos (Lq, C), mem_pos (Lm, C)
        t = self.norm1(q)
        # (query, key, value) = (t + q_pos, t + q_pos, t)
        q = q + fp32_on_cpu(self.self_attn, t + q_pos, t + q_pos, t, need_weights=False)[0]
        t = self.norm2(q)
        # the memory is not normed
        q = q + fp32_on_cpu(self.cross_attn, t + q_pos, memory + mem_pos, memory, need_weights=False)[0]
        return q + self.mlp(self.norm3(q))                                                # (B, Lq, C)


class ViTLayer(nn.Module):
    """The standard pre-norm transformer layer (used by the 2D S-B and B-L tokenizers; official
    TransformerLayer). (B, L, C) -> (B, L, C)"""
    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.norm1, self.self_attn = (nn.LayerNorm(width),
                                      nn.MultiheadAttention(width, heads, dropout, batch_first=True))
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * width, width))

    def forward(self, x):
        t = self.norm1(x)
        x = x + fp32_on_cpu(self.self_attn, t, t, t, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))

# -----------------------------------------------------------------------------------------------------------
# The 1D tokenizer's Q-Formers (paper Sec. 3.1, Fig. 11): the encoder reads the g x g CNN grid into N latent
# tokens; the decoder reads the N (quantized) tokens back into g x g queries for the CNN decoder.


def multi_level_pool(x, n):
    """The 1D Q-Former's query init (official multi-level average pooling). x: (B, C, g, g) -> (B, n, C).
    Groups of 1, 1, 2, 4, ..., n/2 tokens: group 0 is the global mean, and group i >= 1 average-pools the grid
    into 2^(i-1) blocks, splitting the width first (1x1, 1x1, 1x2, 2x2, 2x4, ...), each flattened row-major.
    So the token sequence runs coarse to fine, and the AR model later predicts it in that order."""
    levels = round(math.log2(n))
    assert 2 ** levels == n, f"num_latent_tokens must be a power of two, got {n}"
    groups = []
    for i in range(levels + 1):
        level = max(i - 1, 0)
        hb, wb = 2 ** (level // 2), 2 ** ((level + 1) // 2)          # blocks along height and width
        assert x.shape[2] % hb == 0 and x.shape[3] % wb == 0, \
            f"{n} latent tokens need a grid divisible into {hb}x{wb} blocks, got {tuple(x.shape[2:])}"
        kh, kw = x.shape[2] // hb, x.shape[3] // wb                  # each block is kh x kw cells
        groups.append(F.avg_pool2d(x, (kh, kw)).flatten(2).transpose(1, 2))   # (B, hb*wb, C)
    return torch.cat(groups, dim=1)


def multi_level_unpool(x, g, levels="all"):
    """The inverse of multi_level_pool, for the decoder's 2D queries: latent tokens (B, n, C) -> (B, g*g, C),
    each grid cell taking the token(s) of the pooling blocks that cover it (each group's block map upsampled,
    nearest). levels="last": the finest group only (official last_level_1d_features_to_2d_maps); "all": the
    mean over every group, the two global tokens included (what the official
    multi_level_1d_features_to_2d_maps_avg in tokenizer/tokenizer_image/vq/blocks.py intends; its index
    bookkeeping resets inside the loop, so it reads other tokens)."""
    B, n, C = x.shape
    L = round(math.log2(n))
    assert 2 ** L == n and n >= 2, f"num_latent_tokens must be a power of two >= 2, got {n}"
    out, start = 0, 0
    # the groups of multi_level_pool, coarse to fine
    for i in range(L + 1):
        level = max(i - 1, 0)
        hb, wb = 2 ** (level // 2), 2 ** ((level + 1) // 2)      # this group's blocks along height and width
        group = x[:, start:start + hb * wb]                      # (B, hb*wb, C), row-major blocks
        start += hb * wb
        if levels == "last" and i < L:
            continue
        m = group.transpose(1, 2).reshape(B, C, hb, wb)          # the block map
        out = out + F.interpolate(m, size=(g, g), mode="nearest")  # (B, C, g, g): each cell its block's token
    out = out / (L + 1 if levels == "all" else 1)
    return out.flatten(2).transpose(1, 2)                        # (B, g*g, C), row-major cells


def semantic_mlp(width, out_dim):
    """The semantic-regularization head (Sec. 3.2): 3-layer SiLU MLP from decoder width to the teacher's
    width."""
    return nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width), nn.SiLU(),
                         nn.Linear(4 * width, out_dim))


class QFormerEncoder(nn.Module):
    """CNN features (B, z, g, g) -> N latent tokens (B, N, z). The image tokens are embedded once
    (LN + Linear) and stay fixed as cross-attention memory; only the N queries evolve through the layers.
    Official ViTEncoder, tokenizer/tokenizer_image/vq/blocks.py."""
    def __init__(self, cfg):
        super().__init__()
        w, depth, heads = TRANSFORMER_SIZES[cfg.encoder_size]
        G, N = cfg.grid ** 2, cfg.num_latent_tokens
        self.ln_pre, self.embed = nn.LayerNorm(cfg.z_channels), nn.Linear(cfg.z_channels, w)
        self.pos_image = nn.Parameter(w ** -0.5 * torch.randn(G, w))   # for the image-token keys
        self.pos_query = nn.Parameter(w ** -0.5 * torch.randn(N, w))   # for the latent queries
        self.query_proj = nn.Linear(w, w)
        self.layers = nn.ModuleList(QFormerLayer(w, heads, cfg.dropout) for _ in range(depth))
        self.ln_post, self.proj_out = nn.LayerNorm(w), nn.Linear(w, cfg.z_channels)
        self.num_latent_tokens = N

    def forward(self, s):
        B, C, g, _ = s.shape
        x = self.embed(self.ln_pre(s.flatten(2).transpose(1, 2)))                   # (B, g*g, w) the memory
        grid = x.transpose(1, 2).reshape(B, -1, g, g)                               # (B, w, g, g)
        q = self.query_proj(multi_level_pool(grid, self.num_latent_tokens))         # (B, N, w) coarse to fine
        for layer in self.layers:
            q = layer(q, x, self.pos_query, self.pos_image)
        return self.proj_out(self.ln_post(q))                                       # (B, N, z)


class QFormerDecoder(nn.Module):
    """N latent tokens (B, N, z) -> CNN-decoder input (B, z, g, g) (official ViTDecoder,
    tokenizer/tokenizer_image/vq/blocks.py). The g*g 2D queries start as cfg.query_init_2d says. "token0", the
    official configs': all as latent token 0 (the slot seeded from the global mean), so spatial identity comes
    from their learned positional embedding alone. "last_level" / "multi_level" (official options) start each
    cell from the latent tokens whose pooling blocks cover it (multi_level_unpool); "learnable" (official
    learnable_2d_query_init) from a learned table q_2d. The latent tokens are the fixed memory; only the
    queries evolve. With features=True it also returns the queries after layer `distill_depth` (B, g*g, w)
    and their semantic projection (B, g*g, teacher_dim), which the semantic regularization aligns with the
    teacher (Sec. 3.2)."""
    def __init__(self, cfg):
        super().__init__()
        w, depth, heads = TRANSFORMER_SIZES[cfg.decoder_size]
        G, N = cfg.grid ** 2, cfg.num_latent_tokens
        self.ln_pre, self.embed = nn.LayerNorm(cfg.z_channels), nn.Linear(cfg.z_channels, w)
        self.pos_query = nn.Parameter(w ** -0.5 * torch.randn(G, w))   # 2D queries, row-major grid order
        self.pos_latent = nn.Parameter(w ** -0.5 * torch.randn(N, w))  # latent-token keys
        self.layers = nn.ModuleList(QFormerLayer(w, heads, cfg.dropout) for _ in range(depth))
        self.semantic_head = semantic_mlp(w, cfg.teacher_dim) if cfg.teacher_dim else None
        self.ln_post, self.conv_out = nn.LayerNorm(w), nn.Conv2d(w, cfg.z_channels, 3, padding=1)
        self.grid, self.distill_depth, self.query_init = cfg.grid, cfg.distill_depth, cfg.query_init_2d
        assert self.query_init in ("token0", "last_level", "multi_level", "learnable"), \
            f"query_init_2d must be token0, last_level, multi_level or learnable, got {self.query_init!r}"
        if self.query_init == "learnable":                             # the only init that adds a parameter
            self.q_2d = nn.Parameter(w ** -0.5 * torch.randn(G, w))

    def forward(self, tokens, features=False):
        B, N, _ = tokens.shape
        x = self.embed(self.ln_pre(tokens))                                         # (B, N, w) the memory
        if self.query_init == "token0":
            q = x[:, :1].expand(B, self.grid ** 2, -1)                              # (B, g*g, w)
        elif self.query_init == "learnable":
            q = self.q_2d.expand(B, -1, -1)
        else:
            q = multi_level_unpool(x, self.grid, "last" if self.query_init == "last_level" else "all")
        feat = None
        for i, layer in enumerate(self.layers):
            q = layer(q, x, self.pos_query, self.pos_latent)
            if features and i + 1 == self.distill_depth:
                feat = q
        out = self.ln_post(q).transpose(1, 2).reshape(B, -1, self.grid, self.grid)  # (B, w, g, g)
        return self.conv_out(out), feat, semantic_projection(self.semantic_head, feat)


def semantic_projection(head, feat):
    return head(feat) if head is not None and feat is not None else None

# -----------------------------------------------------------------------------------------------------------
# The 2D variant (paper Sec. 4.4, Fig. 9; official ViTEncoder2D / ViTDecoder2D): no latent queries, the g*g
# embedded CNN tokens themselves are refined by a transformer and quantized one per grid cell.


class GridTransformer(nn.Module):
    """The transformer both 2D classes share: (B, g*g, z) -> (B, g*g, w) and, with features=True, the
    tokens after layer `distill_depth`. With layer_type "detr" each layer is the DETR layer with the current
    tokens as both queries and memory; with "vit" the positional embedding is added once and the layers are
    plain pre-norm."""
    def __init__(self, cfg, size):
        super().__init__()
        w, depth, heads = TRANSFORMER_SIZES[size]
        self.ln_pre, self.embed = nn.LayerNorm(cfg.z_channels), nn.Linear(cfg.z_channels, w)
        self.pos = nn.Parameter(w ** -0.5 * torch.randn(cfg.grid ** 2, w))
        self.layer_type = cfg.layer_type
        layer = QFormerLayer if cfg.layer_type == "detr" else ViTLayer
        self.layers = nn.ModuleList(layer(w, heads, cfg.dropout) for _ in range(depth))
        self.ln_post = nn.LayerNorm(w)
        self.grid, self.distill_depth = cfg.grid, cfg.distill_depth

    def forward(self, tokens, features=False):
        x = self.embed(self.ln_pre(tokens))                                              # (B, g*g, w)
        if self.layer_type == "vit":
            x = x + self.pos
        feat = None
        for i, layer in enumerate(self.layers):
            x = layer(x, x, self.pos, self.pos) if self.layer_type == "detr" else layer(x)
            if features and i + 1 == self.distill_depth:
                feat = x
        return self.ln_post(x), feat


class ViTEncoder2D(GridTransformer):
    """CNN features (B, z, g, g) -> g*g latent tokens (B, g*g, z)."""
    def __init__(self, cfg):
        super().__init__(cfg, cfg.encoder_size)
        self.proj_out = nn.Linear(self.pos.shape[1], cfg.z_channels)

    def forward(self, s):
        x, _ = super().forward(s.flatten(2).transpose(1, 2))                            # (B, g*g, w)
        return self.proj_out(x)


class ViTDecoder2D(GridTransformer):
    """g*g (quantized) tokens (B, g*g, z) -> CNN-decoder input (B, z, g, g); features as QFormerDecoder's."""
    def __init__(self, cfg):
        super().__init__(cfg, cfg.decoder_size)
        w = self.pos.shape[1]
        self.semantic_head = semantic_mlp(w, cfg.teacher_dim) if cfg.teacher_dim else None
        self.conv_out = nn.Conv2d(w, cfg.z_channels, 3, padding=1)

    def forward(self, tokens, features=False):
        x, feat = super().forward(tokens, features)
        out = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)           # (B, w, g, g)
        return self.conv_out(out), feat, semantic_projection(self.semantic_head, feat)

# -----------------------------------------------------------------------------------------------------------
# The tokenizer (paper Fig. 10; official VQVitModelPlus, tokenizer/tokenizer_image/vq/vq_vit_model.py):
# CNN encoder -> transformer encoder -> VQ -> transformer decoder -> CNN decoder


def init_weights(module):
    """Official init: trunc_normal(0.02) and zero bias for every Linear and Conv (the CNN's too), LayerNorm
    (1, 0). nn.MultiheadAttention's in_proj is a raw Parameter and keeps torch's xavier init; its out_proj
    is a Linear."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Tokenizer(nn.Module):
    """images (B, 3, H, W) in [-1, 1] <-> codes (B, N). N = num_latent_tokens (1D) or g*g (2D)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        assert cfg.encoder_size in TRANSFORMER_SIZES and cfg.decoder_size in TRANSFORMER_SIZES, (
            f"unknown transformer size in {cfg.encoder_size}/{cfg.decoder_size}; "
            f"known: {list(TRANSFORMER_SIZES)}")
        assert cfg.kind in ("1d", "2d"), f"kind must be '1d' or '2d', got {cfg.kind!r}"
        assert cfg.init in ("official", "identity"), \
            f"init must be 'official' or 'identity', got {cfg.init!r}"
        assert cfg.image_size % 2 ** (len(cfg.ch_mult) - 1) == 0, \
            "image_size must be divisible by the downsample factor"
        self.cfg = cfg
        self.cnn_encoder = CNNEncoder(cfg)
        self.encoder = QFormerEncoder(cfg) if cfg.kind == "1d" else ViTEncoder2D(cfg)
        self.decoder = QFormerDecoder(cfg) if cfg.kind == "1d" else ViTDecoder2D(cfg)
        self.cnn_decoder = CNNDecoder(cfg)
        self.apply(init_weights)
        # created after the init, as in the official code: these keep torch's default (kaiming-uniform) init,
        # and the codebook keeps its own. The 1x1 convs of the official code are Linears on tokens here.
        # the low-dimensional code space (Sec. 3.1): 8-d codes make nearest-neighbour search cheap
        self.quant_conv = nn.Linear(cfg.z_channels, cfg.codebook_dim)                   # z -> d = 8
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.entropy_temperature,
                                         cfg.rotation_trick)
        self.post_quant_conv = nn.Linear(cfg.codebook_dim, cfg.z_channels)              # d = 8 -> z
        if cfg.init == "identity":
            identity_init(self)                                             # ours (the toy), below

    def encode(self, x):
        """images (B, 3, H, W) -> codes (B, N)"""
        return self.quantizer(self.to_code_space(self.encoder(self.cnn_encoder(x))))[1]

    def to_code_space(self, h):
        """(B, N, z) transformer tokens -> (B, N, d) latents, in float32 whatever the autocast: the code
        choice depends on these (the quantizer computes in float32 too; runtime.shard keeps both fp32 under
        FSDP)."""
        with torch.autocast(h.device.type, enabled=False):
            return self.quant_conv(h.float())

    def decode(self, codes):
        """codes (B, N) -> images (B, 3, H, W)"""
        spatial = self.decoder(self.post_quant_conv(self.quantizer.lookup(codes)))[0]  # (B, z, g, g)
        return self.cnn_decoder(spatial)

    def forward(self, x, shortcut=False, entropy=False, semantic=True):
        """Training forward: the reconstruction (B, 3, H, W) and a dict of the raw pieces of the loss, which
        the training loop weighs and sums (train_tokenizer.py). entropy=True computes the entropy term
        (Sec. 3.3); semantic=False skips the decoder's layer-l features and the semantic head (a run without a
        teacher). shortcut=True adds the official early auxiliary terms (VQVitModelPlus.forward in
        tokenizer/tokenizer_image/vq/vq_vit_model.py): the CNN-only reconstruction CNN-dec(CNN-enc(x)) and the
        MSE between the CNN encoder output and the transformer decoder output."""
        s = self.cnn_encoder(x)                                                          # (B, z, g, g)
        z_q, codes, losses = self.quantizer(self.to_code_space(self.encoder(s)), entropy)  # (B, N, d), (B, N)
        spatial, feat, sem = self.decoder(self.post_quant_conv(z_q), features=semantic)  # (B, z, g, g)
        recon = self.cnn_decoder(spatial)
        zero = x.new_zeros(())
        aux = dict(codes=codes,
                   codebook=losses.get("codebook", zero), commitment=losses.get("commitment", zero),
                   entropy=losses.get("entropy", zero),
                   dec_feat=feat,                            # (B, g*g, w) decoder layer-l features
                   sem_feat=sem,                             # (B, g*g, teacher_dim), or None without a head
                   feat_rec=F.mse_loss(spatial, s.detach()) if shortcut else None,
                   shortcut=self.cnn_decoder(s) if shortcut else None)
        return recon, aux

# -----------------------------------------------------------------------------------------------------------
# The AR model (paper Sec. 4.1): LlamaGen's class-conditional GPT with GigaTok's learned absolute 1D
# positions (official autoregressive/models/gpt_1d.py). It reads [class token, code 1, ..., code N-1] and
# predicts codes 1..N.


@dataclass
class GPTConfig:
    vocab_size: int = 16384     # = the tokenizer's codebook size
    block_size: int = 256       # = the tokenizer's number of tokens
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    num_classes: int = 1000     # class `num_classes` is the null class for classifier-free guidance
    class_dropout: float = 0.1  # p of replacing the label by the null class in training
    token_dropout: float = 0.1  # dropout on the input embeddings (condition included)
    resid_dropout: float = 0.1  # after attention's output projection
    ffn_dropout: float = 0.1    # after the SwiGLU feed-forward
    norm_eps: float = 1e-5


GPT_PRESETS = {  # (official counts with vocab 16384, 1000 classes, 256 tokens)
    "gpt-b": GPTConfig(n_layer=12, n_head=12, dim=768),     # 111.1M
    "gpt-l": GPTConfig(n_layer=24, n_head=16, dim=1024),    # 343.2M
    "gpt-xl": GPTConfig(n_layer=36, n_head=20, dim=1280),   # 775.0M
    "gpt-xxl": GPTConfig(n_layer=48, n_head=24, dim=1536),  # 1411.4M
    # ours: a CPU toy, without token, residual or feed-forward dropout (it overfits less than it underfits).
    # 3 layers, since on the 1D toy's 128 codes 4 learned no faster per step and each step took longer (see
    # EXPERIMENTS.md, "The toy AR model").
    "toy": GPTConfig(n_layer=3, n_head=4, dim=256, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0),
}


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, (..., dim) -> (..., dim)"""
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in float32
        xf = x.float()
        # back to x's dtype before the weight, as LlamaGen
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention (B, T, C) -> (B, T, C), with an optional KV cache for generation."""
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dim = cfg.n_head, cfg.dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.cache = None  # (k, v), each (B, H, L, hd), while generating

    def forward(self, x, start=None):
        B, T, C = x.shape
        # (B, T, 3, H, hd) -> (3, B, H, T, hd): one projection, split into queries, keys and values,
        # (B, H, T, hd) each
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if start is None:                    # the whole sequence at once
            y = fp32_on_cpu(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        else:                                # incremental: positions start .. start+T-1 against the cache
            kc, vc = self.cache                                                # (Bmax, H, Lmax, hd) each
            kc[:B, :, start:start + T], vc[:B, :, start:start + T] = k, v
            k, v = kc[:B, :, :start + T], vc[:B, :, :start + T]                # (B, H, start+T, hd)
            # new position i sees cache positions <= start+i; one new position (a decoding step) sees them
            # all, and SDPA without a mask is faster there (see EXPERIMENTS.md, "Speed")
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start) if T > 1 else None
            y = fp32_on_cpu(F.scaled_dot_product_attention, q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, C)                             # (B, H, T, hd) -> (B, T, C)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden = 2/3 * 4 * dim rounded up to a multiple of 256 (LlamaGen)."""
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)  # SwiGLU's 2/3 of 4x keeps the parameter count of a 4x MLP
        hidden = 256 * math.ceil(hidden / 256)
        self.w1, self.w3 = nn.Linear(cfg.dim, hidden, bias=False), nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        h = F.silu(self.w1(x)) * self.w3(x)          # (B, T, hidden)
        return self.ffn_dropout(self.w2(h))


class Block(nn.Module):
    """Pre-norm Llama block: x + attention(norm(x)), then + feed_forward(norm(x)). (B, T, C) -> (B, T, C)"""
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.feed_forward = RMSNorm(cfg.dim, cfg.norm_eps), FeedForward(cfg)

    def forward(self, x, start=None):
        x = x + self.attention(self.attention_norm(x), start)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Sequence [class token, code 1, ..., code N-1] -> logits for codes 1..N (next-token prediction)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # the condition: one learned vector per class, fed as the first token (LlamaGen's c2i)
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # the last row is the null class
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # gpt_1d: learned, no RoPE
        self.positional_embedding = nn.Parameter(cfg.dim ** -0.5 * torch.randn(cfg.block_size + 1, cfg.dim))
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for m in self.modules():  # N(0, 0.02) for Linear and Embedding; the output head starts at zero
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(self.output.weight)  # the first logits are uniform: loss log(vocab)

    def drop_labels(self, labels):
        """Training-time class dropout: each label becomes the null class with probability class_dropout."""
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.class_dropout  # (B,) True = drop
        return torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)

    def forward(self, codes, labels, hidden_layer=None):
        """codes (B, N), labels (B,) -> logits (B, N, vocab): logits[:, i] predicts codes[:, i]. With
        hidden_layer=k, returns instead the hidden state after layer k (B, N, dim), for the AR linear
        probe."""
        if self.training:
            labels = self.drop_labels(labels)
        # the class token takes position 0 and shifts the codes right by one: (B, 1 + N-1, dim)
        x = torch.cat([self.cls_embedding(labels)[:, None], self.tok_embeddings(codes[:, :-1])], dim=1)
        x = self.tok_dropout(x + self.positional_embedding[:x.shape[1]])                 # (B, N, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if hidden_layer == i + 1:
                return x
        return self.output(self.norm(x)).float()                                         # (B, N, vocab)

    # -- generation with a KV cache --------------------------------------------------------------------

    def setup_cache(self, max_batch, max_len=None, dtype=None, device=None):
        """Allocate each layer's (keys, values), (max_batch, heads, max_len, head dim) each."""
        max_len = max_len or self.cfg.block_size + 1
        p = self.positional_embedding
        hd = self.cfg.dim // self.cfg.n_head  # head dim (64 in every paper GPT)
        for layer in self.layers:
            shape = (max_batch, self.cfg.n_head, max_len, hd)
            layer.attention.cache = (torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device),
                                     torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device))

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    def forward_cached(self, codes, labels, start):
        """Incremental forward through the KV cache (set up with setup_cache, eval mode). The new positions
        are start .. start+T-1 of [class token, codes...]: pass labels (and codes=None) for the class token
        at position 0, or codes (B, T) for positions >= 1. Returns logits (B, T, vocab) for the next codes."""
        if labels is not None:
            x = self.cls_embedding(labels)[:, None]  # (B, 1, dim): position 0
            if codes is not None:
                x = torch.cat([x, self.tok_embeddings(codes)], dim=1)
        else:
            x = self.tok_embeddings(codes)  # (B, T, dim)
        x = x + self.positional_embedding[start:start + x.shape[1]]  # the positions being written
        for layer in self.layers:
            x = layer(x, start)                                                          # (B, T, dim)
        return self.output(self.norm(x)).float()

# ===========================================================================================================
# Our additions: what is not the paper's architecture. Attention in fp32 under a CPU autocast, the toy's
# initialization (ours), the two networks of the training loss (LPIPS, Zhang et al. 2018, and the pix2pix
# PatchGAN, both as the official trainer uses them), and the loaders of our and the official checkpoints.

# -----------------------------------------------------------------------------------------------------------
# Attention under a CPU autocast (ours: speed only; the numbers of an fp32 run are untouched)


CPU_FP32_ATTENTION = True  # fp32_on_cpu on; the memory plan turns it off (it counts what CUDA runs)


def fp32_on_cpu(attention, *args, **kw):
    """attention(*args, **kw), in fp32 under a CPU autocast (--precision bf16 on a CPU): torch's CPU attention
    kernels run slower in bf16 than in fp32 (see EXPERIMENTS.md, "Speed"). Off the CPU, or without autocast,
    attention(*args, **kw) as it is; so too a module whose weights are bf16 (FSDP's gathered weights)."""
    bf16_weights = (isinstance(attention, nn.Module)
                    and any(p.dtype != torch.float32 for p in attention.parameters()))
    if (args[0].device.type != "cpu" or not torch.is_autocast_enabled("cpu") or bf16_weights
            or not CPU_FP32_ATTENTION):
        return attention(*args, **kw)
    with torch.autocast("cpu", enabled=False):
        return attention(*(a.float() for a in args), **kw)


# -----------------------------------------------------------------------------------------------------------
# The toy's initialization (ours)


def identity_init(tok):
    """Ours, for short runs (cfg.init == "identity", the toy); the paper presets keep the official init. With
    trunc-normal(0.02) a small tokenizer starts as noise and sits on the mean image for hundreds of steps.
    Here every residual branch starts at zero, so the untrained network is a chain of plain linear maps that
    already carries the image through: torch's default init for every Linear and Conv, then zero for the last
    layer of each residual branch (ResnetBlock.conv2, attention out_proj, MLP output), a scale of 1 in the
    adaptive GroupNorm, and upsampling convs whose four sub-pixels start equal (ICNR: nearest-neighbour
    upsampling)."""
    for m in tok.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.reset_parameters()  # torch's default: kaiming-uniform weights, small uniform biases
    for m in tok.modules():
        ends = [m.conv2] if isinstance(m, ResnetBlock) else []
        if isinstance(m, (ViTLayer, QFormerLayer)):
            # the last layer of each residual branch: both attentions' output projections, the MLP's output
            ends = [a.out_proj for a in m.children() if isinstance(a, nn.MultiheadAttention)] + [m.mlp[-1]]
        for layer in ends:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if isinstance(m, AdaptiveGroupNorm):
            nn.init.ones_(m.gamma.bias)  # gamma(std(z)) starts near 1: GroupNorm alone
        if isinstance(m, Upsample):
            with torch.no_grad():
                # w (4C, C, 3, 3), sub-pixel major
                w, b, C = m.conv.weight, m.conv.bias, m.conv.out_channels // 4
                w.copy_(w[:C].repeat(4, 1, 1, 1))  # the four sub-pixels get the same filter
                b.copy_(b[:C].repeat(4))


# -----------------------------------------------------------------------------------------------------------
# The training loss's networks: the LPIPS (VGG16) perceptual loss and the PatchGAN discriminator

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"


def vgg16_features():
    """torchvision's VGG16 `features` layout (same indices, so its ImageNet state dict loads as is)."""
    layers, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS-VGG (Zhang et al. 2018): unit-normalize VGG16 activations at relu1_2 ... relu5_3, square the
    difference, weight channels with a learned 1x1 head, average over space, sum over the 5 layers."""
    taps = (3, 8, 15, 22, 29)
    channels = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        # in the heads; active only in train mode, in which the official trainer keeps LPIPS
        # (vq_loss.train() in tokenizer/tokenizer_image/vq/vq_train.py)
        self.dropout = nn.Dropout(0.5)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.channels)
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, x, y):  # (B, 3, H, W) in [-1, 1] twice -> (B,)
        h = (torch.cat([x, y]) - self.shift) / self.scale  # (2B, 3, H, W), LPIPS's input scaling
        total = 0
        for i, layer in enumerate(self.features[:self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                k = self.taps.index(i)
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length along the channels
                fx, fy = f.chunk(2)  # the two images' features
                total = total + self.lins[k](self.dropout((fx - fy) ** 2)).mean((1, 2, 3))
        return total


def load_lpips(lpips, vgg_path=None, lin_path=None):
    """Fill LPIPS with the ImageNet VGG16 weights and the LPIPS v0.1 linear heads, from local files or from
    their public URLs through torch.hub's download cache. Raises RuntimeError saying how to fix it."""
    def get(path, url, what):
        try:
            if path:
                return torch.load(path, map_location="cpu", weights_only=True)
            # torch.hub says what it downloads, and its size as a progress bar; a second run reads its cache
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True,
                                                      weights_only=True)
        except Exception as e:  # offline, a missing or broken file: one line that says what failed
            reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else ""
            raise RuntimeError(f"could not load the {what} from {path or url} "
                               f"({type(e).__name__}: {reason})") from None
    vgg = get(vgg_path, VGG16_URL, "VGG16 ImageNet weights")
    lin = get(lin_path, LPIPS_LIN_URL, "LPIPS linear heads")
    # conv layers up to relu5_3
    sd = {k: v for k, v in vgg.items()
          if k.startswith("features.") and int(k.split(".")[1]) <= LPIPS.taps[-1]}
    for i in range(5):
        sd[f"lins.{i}.weight"] = lin[f"lin{i}.model.1.weight"]  # (1, C, 1, 1) channel weights
    lpips.load_state_dict(sd, strict=True)
    return lpips


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; official NLayerDiscriminator in
    tokenizer/tokenizer_image/discriminator_patchgan.py): 256x256 image -> 30x30 logits."""
    def __init__(self, in_ch=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))  # one logit per patch
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)

# -----------------------------------------------------------------------------------------------------------
# Loading checkpoints: ours ({"config": dict, "model": state dict}) and the released official ones
# (GigaTok tokenizers: {"model"[, "ema"], "args", "optimizer", "discriminator", ...}; AR models from
# autoregressive/models/gpt_1d.py: {"model", "optimizer", "steps", "args"}). Official names map onto ours by
# the rules below; the official layouts differ from ours only by reshapes of the same numbers.


# official name -> ours: the first matching rule renames the module path ...
OFFICIAL_TOKENIZER_NAMES = [
    (r"^encoder\.conv_blocks\.(\d+)\.", r"cnn_encoder.down.\1."),               # CNN encoder levels
    (r"^encoder\.", "cnn_encoder."),
    (r"^decoder\.conv_blocks\.(\d+)\.upsample\.conv1\.", r"cnn_decoder.up.\1.upsample.conv."),
    (r"^decoder\.conv_blocks\.(\d+)\.", r"cnn_decoder.up.\1."),                 # CNN decoder levels
    (r"^decoder\.adaptive\.(\d+)\.", r"cnn_decoder.up.\1.adaptive."),           # adaptive GN, one per level
    (r"^decoder\.", "cnn_decoder."),
    (r"^s2to1encoder\.positional_embedding$", "encoder.pos_image"),
    (r"^s2to1encoder\.latent_token_positional_embedding$", "encoder.pos_query"),
    (r"^s2to1encoder\.global_proj\.", "encoder.query_proj."),
    (r"^s2dencoder\.positional_embedding$", "encoder.pos"),
    (r"^(s2to1encoder|s2dencoder)\.encoder_embed\.", "encoder.embed."),
    # a 1x1 conv there, a Linear here
    (r"^(s2to1encoder|s2dencoder)\.conv_out\.", "encoder.proj_out."),
    (r"^(s2to1encoder|s2dencoder)\.", "encoder."),
    (r"^s1to2decoder\.positional_embedding$", "decoder.pos_query"),
    (r"^s1to2decoder\.latent_token_positional_embedding$", "decoder.pos_latent"),
    (r"^s2ddecoder\.positional_embedding$", "decoder.pos"),
    (r"^(s1to2decoder|s2ddecoder)\.decoder_embed\.", "decoder.embed."),
    (r"^(s1to2decoder|s2ddecoder)\.distill_mlp\.", "decoder.semantic_head."),
    (r"^(s1to2decoder|s2ddecoder)\.", "decoder."),
    (r"^quantize\.", "quantizer."),
]
# ... then every one of these renames inside a transformer layer (DETR layer / plain pre-norm layer)
OFFICIAL_LAYER_NAMES = [(r"\.transformer\.(\d+)\.", r".layers.\1."), (r"\.multihead_attn\.", ".cross_attn."),
                        (r"\.linear1\.", ".mlp.0."), (r"\.linear2\.", ".mlp.3.")]
OFFICIAL_GPT_NAMES = [(r"^cls_embedding\.embedding_table\.", "cls_embedding.")]
# official tensors we drop on purpose: the codebook-usage log buffer, KV caches saved along with a GPT
OFFICIAL_DROPPED = r"^quantize\.codebook_used$|\.kv_cache\.[kv]_cache$"


def is_url(path):
    return isinstance(path, str) and re.match(r"https?://", path) is not None


def checkpoint_file(path):
    """A checkpoint's local file: path itself, or for an http(s):// URL (a released checkpoint, a colleague's
    run) its copy in torch.hub's cache, $TORCH_HOME/hub/checkpoints/<hash of the URL>-<file name>, downloaded
    the first time with a progress bar (into a temporary file, moved into place when complete) and read from
    there after. The hash keeps two URLs that end in the same file name (.../run1/ckpt.pt, .../run2/ckpt.pt)
    apart."""
    if not is_url(path):
        return path
    name = os.path.basename(urllib.parse.urlparse(path).path) or "checkpoint.pt"
    key = hashlib.sha1(path.encode()).hexdigest()[:8]
    local = os.path.join(torch.hub.get_dir(), "checkpoints", f"{key}-{name}")
    if not os.path.exists(local):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        print(f"downloading {path} to {local}", file=sys.stderr)
        try:
            torch.hub.download_url_to_file(path, local, progress=True)
        except Exception as e:  # offline, a wrong address, a server error: one line
            reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else ""
            raise DownloadError(f"could not download {path} ({type(e).__name__}: {reason})") from None
    return local


class DownloadError(RuntimeError):
    """A checkpoint URL that could not be fetched; runtime.run prints it as one line, as a user's error."""


def read_checkpoint(path_or_state):
    """A checkpoint path or URL (see checkpoint_file), or an already loaded dict -> dict of CPU tensors
    (memory-mapped when possible). The one checkpoint reader of the project: the trainers resume through it
    too."""
    if isinstance(path_or_state, dict):
        return path_or_state
    path_or_state = checkpoint_file(path_or_state)
    # the official training scripts pickle their argparse.Namespace under "args"
    allow = getattr(torch.serialization, "safe_globals", None)   # torch >= 2.5; older ones refuse such files
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
        try:
            return torch.load(path_or_state, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in torch's legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path_or_state, map_location="cpu", weights_only=True)


def _state_dict_of(ckpt):
    """-> (state dict, our config dict or None). EMA weights win over the raw ones, as in the official eval
    (tokenizer/tokenizer_image/reconstruction_ddp.py)."""
    if "model" in ckpt or "ema" in ckpt:
        sd = ckpt.get("ema") or ckpt["model"]
        config = ckpt.get("config")
    else:  # a bare state dict
        sd, config = ckpt, None
    # prefixes a wrapped module adds to every name
    strip = lambda k: re.sub(r"^(module\.|_orig_mod\.)+", "", k)  # DDP / torch.compile wrappers
    return {strip(k): v for k, v in sd.items()}, (config if isinstance(config, dict) else None)


def _rename(sd, rules, layer_rules=()):
    """Official names -> ours. Returns {our name: (official name, tensor)}; the dropped ones are left out."""
    out = {}
    for name, t in sd.items():
        if re.search(OFFICIAL_DROPPED, name):  # logs and caches, not weights
            continue
        new = name
        for pattern, repl in rules:
            if re.search(pattern, new):
                new = re.sub(pattern, repl, new)
                break
        for pattern, repl in layer_rules:
            new = re.sub(pattern, repl, new)
        # positional tables: the official code keeps them sequence-first, (L, 1, C) -> (L, C)
        if (new.split(".")[-1].startswith("pos") or new == "decoder.q_2d") and t.dim() == 3:
            t = t.squeeze(1)
        if re.fullmatch(r"(quant_conv|post_quant_conv|encoder\.proj_out)\.weight", new) and t.dim() == 4:
            t = t.flatten(1)                           # 1x1 conv (out, in, 1, 1) -> Linear (out, in)
        out[new] = (name, t)
    return out


def _overlay(cfg, config, section):
    """cfg with the fields that our checkpoint's config dict sets: config[section] when the trainer nested it
    there (train_ar.py writes {"gpt": ..., "train": ...}), else the top level. Fields not in cfg are
    ignored."""
    if not config:
        return cfg
    sub = config.get(section) if isinstance(config.get(section), dict) else config  # nested or flat
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in sub.items() if k in fields})


def _load_strict(model, named, source):
    """Fill every tensor of `model` from named = {our name: (name in the file, tensor)}, or raise listing the
    missing, unused and mis-shaped tensors."""
    want = model.state_dict()  # what our module needs, name -> tensor
    missing = [k for k in want if k not in named]
    unused = [f"{orig}" for k, (orig, _) in named.items() if k not in want]
    wrong = [f"{orig} {tuple(t.shape)} (ours {k} {tuple(want[k].shape)})" for k, (orig, t) in named.items()
             if k in want and t.shape != want[k].shape]
    if missing or unused or wrong:
        # the first 12 names
        show = lambda xs: ", ".join(xs[:12]) + (f", ... ({len(xs)} in all)" if len(xs) > 12 else "")
        raise ValueError(f"{source} checkpoint does not fit {type(model).__name__}({model.cfg}):"
                         + (f"\n  missing: {show(missing)}" if missing else "")
                         + (f"\n  unused: {show(unused)}" if unused else "")
                         + (f"\n  wrong shape: {show(wrong)}" if wrong else ""))
    # nothing missing, nothing left over
    model.load_state_dict({k: t for k, (_, t) in named.items()}, strict=True)
    return model.eval()


def _index_count(sd, prefix, pos):  # 1 + the largest index at dotted position `pos` of names under prefix
    # e.g. layers.0 .. layers.5 -> 6
    return 1 + max((int(k.split(".")[pos]) for k in sd if k.startswith(prefix)), default=-1)


def _transformer_size(sd, prefix):
    # (width, z) embedding
    width, depth = sd[prefix + ".embed.weight"].shape[0], _index_count(sd, prefix + ".layers.", 2)
    for name, (w, d, _) in TRANSFORMER_SIZES.items():
        if (w, d) == (width, depth):
            return name
    raise ValueError(f"{prefix}: no transformer size has width {width} and depth {depth}: "
                     f"{TRANSFORMER_SIZES}")


def tokenizer_config_from_shapes(sd):
    """The architecture read off the tensor shapes (our names); the fields the shapes cannot tell (init, norm
    groups ...) come from the preset with that architecture."""
    kind = "1d" if "encoder.pos_query" in sd else "2d"  # only the Q-Former has latent queries
    ch = sd["cnn_encoder.conv_in.weight"].shape[0]
    levels = _index_count(sd, "cnn_encoder.down.", 2)  # CNN levels = len(ch_mult)
    head = sd.get("decoder.semantic_head.4.weight")
    arch = dict(kind=kind, encoder_size=_transformer_size(sd, "encoder"),
                decoder_size=_transformer_size(sd, "decoder"),
                layer_type=("vit" if kind == "2d" and "encoder.layers.0.cross_attn.in_proj_weight" not in sd
                            else "detr"),
                image_size=(math.isqrt(sd["decoder.pos_query" if kind == "1d" else "encoder.pos"].shape[0])
                            * 2 ** (levels - 1)),
                ch=ch,
                ch_mult=tuple(sd[f"cnn_encoder.down.{i}.res.0.conv1.weight"].shape[0] // ch
                              for i in range(levels)),
                num_res_blocks=_index_count(sd, "cnn_encoder.down.0.res.", 4),
                z_channels=sd["encoder.ln_pre.weight"].shape[0],
                codebook_size=sd["quantizer.embedding.weight"].shape[0],
                codebook_dim=sd["quantizer.embedding.weight"].shape[1],
                teacher_dim=head.shape[0] if head is not None else 0)
    if "decoder.q_2d" in sd:
        arch["query_init_2d"] = "learnable"
    # N: one positional row per latent token
    arch["num_latent_tokens"] = (sd["encoder.pos_query"].shape[0] if kind == "1d"
                                 else sd["encoder.pos"].shape[0])
    for preset in TOKENIZER_PRESETS.values():  # the semantic head may have been stripped: not compared
        if all(getattr(preset, k) == v for k, v in arch.items() if k not in ("teacher_dim", "query_init_2d")):
            return dataclasses.replace(preset, **arch)
    return TokenizerConfig(**arch)


def load_tokenizer(path_or_state, device="cpu"):
    """Tokenizer from one of our checkpoints or an official GigaTok one (path or loaded dict), in eval mode.
    The configuration is read off the tensor shapes (and our checkpoint's config, where it has one); the load
    is strict: every tensor of ours is filled and every tensor of the file is used, except the codebook-usage
    buffer. The discriminator, optimizer states and args of a training checkpoint are ignored."""
    sd, config = _state_dict_of(read_checkpoint(path_or_state))
    if any(k.startswith(("s2to1encoder.", "s2dencoder.")) for k in sd):
        source, named = "official GigaTok", _rename(sd, OFFICIAL_TOKENIZER_NAMES, OFFICIAL_LAYER_NAMES)
    elif any(k.startswith("cnn_encoder.") for k in sd):
        source, named = "our", {k: (k, t) for k, t in sd.items()}
    else:
        raise ValueError(f"not a tokenizer checkpoint; its first names: {list(sd)[:5]}")
    try:
        # our names, official tensors
        cfg = tokenizer_config_from_shapes({k: t for k, (_, t) in named.items()})
    except KeyError as e:
        raise ValueError(f"{source} tokenizer checkpoint lacks {e}, "
                         f"needed to read its configuration") from None
    if source == "official GigaTok":  # not in the shapes: the official code has 32 groups and its own init
        cfg = dataclasses.replace(cfg, norm_groups=32, init="official",
                                  query_init_2d="learnable" if "decoder.q_2d" in named else "token0")
    cfg = _overlay(cfg, config, "tokenizer")  # our checkpoints also carry their config
    return _load_strict(Tokenizer(cfg), named, source).to(device)


def load_gpt(path_or_state, device="cpu"):
    """GPT from one of our checkpoints or an official GigaTok AR one (gpt_1d: learned absolute positions), in
    eval mode, loaded strictly (see load_tokenizer). Heads are not visible in the shapes: they come from the
    preset of that width and depth (every official size has 64-d heads)."""
    sd, config = _state_dict_of(read_checkpoint(path_or_state))
    if "cls_embedding.embedding_table.weight" in sd:
        source, named = "official GigaTok", _rename(sd, OFFICIAL_GPT_NAMES)
    elif "cls_embedding.weight" in sd:
        source, named = "our", {k: (k, t) for k, t in sd.items()}
    else:
        raise ValueError(f"not a class-conditional GPT checkpoint; its first names: {list(sd)[:5]}")
    get = lambda k: named[k][1]  # the tensor under our name
    try:
        vocab, dim = get("tok_embeddings.weight").shape
        arch = dict(vocab_size=vocab, dim=dim, n_layer=_index_count(named, "layers.", 1),
                    num_classes=get("cls_embedding.weight").shape[0] - 1,
                    block_size=get("positional_embedding").shape[0] - 1)
    except KeyError as e:
        raise ValueError(f"{source} GPT checkpoint lacks {e} (the RoPE variant is not supported)") from None
    # the heads come from here
    presets = [p for p in GPT_PRESETS.values() if (p.dim, p.n_layer) == (dim, arch["n_layer"])]
    cfg = dataclasses.replace(presets[0] if presets else GPTConfig(n_head=max(1, dim // 64)), **arch)
    cfg = _overlay(cfg, config, "gpt")
    return _load_strict(GPT(cfg), named, source).to(device)
