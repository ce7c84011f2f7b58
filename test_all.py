"""
All of the project's tests: plain `test_*` functions.
    python test_all.py          # runs them all, ends on "N passed, M failed" (", K skipped": tests for a CUDA
                                # machine, run there: the GPU check)
    python test_all.py quant    # only tests whose name contains "quant"
    python -m pytest test_all.py
"""
import argparse
import contextlib
import dataclasses
import io
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
import torch
import torch.nn.functional as F

# threads: OMP_NUM_THREADS when it is set (torch reads it), else the cores this process may run on
# (taskset), at most 4
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                     else os.cpu_count() or 1)))


import data
import evaluate
import model
import quantizer
import runtime
import sample
import train_ar
import train_tokenizer
from model import GPT, GPT_PRESETS, TOKENIZER_PRESETS, Tokenizer

REPO = os.path.dirname(os.path.abspath(__file__))


def _needs(cuda_devices=0, native_bf16=False):
    """Skip the calling test (counted as skipped, here and under pytest) on a machine without this many CUDA
    devices, or without a CPU that computes in bf16 natively."""
    if torch.cuda.device_count() < cuda_devices:
        raise unittest.SkipTest(f"needs {cuda_devices} CUDA device{'s' if cuda_devices > 1 else ''}")
    if native_bf16 and not runtime.native_bf16():
        raise unittest.SkipTest("needs a CPU with native bf16 (AVX-512 BF16 or AMX)")

# ---- model.py / quantizer.py ----

def toy_cfg(**kw):
    """The 2D toy's numbers (CNN width 32, 64 tokens) in the official form (1D Q-Former, 32 groups,
    official init) unless kw says otherwise."""
    official = dict(kind="1d", layer_type="detr", norm_groups=32, init="official", query_init_2d="token0")
    return dataclasses.replace(TOKENIZER_PRESETS["toy-2d"], **{**official, **kw})


def test_tokenizer_param_counts_match_official():
    # exact totals of the official modules (semantic MLP included, as the paper's Table 9 counts)
    official = {"s-s": 136_073_227, "s-b": 232_399_627, "s-l": 532_850_000, "b-l": 621_637_131,
                "xl-xxl": 2_893_970_443, "s-s-2d": 135_548_427, "s-b-2d": 197_132_555, "b-l-2d": 491_410_187}
    assert set(official) | {"toy", "toy-2d"} == set(TOKENIZER_PRESETS)
    for name, count in official.items():
        t0 = time.time()
        with torch.device("meta"):
            tok = Tokenizer(TOKENIZER_PRESETS[name])
        n = sum(p.numel() for p in tok.parameters())
        assert abs(n - count) / count < 1e-3, (name, n, count)
        assert time.time() - t0 < 20, name


def test_gpt_param_counts_match_official():
    official = {"gpt-b": 111_085_824, "gpt-l": 343_174_144, "gpt-xl": 775_028_480, "gpt-xxl": 1_411_367_424}
    for name, count in official.items():
        with torch.device("meta"):
            gpt = GPT(GPT_PRESETS[name])
        n = sum(p.numel() for p in gpt.parameters())
        assert abs(n - count) / count < 1e-3, (name, n, count)


def test_tokenizer_shapes_at_several_sizes_and_token_counts():
    torch.manual_seed(0)
    cases = [dict(), dict(num_latent_tokens=32), dict(image_size=32, num_latent_tokens=16),
             dict(image_size=96, num_latent_tokens=16), dict(image_size=128, num_latent_tokens=128),
             dict(kind="2d"), dict(kind="2d", layer_type="vit", image_size=32)]
    for kw in cases:
        cfg = toy_cfg(**kw)
        tok = Tokenizer(cfg)
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
        recon, aux = tok(x, shortcut=True)
        g2 = cfg.grid ** 2
        assert recon.shape == x.shape, kw
        assert aux["codes"].shape == (2, cfg.num_tokens) and aux["codes"].dtype == torch.long, kw
        assert aux["sem_feat"].shape == (2, g2, cfg.teacher_dim), kw
        assert aux["shortcut"].shape == x.shape and aux["feat_rec"].ndim == 0, kw
        assert int(aux["codes"].max()) < cfg.codebook_size
        tok.eval()
        with torch.no_grad():
            assert tok.decode(tok.encode(x)).shape == x.shape
    try:  # a 12x12 grid cannot be pooled into the 8x16 blocks of 256 tokens: a clear error, not a wrong count
        Tokenizer(toy_cfg(image_size=96, num_latent_tokens=256))(torch.zeros(1, 3, 96, 96))
        raise AssertionError("expected an error")
    except AssertionError as e:
        assert "divisible" in str(e), e


def test_decode_of_encode_equals_forward_in_eval():
    torch.manual_seed(0)
    for kind in ("1d", "2d"):
        tok = Tokenizer(toy_cfg(kind=kind)).eval()
        x = torch.rand(3, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            assert torch.equal(tok.decode(tok.encode(x)), tok(x)[0])


def test_quantizer_eval_output_is_codebook_lookup_of_its_indices():
    torch.manual_seed(0)
    vq = quantizer.VectorQuantizer(512, 8).eval()
    z = torch.randn(4, 16, 8)
    z_q, codes, _ = vq(z)
    assert torch.equal(z_q, vq.lookup(codes))
    # and the index is the max-cosine code, found by brute force
    cos = F.normalize(z, dim=-1) @ F.normalize(vq.embedding.weight, dim=-1).t()
    assert torch.equal(codes, cos.argmax(-1))
    assert torch.allclose(z_q.norm(dim=-1), torch.ones(4, 16))


def _code_choice_at_low_precision(device):
    """The codes and the quantizer's losses of one set of transformer features (B, N, z) are the float32 ones
    under a bf16 autocast, and on CUDA with TF32 on too (as the trainers run): the code choice is float32."""
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg(codebook_size=16384)).to(device)
    # stand-in features (32, 64, z)
    h = torch.randn(32, tok.cfg.num_tokens, tok.cfg.z_channels, device=device)
    class Features(torch.nn.Module):                                   # the tokenizer's input: h, whatever x
        def forward(self, s):
            return h
    tok.cnn_encoder, tok.encoder = torch.nn.Identity(), Features()
    x = torch.zeros(32, 3, 64, 64, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        runs = []
        for autocast in (contextlib.nullcontext(), torch.autocast(device, torch.bfloat16)):
            with autocast:
                with torch.no_grad():
                    codes = tok.eval().encode(x)                       # (32, 64)
                aux = tok.train()(x, entropy=True)[1]
            runs.append((codes, aux))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    (ref, ref_aux), (low, low_aux) = runs
    assert torch.equal(ref, low), f"{(ref != low).float().mean().item():.2%} of the codes differ"
    assert torch.equal(ref_aux["codes"], low_aux["codes"]) and torch.equal(ref, ref_aux["codes"])
    for k in ("codebook", "commitment", "entropy"):
        assert low_aux[k].dtype == torch.float32 and torch.equal(ref_aux[k], low_aux[k]), k


def test_code_choice_is_float32_under_a_bf16_autocast():
    _code_choice_at_low_precision("cpu")


def test_quantizer_searches_in_blocks_with_the_same_codes():
    # without the entropy loss the nearest code is found a block of rows at a time (memory); with it, over
    # the whole (tokens, codes) matrix, which the entropy loss needs
    torch.manual_seed(0)
    z = torch.randn(3, 50, 8)                                         # 150 tokens
    # 7 rows a block: 22 blocks, the last short
    vq = quantizer.VectorQuantizer(300, 8, search_elements=300 * 7)
    assert vq.search_rows == 7
    codes_eval = vq.eval()(z)[1]
    codes_whole = vq.train()(z, entropy=True)[1]
    assert torch.equal(codes_eval, codes_whole) and torch.equal(vq(z, entropy=False)[1], codes_whole)
    whole = quantizer.VectorQuantizer(300, 8)                         # one block
    whole.load_state_dict(vq.state_dict())
    assert whole.search_rows >= 150 and torch.equal(whole.eval()(z)[1], codes_eval)


def test_quantizer_gradients_reach_encoder_and_codebook():
    for rot in (True, False):
        torch.manual_seed(0)
        tok = Tokenizer(toy_cfg(rotation_trick=rot))
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        recon, aux = tok(x)
        ((recon - x) ** 2).mean().backward(retain_graph=True)
        assert tok.cnn_encoder.conv_in.weight.grad.abs().sum() > 0, rot
        assert tok.quant_conv.weight.grad.abs().sum() > 0, rot
        tok.zero_grad()
        aux["codebook"].backward()          # the codebook loss moves only the codebook
        assert tok.quantizer.embedding.weight.grad.abs().sum() > 0
        assert tok.quant_conv.weight.grad is None or tok.quant_conv.weight.grad.abs().sum() == 0


def test_quantizer_losses_equal_direct_computation():
    torch.manual_seed(0)
    vq = quantizer.VectorQuantizer(64, 4).train()
    z = torch.randn(2, 5, 4)
    z_q, codes, losses = vq(z, entropy=True)             # unweighted: the training loop weighs them
    zn = z / z.norm(dim=-1, keepdim=True)
    e = vq.embedding.weight / vq.embedding.weight.norm(dim=-1, keepdim=True)
    q = e[codes]
    assert torch.allclose(losses["codebook"], ((q - zn) ** 2).mean())
    assert torch.allclose(losses["commitment"], ((q - zn) ** 2).mean())
    # entropy loss from its definition, in float64 numpy
    d = ((zn.reshape(-1, 1, 4) - e[None]) ** 2).sum(-1).double().detach().numpy()
    logits = -d / 0.01
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    sample_h = -(p * np.log(p + 1e-300)).sum(1).mean()
    avg = p.mean(0)
    expected = sample_h - (-(avg * np.log(avg + 1e-5)).sum())
    assert abs(losses["entropy"].item() - expected) < 1e-4 * max(1, abs(expected)), \
        (losses["entropy"], expected)
    assert vq(z)[2]["entropy"] == 0                      # not computed when its weight is zero


def test_entropy_loss_lowest_for_confident_evenly_spread_assignments():
    K, T = 8, 64
    confident_spread = torch.full((T, K), -50.0)
    confident_spread[torch.arange(T), torch.arange(T) % K] = 50.0
    confident_collapsed = torch.full((T, K), -50.0)
    confident_collapsed[:, 0] = 50.0
    unsure = torch.zeros(T, K)
    ls = quantizer.entropy_loss(confident_spread)
    assert abs(ls.item() + math.log(K)) < 1e-3          # 0 per-token entropy - log K
    assert ls < quantizer.entropy_loss(confident_collapsed) - 1
    assert ls < quantizer.entropy_loss(unsure) - 1


def test_rotation_trick_value_is_quantized_vector_and_gradient_is_rotated():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(32, 8), dim=-1).requires_grad_()
    q = F.normalize(torch.randn(32, 8), dim=-1)
    out = quantizer.rotate_to(z, q)
    assert torch.allclose(out, q, atol=1e-5)
    g = torch.randn(32, 8)
    (out * g).sum().backward()
    # the gradient is the output gradient rotated back (a rotation preserves norms) ...
    assert torch.allclose(z.grad.norm(dim=-1), g.norm(dim=-1) / (1 + 1e-6), rtol=1e-4)
    # ... and not the straight-through identity
    assert not torch.allclose(z.grad, g, atol=1e-2)


def test_codebook_usage_counts_recent_window():
    vq = quantizer.VectorQuantizer(16, 4, usage_window=8).train()
    assert vq.usage() == 0
    vq.embedding.weight.data = torch.eye(16, 4).repeat(1, 1) + 0.0  # codes 0..3 are the unit axes
    vq(torch.eye(4).view(1, 4, 4))
    assert vq.usage() == 4 / 16
    vq(torch.eye(4)[:1].repeat(1, 8, 1))                             # the window now holds only code 0
    assert vq.usage() == 1 / 16


def test_depth_to_space_uses_official_dcr_order():
    B, C, H, W = 2, 3, 4, 5
    x = torch.randn(B, 4 * C, H, W)
    y = model.depth_to_space(x)
    assert y.shape == (B, C, 2 * H, 2 * W)
    for i in range(2):
        for j in range(2):
            for c in range(C):   # input channel (i*2 + j)*C + c -> output pixel (2h + i, 2w + j) of channel c
                assert torch.equal(y[:, c, i::2, j::2], x[:, (i * 2 + j) * C + c])
    assert not torch.equal(y, F.pixel_shuffle(x, 2))


def test_multi_level_query_init_groups():
    x = torch.randn(2, 5, 16, 16)
    q = model.multi_level_pool(x, 256)
    assert q.shape == (2, 256, 5)
    mean = x.mean((2, 3))
    assert torch.allclose(q[:, 0], mean, atol=1e-6) and torch.allclose(q[:, 1], mean, atol=1e-6)
    # group 2: the width splits first (left half, right half); group 3: 2x2 quadrants, row-major
    assert torch.allclose(q[:, 2], x[:, :, :, :8].mean((2, 3)), atol=1e-6)
    assert torch.allclose(q[:, 3], x[:, :, :, 8:].mean((2, 3)), atol=1e-6)
    assert torch.allclose(q[:, 5], x[:, :, :8, 8:].mean((2, 3)), atol=1e-6)
    # the last group: 8 x 16 blocks of 2 x 1 pixels
    assert torch.allclose(q[:, 128 + 16 + 1], x[:, :, 2:4, 1].mean(-1), atol=1e-6)


def test_official_init_scheme():
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg())
    w = tok.cnn_encoder.conv_in.weight
    assert abs(w.std().item() - 0.02) < 0.005 and abs(w.mean().item()) < 0.005   # trunc_normal(std 0.02)
    assert tok.encoder.layers[0].norm1.weight.eq(1).all()
    # created after the init: keep torch's defaults (kaiming-uniform; the codebook: unit rows)
    assert tok.quant_conv.weight.std() > 0.05
    assert torch.allclose(tok.quantizer.embedding.weight.norm(dim=-1), torch.ones(tok.cfg.codebook_size))


def test_identity_init_starts_every_residual_branch_at_zero():
    # the toy's init (ours): each ResnetBlock and transformer layer passes its input through unchanged,
    # the adaptive GroupNorm has scale ~1, and each Upsample starts as nearest-neighbour (2x2 blocks of
    # equal pixels)
    torch.manual_seed(0)
    for kind, layer_type in [("2d", "vit"), ("1d", "detr")]:
        tok = Tokenizer(toy_cfg(kind=kind, layer_type=layer_type, norm_groups=8, init="identity")).eval()
        assert all(m.num_groups == 8 for m in tok.modules() if isinstance(m, torch.nn.GroupNorm))
        with torch.no_grad():
            h = torch.randn(2, 128, 8, 8)
            for block in tok.cnn_decoder.mid:
                assert torch.equal(block(h), block.nin_shortcut(h))
            t = torch.randn(2, 64, 128)
            layer = tok.encoder.layers[0]
            out = (layer(t) if layer_type == "vit"
                   else layer(t, torch.randn(2, 64, 128), torch.randn(64, 128), 0))
            assert torch.equal(out, t)
            up = tok.cnn_decoder.up[0].upsample(h)
            assert up.shape == (2, 128, 16, 16) and up.std() > 0
            assert torch.equal(up, up[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
            gamma = tok.cnn_decoder.up[0].adaptive.gamma(torch.zeros(1, 64))
            assert torch.equal(gamma, torch.ones_like(gamma))


def test_decoder_2d_query_inits():
    # multi_level_unpool inverts multi_level_pool: a map constant on the finest pooling blocks comes back
    # unchanged ("last"), and "all" is the mean over levels. The decoder's "token0" (official) and
    # "last_level" add no parameter, "learnable" adds decoder.q_2d only. With the identity init the untrained
    # 1D toy already passes the image's layout through (its decoder output is not the same at every grid
    # cell).
    torch.manual_seed(0)
    # 64 tokens: finest blocks 4x8
    fine = F.interpolate(torch.randn(2, 5, 4, 8), size=(8, 8), mode="nearest")
    back = model.multi_level_unpool(model.multi_level_pool(fine, 64), 8, "last")
    assert torch.allclose(back.transpose(1, 2).reshape(2, 5, 8, 8), fine, atol=1e-6)
    const = torch.randn(2, 1, 5).expand(2, 64, 5)
    assert torch.allclose(model.multi_level_unpool(const, 8, "all"), const, atol=1e-6)
    names = {m: set(Tokenizer(toy_cfg(query_init_2d=m)).state_dict())
             for m in ("token0", "last_level", "learnable")}
    assert names["token0"] == names["last_level"] and names["learnable"] - names["token0"] == {"decoder.q_2d"}
    tok = Tokenizer(TOKENIZER_PRESETS["toy"]).eval()
    assert tok.cfg.kind == "1d" and tok.cfg.query_init_2d == "last_level"
    with torch.no_grad():
        spatial = tok.decoder(tok.post_quant_conv(tok.quant_conv(
            tok.encoder(tok.cnn_encoder(torch.rand(1, 3, 64, 64))))))[0]
    assert spatial.flatten(2).std(-1).mean() > 1e-3
    # an official checkpoint with q_2d loads
    learnable = Tokenizer(toy_cfg(query_init_2d="learnable")).eval()
    loaded = model.load_tokenizer(_official_checkpoint(_official_tokenizer_state(learnable)))
    assert loaded.cfg.query_init_2d == "learnable"
    _assert_same_tokenizer(learnable, loaded, 64)


def test_gpt_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    cfg = dataclasses.replace(GPT_PRESETS["toy"], vocab_size=50, block_size=16, num_classes=5)
    gpt = GPT(cfg).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.02)   # the zero-initialized head would hide differences
    codes, labels = torch.randint(0, 50, (3, 16)), torch.tensor([0, 4, 5])
    with torch.no_grad():
        full = gpt(codes, labels)
        gpt.setup_cache(3)
        parts = [gpt.forward_cached(None, labels, 0), gpt.forward_cached(codes[:, :6], None, 1)]
        parts += [gpt.forward_cached(codes[:, i:i + 1], None, i + 1) for i in range(6, 15)]
        gpt.clear_cache()
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
    assert full.abs().max() > 0


def test_gpt_class_dropout_rate():
    torch.manual_seed(0)
    gpt = GPT(dataclasses.replace(GPT_PRESETS["toy"], n_layer=1, vocab_size=8, block_size=4, num_classes=10))
    labels = torch.randint(0, 10, (100_000,))
    dropped = gpt.drop_labels(labels)
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.1) < 0.005, rate
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


# ---- model.py: checkpoint loading (load_tokenizer / load_gpt) ----

def _official_name(name, kind):
    """Our tokenizer tensor name -> the official GigaTok one (the state-dict names of
    `tokenizer/tokenizer_image/vq/vq_vit_model.py` and `tokenizer/tokenizer_image/vq/blocks.py`). Written
    here independently of the loader's rule table, so that a wrong rule there shows up as a failed round
    trip."""
    p = name.split(".")
    if p[0] == "cnn_encoder":                          # encoder.conv_blocks.{i}.res / .downsample
        p[0] = "encoder"
        if p[1] == "down":
            p[1] = "conv_blocks"
    elif p[0] == "cnn_decoder":                        # decoder.conv_blocks.{i}, decoder.adaptive.{i}
        p[0] = "decoder"
        if p[1] == "up" and p[3] == "adaptive":
            p = ["decoder", "adaptive", p[2]] + p[4:]
        elif p[1] == "up":
            p[1] = "conv_blocks"
            if p[3] == "upsample":
                p[4] = "conv1"
    elif p[0] in ("encoder", "decoder"):
        side, p[0] = p[0], {("encoder", "1d"): "s2to1encoder", ("decoder", "1d"): "s1to2decoder",
                            ("encoder", "2d"): "s2dencoder", ("decoder", "2d"): "s2ddecoder"}[p[0], kind]
        latent_pe, grid_pe = "latent_token_positional_embedding", "positional_embedding"
        p[1] = {"pos": grid_pe, "pos_image": grid_pe, "pos_latent": latent_pe,
                "pos_query": latent_pe if side == "encoder" else grid_pe,
                "embed": side + "_embed", "query_proj": "global_proj", "proj_out": "conv_out",
                "semantic_head": "distill_mlp", "layers": "transformer"}.get(p[1], p[1])
        if p[1] == "transformer":
            if p[3] == "cross_attn":
                p[3] = "multihead_attn"
            if p[3] == "mlp":
                p[3:5] = ["linear1" if p[4] == "0" else "linear2"]
    elif p[0] == "quantizer":
        p[0] = "quantize"
    return ".".join(p)


def _official_tokenizer_state(tok):
    """Our weights in the official names and layouts: (L, 1, C) position tables, 1x1 convs for the
    projections, plus the codebook-usage buffer the official quantizer keeps."""
    out = {}
    for name, t in tok.state_dict().items():
        official = _official_name(name, tok.cfg.kind)
        if official.endswith("positional_embedding"):
            t = t[:, None]                                             # (L, C) -> (L, 1, C)
        if name in ("quant_conv.weight", "post_quant_conv.weight", "encoder.proj_out.weight"):
            t = t[:, :, None, None]                                    # Linear -> Conv2d 1x1
        out[official] = t.clone()
    out["quantize.codebook_used"] = torch.zeros(65536)
    return out


def _official_checkpoint(state, **extra):  # what the official trainers save around the weights
    return dict(model=state, args=argparse.Namespace(lr=1e-4, ema=False), steps=10,
                optimizer={"state": {}, "param_groups": []},
                discriminator={"main.0.weight": torch.zeros(2)}, **extra)



def _assert_same_tokenizer(a, b, size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        codes = a.encode(x)
        assert torch.equal(codes, b.encode(x))
        assert torch.equal(a.decode(codes), b.decode(codes))


def test_load_official_tokenizer_round_trip():
    for kw in [dict(), dict(kind="2d"), dict(kind="2d", layer_type="vit")]:
        torch.manual_seed(0)
        tok = Tokenizer(toy_cfg(**kw)).eval()
        state = _official_tokenizer_state(tok)
        assert any(k.startswith(("s2to1encoder.", "s2dencoder.")) for k in state)
        with tempfile.TemporaryDirectory() as d:   # through a file: weights_only=True with the pickled args
            path = os.path.join(d, "official.pt")
            torch.save(_official_checkpoint(state), path)
            loaded = model.load_tokenizer(path)
        assert loaded.cfg == tok.cfg, (loaded.cfg, tok.cfg)
        assert not loaded.training
        _assert_same_tokenizer(tok, loaded, tok.cfg.image_size)


def test_load_official_tokenizer_prefers_ema_and_allows_stripped_semantic_head():
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg()).eval()
    ema = _official_tokenizer_state(tok)
    raw = {k: v + 1.0 for k, v in ema.items()}
    loaded = model.load_tokenizer(_official_checkpoint(raw, ema=ema))
    _assert_same_tokenizer(tok, loaded, 64)
    stripped = {k: v for k, v in ema.items() if "distill_mlp" not in k}
    loaded = model.load_tokenizer({"model": stripped})
    assert loaded.cfg.teacher_dim == 0 and loaded.decoder.semantic_head is None
    _assert_same_tokenizer(tok, loaded, 64)


def test_load_tokenizer_reads_our_checkpoint_and_its_config():
    torch.manual_seed(0)
    cfg = toy_cfg(entropy_temperature=0.02, rotation_trick=False)    # training fields the shapes cannot tell
    tok = Tokenizer(cfg).eval()
    for config in [dataclasses.asdict(cfg), {"tokenizer": dataclasses.asdict(cfg), "train": {"lr": 1e-4}}]:
        loaded = model.load_tokenizer({"config": config, "model": tok.state_dict()})
        assert loaded.cfg == cfg
    _assert_same_tokenizer(tok, loaded, 64)


def _with_tensor(state, name, tensor):
    """A copy of `state` with `name` set to `tensor`, or removed when tensor is None."""
    bad = dict(state)
    if tensor is None:
        del bad[name]
    else:
        bad[name] = tensor
    return bad


def test_load_tokenizer_names_missing_mis_shaped_and_unused_tensors():
    torch.manual_seed(0)
    state = _official_tokenizer_state(Tokenizer(toy_cfg()))
    cases = [("missing", "s2to1encoder.transformer.1.norm2.weight", None, "encoder.layers.1.norm2.weight"),
             ("wrong shape", "s1to2decoder.ln_post.bias", torch.zeros(7), "s1to2decoder.ln_post.bias"),
             ("unused", "s2to1encoder.extra_query", torch.zeros(3), "s2to1encoder.extra_query")]
    for kind, name, tensor, reported in cases:
        try:
            model.load_tokenizer({"model": _with_tensor(state, name, tensor)})
        except ValueError as e:
            assert kind in str(e) and reported in str(e), (kind, str(e))
        else:
            raise AssertionError(f"a checkpoint with a {kind} tensor {name} loaded")


def test_load_official_gpt_round_trip_and_errors():
    torch.manual_seed(0)
    gpt = GPT(GPT_PRESETS["toy"]).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.02 * torch.randn_like(p))                             # the zero-initialised head too
    state = {("cls_embedding.embedding_table.weight" if k == "cls_embedding.weight" else k): v.clone()
             for k, v in gpt.state_dict().items()}                         # official gpt_1d names
    loaded = model.load_gpt(_official_checkpoint(state))
    assert loaded.cfg == gpt.cfg
    codes, labels = torch.randint(0, 16384, (2, 256)), torch.tensor([3, 1000])
    with torch.no_grad():
        assert torch.equal(gpt(codes, labels), loaded(codes, labels))
    cfg = dataclasses.replace(gpt.cfg, class_dropout=0.2)             # not visible in the shapes
    ours = model.load_gpt({"config": {"gpt": dataclasses.asdict(cfg), "train": {"lr": 1e-3}},
                           "model": gpt.state_dict()})
    assert ours.cfg == cfg
    with torch.no_grad():
        assert torch.equal(gpt(codes, labels), ours(codes, labels))
    for name, tensor in [("layers.2.attention.wqkv.weight", None),
                         ("layers.0.feed_forward.w2.weight", torch.zeros(3, 3))]:
        try:
            model.load_gpt({"model": _with_tensor(state, name, tensor)})
        except ValueError as e:
            assert name in str(e), str(e)
        else:
            raise AssertionError(f"a GPT checkpoint with a bad {name} loaded")


# ---- evaluate.py ----

# Pixel-metric inputs: numpy's legacy RandomState streams (fixed forever by numpy's compatibility policy).
# The pinned values were computed by scikit-image 0.26.0 (numpy 2.4.6) in a throwaway venv:
#   structural_similarity(a[i], b[i], channel_axis=-1, data_range=255), peak_signal_noise_ratio(a[i], b[i])
# and for the smooth pair
#   structural_similarity(c, d, channel_axis=-1, data_range=255), peak_signal_noise_ratio(c, d).
SKIMAGE_SSIM = [0.951347405594721, 0.9518577889783452, -0.9792334555345645]
SKIMAGE_PSNR = [21.139461109853933, 21.126845630510026, 4.622614700460687]
SKIMAGE_SMOOTH = (0.922857673534757, 18.82325216556331)


def _pixel_metric_inputs():
    a = np.random.RandomState(0).randint(0, 256, (3, 20, 23, 3)).astype(np.uint8)
    noise = np.random.RandomState(1).randint(-40, 41, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    b[2] = 255 - a[2]                                        # a pair with negative SSIM
    yy, xx = np.mgrid[0:32, 0:40]
    c = np.stack([127.5 + 120 * np.sin(xx / (3 + k) + yy / (5 - k)) for k in range(3)],
                 -1).round().astype(np.uint8)

    return a, b, c, np.roll(c, 1, axis=1)                    # smooth image and its 1-pixel shift


def test_ssim_psnr_match_scikit_image():
    a, b, c, d = _pixel_metric_inputs()
    assert np.allclose(evaluate.ssim(a, b), SKIMAGE_SSIM, rtol=0, atol=1e-4)
    assert np.allclose(evaluate.psnr(a, b), SKIMAGE_PSNR, rtol=0, atol=1e-4)
    assert (abs(evaluate.ssim(c, d) - SKIMAGE_SMOOTH[0]) < 1e-4
            and abs(evaluate.psnr(c, d) - SKIMAGE_SMOOTH[1]) < 1e-4)
    assert (isinstance(evaluate.ssim(a[0], b[0]), float)
            and abs(evaluate.ssim(a[0], b[0]) - SKIMAGE_SSIM[0]) < 1e-4)
    assert evaluate.ssim(a[0], a[0]) == 1.0 and evaluate.psnr(a[0], a[0]) == float("inf")
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert evaluate.to_uint8(x)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]  # clamp(127.5 x + 128)


def test_frechet_distance_closed_forms():
    rs = np.random.RandomState(0)
    d = 12
    mu1, mu2 = rs.randn(d), rs.randn(d)
    q, _ = np.linalg.qr(rs.randn(d, d))                      # commuting covariances: one shared eigenbasis
    l1, l2 = rs.uniform(0.1, 3, d), rs.uniform(0.1, 3, d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    fd = evaluate.frechet_distance
    assert abs(fd(mu1, (q * l1) @ q.T, mu2, (q * l2) @ q.T) - exact) < 1e-9 * exact
    assert abs(fd(mu1, np.diag(l1), mu2, np.diag(l2)) - exact) < 1e-9 * exact
    assert abs(fd([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-12  # 1-D: (m1 - m2)^2 + (std1 - std2)^2
    assert abs(fd(mu1, np.diag(l1), mu1, np.diag(l1))) < 1e-9
    # a non-commuting 2x2 pair: tr sqrt(P) = sqrt(tr P + 2 sqrt(det P)) for P = S1 S2 (positive eigenvalues)
    s1, s2 = np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([[1.0, -0.3], [-0.3, 0.5]])
    p = s1 @ s2
    exact = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(p) + 2 * np.sqrt(np.linalg.det(p)))
    assert abs(fd(np.zeros(2), s1, np.zeros(2), s2) - exact) < 1e-12


def test_frechet_distance_matches_scipy_sqrtm_reference():
    # values from pytorch-fid 0.3.0's calculate_frechet_distance (scipy 1.17.1 linalg.sqrtm) on these inputs,
    # computed in a throwaway venv; the last case has N < D (singular covariances, as with few images)
    pinned = {(500, 16, 0): 96.28564153946587, (300, 64, 1): 2059.6766017565105,
              (20, 32, 2): 871.5328835264435}
    for (n, d, seed), ref in pinned.items():
        rs = np.random.RandomState(seed)
        x = rs.randn(n, d) @ rs.randn(d, d)
        y = rs.randn(n, d) @ rs.randn(d, d) * 0.7 + 0.3
        (m1, s1), (m2, s2) = evaluate.feature_stats(x), evaluate.feature_stats(y)
        assert abs(evaluate.frechet_distance(m1, s1, m2, s2) - ref) < 1e-6 * ref, (n, d, seed)


def test_inception_score_extremes():
    c = 8
    confident = torch.full((800, c), -30.0)
    confident[torch.arange(800), torch.arange(800) % c] = 30.0  # every chunk: each class equally often, sure
    mean, std = evaluate.inception_score(confident.numpy(), splits=10)
    assert abs(mean - c) < 1e-6 and std < 1e-6
    mean, _ = evaluate.inception_score(np.random.RandomState(0).randn(1, c).repeat(500, 0))  # p(y|x) = p(y)
    assert abs(mean - 1) < 1e-9


def test_precision_recall_identical_and_disjoint_sets():
    rs = np.random.RandomState(0)
    real = rs.randn(300, 16)
    assert evaluate.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert evaluate.precision_recall(real, rs.randn(300, 16) + 100) == (0.0, 0.0)
    p, r = evaluate.precision_recall(real, rs.randn(300, 16) * 0.3)  # fakes collapsed into the center:
    assert p > 0.9 and r < 0.5, (p, r)                                # precise but low recall


def test_ar_linear_probe_above_chance_on_a_toy_ar_model():
    # codes of 4 classes (half of each image's codes from its class's own quarter of the vocabulary), a tiny
    # GPT trained on them in-process, then the official probe protocol
    # (`autoregressive/lin_probe/lin_probe.py`): null class, layer n/2, mean over positions
    def class_codes(n, seed, classes=4, vocab=32, N=16):
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % classes
        own = y[:, None] * (vocab // classes) + torch.randint(vocab // classes, (n, N), generator=g)
        return torch.where(torch.rand(n, N, generator=g) < 0.5, own,
                           torch.randint(vocab, (n, N), generator=g)), y
    (x, y), (vx, vy) = class_codes(400, 0), class_codes(200, 1)
    torch.manual_seed(0)
    gpt = GPT(model.GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, dim=32, num_classes=4))
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-3)
    for _ in range(60):
        idx = torch.randint(400, (64,))
        loss = F.cross_entropy(gpt(x[idx], y[idx]).flatten(0, 1), x[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < math.log(32) - 0.1                  # it learned something about the codes
    train_f, val_f = evaluate.probe_features(gpt, x), evaluate.probe_features(gpt, vx)
    assert train_f.shape == (400, 32)
    acc = evaluate.train_linear_probe(train_f, y, val_f, vy, 4, epochs=10, batch=64)
    assert acc > 80, acc                                      # chance: 25%
    shuffled = evaluate.train_linear_probe(train_f, y[torch.randperm(400)], val_f, vy, 4, epochs=10, batch=64)
    assert shuffled < 50, shuffled                            # nothing to learn from permuted labels


def test_generation_report_reads_npz_and_folders_and_adm_reference_stats():
    from PIL import Image
    imgs = np.random.RandomState(0).randint(0, 256, (6, 24, 24, 3)).astype(np.uint8)
    net = evaluate.InceptionV3()
    net.load_state_dict(_inception_test_weights(net.state_dict()))
    cfg = evaluate.EvalConfig(batch_size=4)
    with tempfile.TemporaryDirectory() as d:
        np.savez(os.path.join(d, "samples.npz"), arr_0=imgs, labels=np.arange(6))    # sample.py's format
        os.makedirs(os.path.join(d, "ref", "sub"))
        # the same, as nested PNGs
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(os.path.join(d, "ref", "sub" if i % 2 else "", f"{i:03d}.png"))
        npz, folder = (evaluate.ImageSet(os.path.join(d, "samples.npz")),
                       evaluate.ImageSet(os.path.join(d, "ref")))
        assert len(npz) == len(folder) == 6 and (npz.rows(2, 5) == imgs[2:5]).all()
        samples, ref = os.path.join(d, "samples.npz"), os.path.join(d, "ref")
        out = evaluate.generation_report(samples, ref, cfg, "cpu", 0, 1, net, d)
        assert abs(out["gfid"]) < 1e-3 and out["precision"] == out["recall"] == 1.0, out  # float32 features
        cache = os.path.join(d, "ref-ref-inception.npz")                              # reusable as --ref
        assert set(np.load(cache).files) == {"mu", "sigma", "pool"}
        # ADM's reference-batch layout: images (arr_0) + stored statistics. The stored mu / sigma win; the
        # pool features for precision / recall come from the images
        pool = np.load(cache)["pool"]
        mu, sigma = evaluate.feature_stats(pool[:4])
        np.savez(os.path.join(d, "adm.npz"), arr_0=imgs, mu=mu, sigma=sigma)
        stats = evaluate.reference_stats(os.path.join(d, "adm.npz"), net, 4, "cpu", 0, 1,
                                         os.path.join(d, "c.npz"))
        assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)
        assert (stats["pool"].shape == (6, 2048)
                and np.allclose(np.sort(stats["pool"], 0), np.sort(pool, 0), atol=1e-4))


def test_reconstruction_report_equals_direct_computation():
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg()).eval()
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    data = [(x[i], i % 2) for i in range(6)]
    lpips = model.LPIPS().eval()
    with tempfile.TemporaryDirectory() as d:
        out = evaluate.reconstruction_report(tok, data, evaluate.EvalConfig(batch_size=4), "cpu", 0, 1,
                                             evaluate.InceptionV3(), lpips, d)
        assert os.path.exists(out["grid"])
        assert os.path.exists(evaluate.pca_picture(tok, x[:3], os.path.join(d, "pca.png")))
    # in the report's batches of 4: a conv's last bits depend on the batch (and threads)
    with torch.no_grad():
        codes = torch.cat([tok.encode(xb) for xb in x.split(4)])
        recon = torch.cat([tok.decode(c) for c in codes.split(4)])
        o8, r8 = evaluate.to_uint8(x), evaluate.to_uint8(recon)
        assert abs(out["psnr"] - evaluate.psnr(o8, r8).mean()) < 1e-9
        assert abs(out["ssim"] - evaluate.ssim(o8, r8).mean()) < 1e-9
        assert abs(out["lpips"] - lpips(x, recon).mean().item()) < 1e-5
    assert out["codes_used"] == len(codes.unique()) and out["codebook_usage"] == len(codes.unique()) / 1024
    assert out["images"] == 6 and math.isfinite(out["rfid"])
    # two loading processes: the same images in the same order, so the same report
    with tempfile.TemporaryDirectory() as d:
        loaded = evaluate.reconstruction_report(tok, data, evaluate.EvalConfig(batch_size=4, num_workers=2),
                                                "cpu", 0, 1, out_dir=d)

    assert all(loaded[k] == out[k] for k in ("psnr", "ssim", "codes_used", "images")), (loaded, out)


def test_evaluate_main_reconstruction_without_inception_weights():
    # the whole script in-process on a random toy tokenizer: the Inception weights are absent, so FID is
    # skipped with a note and the other metrics are still computed and written
    import json
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg())
    with tempfile.TemporaryDirectory() as d:
        ckpt = {"model": tok.state_dict(), "config": {"tokenizer": dataclasses.asdict(tok.cfg)}}
        torch.save(ckpt, os.path.join(d, "tok.pt"))
        cfg = evaluate.EvalConfig(tokenizer=os.path.join(d, "tok.pt"), num_images=6, batch_size=3,
                                  lpips=False, inception_path=os.path.join(d, "absent.pth"))
        results = evaluate.main(cfg)
        saved = json.load(open(os.path.join(d, "eval.json")))
        assert os.path.exists(os.path.join(d, "reconstructions.png"))
        assert os.path.exists(results["reconstruction"]["pca"])
    rec = saved["results"]["reconstruction"]
    assert rec["images"] == 6 and "rfid" not in rec and 0 < rec["codebook_usage"] <= 1 and rec["psnr"] > 0
    assert any("pt_inception-2015-12-05-6726825d.pth" in n for n in saved["notes"])


def test_evaluate_main_probe_reads_the_ar_code_cache():
    # main(--gpt) end to end on a prepared train_ar.py code cache (class-dependent codes, as train_ar would
    # have written them for a random toy tokenizer): the probe must find the cache, take the center view, and
    # beat chance
    import json
    import train_ar
    torch.manual_seed(0)
    tok = Tokenizer(toy_cfg())
    N, vocab, classes = tok.cfg.num_tokens, tok.cfg.codebook_size, 4
    gcfg = dataclasses.replace(GPT_PRESETS["toy"], n_layer=2, dim=64, n_head=2, vocab_size=vocab,
                               block_size=N, num_classes=classes)
    with tempfile.TemporaryDirectory() as d:
        ckpt = {"model": tok.state_dict(), "config": {"tokenizer": dataclasses.asdict(tok.cfg)}}
        torch.save(ckpt, os.path.join(d, "tok.pt"))
        train = dict(tokenizer=os.path.join(d, "tok.pt"), data="synthetic", per_class=10,
                     code_dir=os.path.join(d, "codes"))
        torch.save({"model": GPT(gcfg).state_dict(),
                    "config": {"gpt": dataclasses.asdict(gcfg), "train": train}},
                   os.path.join(d, "gpt.pt"))
        g = torch.Generator().manual_seed(0)
        for split, n, views, per_class in (("train", 40, 10, 10), ("val", 40, 1, 0)):
            y = torch.arange(n) % classes
            codes = torch.randint(vocab, (n, views, N), generator=g)
            # only the center view carries the class
            codes[:, 4 if views == 10 else 0, : N // 2] = y[:, None] * 7
            folder = os.path.join(d, "codes", split)
            os.makedirs(folder)
            np.save(os.path.join(folder, "codes.npy"), codes.numpy().astype(np.uint16))
            np.save(os.path.join(folder, "labels.npy"), y.numpy())
            meta = dict(fingerprint=train_ar.tokenizer_fingerprint(tok), data="synthetic", num_classes=0,
                        per_class=per_class, views=views, classes=[str(c) for c in range(classes)])
            json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
        results = evaluate.main(evaluate.EvalConfig(ckpt=os.path.join(d, "gpt.pt"), probe_epochs=10,
                                                    probe_batch=16,
                                                    inception_path=os.path.join(d, "absent.pth")))
    probe = results["linear_probe"]
    assert probe["train_images"] == 40 and probe["val_images"] == 40 and probe["layer"] == 1
    assert probe["top1"] > 90, probe                      # chance: 25%


# Every conv of the FID Inception weights file as `name=out x in x kh x kw`; each has a BatchNorm of `out`
# channels (weight, bias, running_mean, running_var) beside it, then fc 1008x2048 (+ bias). Obtained from
# pytorch-fid 0.3.0's FID network built in a throwaway venv (torchvision's Inception3(num_classes=1008,
# aux_logits=False) with pytorch-fid's FIDInceptionA/C/E_1/E_2 blocks), whose state dict the file fills
# strictly.
INCEPTION_CONVS = """
Conv2d_1a_3x3=32x3x3x3 Conv2d_2a_3x3=32x32x3x3 Conv2d_2b_3x3=64x32x3x3 Conv2d_3b_1x1=80x64x1x1
    Conv2d_4a_3x3=192x80x3x3
Mixed_5b: branch1x1=64x192x1x1 branch5x5_1=48x192x1x1 branch5x5_2=64x48x5x5 branch3x3dbl_1=64x192x1x1
    branch3x3dbl_2=96x64x3x3 branch3x3dbl_3=96x96x3x3 branch_pool=32x192x1x1
Mixed_5c: branch1x1=64x256x1x1 branch5x5_1=48x256x1x1 branch5x5_2=64x48x5x5 branch3x3dbl_1=64x256x1x1
    branch3x3dbl_2=96x64x3x3 branch3x3dbl_3=96x96x3x3 branch_pool=64x256x1x1
Mixed_5d: branch1x1=64x288x1x1 branch5x5_1=48x288x1x1 branch5x5_2=64x48x5x5 branch3x3dbl_1=64x288x1x1
    branch3x3dbl_2=96x64x3x3 branch3x3dbl_3=96x96x3x3 branch_pool=64x288x1x1
Mixed_6a: branch3x3=384x288x3x3 branch3x3dbl_1=64x288x1x1 branch3x3dbl_2=96x64x3x3 branch3x3dbl_3=96x96x3x3
Mixed_6b: branch1x1=192x768x1x1 branch7x7_1=128x768x1x1 branch7x7_2=128x128x1x7 branch7x7_3=192x128x7x1
    branch7x7dbl_1=128x768x1x1 branch7x7dbl_2=128x128x7x1 branch7x7dbl_3=128x128x1x7
    branch7x7dbl_4=128x128x7x1 branch7x7dbl_5=192x128x1x7 branch_pool=192x768x1x1
Mixed_6c: branch1x1=192x768x1x1 branch7x7_1=160x768x1x1 branch7x7_2=160x160x1x7 branch7x7_3=192x160x7x1
    branch7x7dbl_1=160x768x1x1 branch7x7dbl_2=160x160x7x1 branch7x7dbl_3=160x160x1x7
    branch7x7dbl_4=160x160x7x1 branch7x7dbl_5=192x160x1x7 branch_pool=192x768x1x1
Mixed_6d: branch1x1=192x768x1x1 branch7x7_1=160x768x1x1 branch7x7_2=160x160x1x7 branch7x7_3=192x160x7x1
    branch7x7dbl_1=160x768x1x1 branch7x7dbl_2=160x160x7x1 branch7x7dbl_3=160x160x1x7
    branch7x7dbl_4=160x160x7x1 branch7x7dbl_5=192x160x1x7 branch_pool=192x768x1x1
Mixed_6e: branch1x1=192x768x1x1 branch7x7_1=192x768x1x1 branch7x7_2=192x192x1x7 branch7x7_3=192x192x7x1
    branch7x7dbl_1=192x768x1x1 branch7x7dbl_2=192x192x7x1 branch7x7dbl_3=192x192x1x7
    branch7x7dbl_4=192x192x7x1 branch7x7dbl_5=192x192x1x7 branch_pool=192x768x1x1
Mixed_7a: branch3x3_1=192x768x1x1 branch3x3_2=320x192x3x3 branch7x7x3_1=192x768x1x1
    branch7x7x3_2=192x192x1x7 branch7x7x3_3=192x192x7x1 branch7x7x3_4=192x192x3x3
Mixed_7b: branch1x1=320x1280x1x1 branch3x3_1=384x1280x1x1 branch3x3_2a=384x384x1x3 branch3x3_2b=384x384x3x1
    branch3x3dbl_1=448x1280x1x1 branch3x3dbl_2=384x448x3x3 branch3x3dbl_3a=384x384x1x3
    branch3x3dbl_3b=384x384x3x1 branch_pool=192x1280x1x1
Mixed_7c: branch1x1=320x2048x1x1 branch3x3_1=384x2048x1x1 branch3x3_2a=384x384x1x3 branch3x3_2b=384x384x3x1
    branch3x3dbl_1=448x2048x1x1 branch3x3dbl_2=384x448x3x3 branch3x3dbl_3a=384x384x1x3
    branch3x3dbl_3b=384x384x3x1 branch_pool=192x2048x1x1
"""


def test_inception_state_dict_matches_fid_weights_table():
    expected, block = {}, ""
    for tok in INCEPTION_CONVS.split():
        if tok.endswith(":"):
            block = tok[:-1] + "."
            continue
        name, shape = tok.split("=")
        shape = tuple(int(s) for s in shape.split("x"))
        expected[f"{block}{name}.conv.weight"] = shape
        for t in ("weight", "bias", "running_mean", "running_var"):
            expected[f"{block}{name}.bn.{t}"] = shape[:1]
    expected.update({"fc.weight": (1008, 2048), "fc.bias": (1008,)})
    net = evaluate.InceptionV3()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(expected) == 472 and ours == expected
    assert sum(math.prod(s) for s in expected.values()) == 23_885_392


def _inception_test_weights(sd):
    """Deterministic, well-scaled weights for every tensor (sorted names, one torch.Generator)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k in sorted(sd):
        v = sd[k]
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("running_mean", "bias")):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            out[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
    return out


def test_inception_forward_matches_pytorch_fid_on_fixed_weights():
    # Reference: pytorch-fid 0.3.0's own InceptionV3([3]) wrapper (resize, scaling, blocks), its
    # fid_inception_v3() filled with _inception_test_weights instead of the downloaded file, on the same
    # input, in a throwaway venv: pool = net(x)[0].flatten(1), logits = pool @ fc.weight.T. Our module
    # reproduced it bit for bit there.
    net = evaluate.InceptionV3()
    net.load_state_dict(_inception_test_weights(net.state_dict()))
    yy, xx = torch.meshgrid(torch.arange(40.), torch.arange(48.), indexing="ij")
    x = torch.stack([torch.stack([(torch.sin(xx * (c + 1) / 7 + yy * (n + 1) / 5) + 1) / 2 for c in range(3)])
                     for n in range(2)])                     # (2, 3, 40, 48) in [0, 1]
    with torch.no_grad():
        pool, logits = net(x)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    close = lambda t, ref: torch.allclose(t, torch.tensor(ref), rtol=1e-4, atol=1e-4)
    assert close(pool.sum(1), [1919.18725586, 2029.49072266])
    assert close(pool[:, :4], [[2.57894492, 0.0, 0.97330391, 0.85627365],
                               [2.84315348, 0.0, 0.94179320, 0.94803500]])
    assert close(logits.sum(1), [33.75212860, 32.77136993])
    assert close(logits[:, :4], [[-1.29854167, 0.98458344, -0.86808312, -0.92843902],
                                 [-1.29457831, 1.00644469, -0.98603594, -0.94945979]])


def test_inception_weights_absent_message():
    try:
        evaluate.load_inception("/nonexistent/pt_inception.pth")
    except RuntimeError as e:
        assert "pt_inception-2015-12-05-6726825d.pth" in str(e) and "--inception-path" in str(e), str(e)
    else:
        raise AssertionError("no error for a missing weights file")


# ---- train_ar.py / sample.py ----

def _tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(GPT_PRESETS["toy"], n_layer=2, n_head=2, dim=32, vocab_size=40, block_size=12,
                              num_classes=5, **kw)
    gpt = GPT(cfg)
    # a random head (the zero-initialized one would make every logit equal), and class embeddings large
    # enough that the class matters

    torch.nn.init.normal_(gpt.output.weight, std=0.3)
    torch.nn.init.normal_(gpt.cls_embedding.weight, std=0.5)
    return gpt.eval()


def test_sample_kv_cache_generation_equals_uncached():
    gpt, labels = _tiny_gpt(), torch.tensor([0, 1, 2, 4])
    settings = [dict(temperature=0), dict(temperature=0, cfg_scale=3.0),                       # greedy
                # sampling, seeded
                dict(), dict(cfg_scale=2.0, top_k=8, top_p=0.9, temperature=1.3),
                dict(cfg_scale=2.0, cfg_schedule="step", step_start=0.5)]
    for kw in settings:
        a = sample.generate(gpt, labels, generator=torch.Generator().manual_seed(7), kv_cache=True, **kw)
        b = sample.generate(gpt, labels, generator=torch.Generator().manual_seed(7), kv_cache=False, **kw)
        assert a.shape == (4, 12) and torch.equal(a, b), kw
    assert all(layer.attention.cache is None for layer in gpt.layers)  # the cache is released


def test_sample_guidance_scale_one_gives_conditional_logits():
    gpt = _tiny_gpt()
    codes, labels = torch.randint(0, 40, (3, 12)), torch.tensor([0, 3, 4])
    null = torch.full_like(labels, gpt.cfg.num_classes)
    with torch.no_grad():
        doubled = gpt(torch.cat([codes, codes]), torch.cat([labels, null]))   # [conditional; null class]
        cond, uncond = gpt(codes, labels), gpt(codes, null)
    for i in range(12):
        assert torch.allclose(sample.guide(doubled[:, i], 1.0), cond[:, i], atol=1e-5)
        assert torch.allclose(sample.guide(doubled[:, i], 0.0), uncond[:, i], atol=1e-5)
        s = 2.5  # and in between / beyond: the straight line through them
        assert torch.allclose(sample.guide(doubled[:, i], s), uncond[:, i] + s * (cond[:, i] - uncond[:, i]),
                              atol=1e-4)
    # the step schedule: the first code at full scale (the official prefill,
    # `autoregressive/models/generate.py`), then 1 until step_start, then s
    scales = [sample.guidance_scale(i, 11, 4.0, "step", 0.5) for i in range(11)]
    assert scales == [4.0] + [1.0] * 4 + [4.0] * 6
    # guidance 1 samples from the conditional model: the same codes as drawing from the conditional logits
    a = sample.generate(gpt, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    x = torch.zeros_like(a)
    g = torch.Generator().manual_seed(3)
    for i in range(12):
        with torch.no_grad():
            x[:, i] = torch.multinomial(gpt(x[:, :i + 1], labels)[:, i].softmax(-1), 1, generator=g)[:, 0]
    assert torch.equal(a, x)


def test_sample_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {sample.sample_logits(logits, generator=torch.Generator().manual_seed(s),
                                               **kw).item()
                          for s in range(200)}
    assert draws(top_k=1) == {0} and draws(temperature=0) == {0}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}          # 0.5 < 0.7: the second code is needed to reach top_p
    assert draws(top_p=0.45) == {0}
    assert draws(top_p=0.85) == {0, 1, 2}
    assert draws() == {0, 1, 2, 3}


def test_train_ar_ten_crops_and_wsd_schedule():
    x = torch.arange(2 * 3 * 7 * 7, dtype=torch.float).view(2, 3, 7, 7)
    crops = train_ar.ten_crops(x, 5)
    assert crops.shape == (2, 10, 3, 5, 5)
    assert torch.equal(crops[:, 0], x[..., :5, :5]) and torch.equal(crops[:, 3], x[..., 2:, 2:])
    assert torch.equal(crops[:, 4], x[..., 1:6, 1:6]) and torch.equal(crops[:, 5], x[..., :5, :5].flip(-1))
    # schedule_steps -1: = max_steps
    cfg = train_ar.ARConfig(lr=1.0, warmup=10, max_steps=100, decay_frac=0.2)
    lr = [train_ar.get_lr(s, cfg) for s in range(101)]
    assert lr[0] == 0.01 and abs(lr[5] - 0.505) < 1e-9 and lr[10] == lr[79] == 1.0
    assert abs(lr[90] - (1 - math.sqrt(0.5))) < 1e-9 and lr[100] == 0.0
    cfg = dataclasses.replace(cfg, schedule_steps=1000)            # AR probing: stopped inside the hold phase
    assert all(train_ar.get_lr(s, cfg) == 1.0 for s in range(10, 101))
    cfg = dataclasses.replace(cfg, schedule="cosine", schedule_steps=-1)
    assert lr[0] == train_ar.get_lr(0, cfg) and abs(train_ar.get_lr(55, cfg) - 0.5) < 1e-9
    # the one-flag AR probe: GPT-B at the paper's batch and lr, 250k steps inside a 1.5M-step schedule,
    # no warmup
    probe = train_ar.resolve(train_ar.ARConfig(tokenizer="out/tokenizer-s-s/ckpt.pt", data="/data/imagenet",
                                               probe=True))
    assert (probe.gpt, probe.batch_size, probe.lr, probe.warmup, probe.max_steps, probe.schedule_steps,
            probe.per_class, probe.out_dir) == ("gpt-b", 256, 1e-4, 0, 250_000, 1_500_000, 0,
                                                "out/probe-tokenizer-s-s")
    assert train_ar.resolve(train_ar.ARConfig()).gpt == "toy"


def _register_tiny_ar():  # a 0.14M-parameter AR size for the end-to-end tests, trained like the toy
    GPT_PRESETS.setdefault("test-tiny", dataclasses.replace(GPT_PRESETS["toy"], n_layer=2, n_head=2, dim=64))
    train_ar.AR_TRAIN_PRESETS.setdefault("test-tiny", train_ar.AR_TRAIN_PRESETS["toy"])
    # and without class dropout: each process draws its own labels to drop, so only this one compares
    # across worlds

    GPT_PRESETS.setdefault("test-exact", dataclasses.replace(GPT_PRESETS["test-tiny"], class_dropout=0.0))
    train_ar.AR_TRAIN_PRESETS.setdefault("test-exact", train_ar.AR_TRAIN_PRESETS["toy"])


def _tiny_tokenizer_checkpoint(folder, codebook_size=64):
    torch.manual_seed(0)
    cfg = toy_cfg(image_size=32, num_latent_tokens=16, codebook_size=codebook_size, teacher_dim=0)
    path = os.path.join(folder, "tokenizer", "ckpt.pt")
    os.makedirs(os.path.dirname(path))
    torch.save({"config": {"tokenizer": dataclasses.asdict(cfg)}, "model": Tokenizer(cfg).state_dict()}, path)
    return path


def _tiny_code_cache(folder):
    """A tiny tokenizer checkpoint and a small code set written straight into its cache: 8 classes, one fixed
    random sequence each. -> (tokenizer path, code_dir)"""
    tok_path = _tiny_tokenizer_checkpoint(folder)
    rng = np.random.default_rng(0)
    seqs = rng.integers(0, 64, (8, 16))
    for split, views in (("train", 10), ("val", 1)):
        split_dir = os.path.join(folder, "codes", split)
        os.makedirs(split_dir)
        np.save(os.path.join(split_dir, "codes.npy"), np.repeat(seqs[:, None], views, 1).astype(np.uint16))
        np.save(os.path.join(split_dir, "labels.npy"), np.arange(8))
        runtime.write_json(os.path.join(split_dir, "meta.json"), dict(
            fingerprint=train_ar.tokenizer_fingerprint(model.load_tokenizer(tok_path)), data="synthetic",
            num_classes=0, per_class=0, views=views, classes=list("abcdefgh")))
    return tok_path, os.path.join(folder, "codes")


def test_train_ar_toy_overfits_a_small_code_set_and_resumes_exactly():
    _register_tiny_ar()
    with tempfile.TemporaryDirectory() as d:
        tok_path, code_dir = _tiny_code_cache(d)
        cfg = train_ar.ARConfig(tokenizer=tok_path, code_dir=code_dir, gpt="test-tiny", per_class=0,
                                out_dir=os.path.join(d, "ar"), batch_size=16, max_steps=250, warmup=10,
                                lr=3e-3, eval_interval=1000, log_interval=1000, ckpt_interval=1000)
        result = train_ar.main(cfg)
        assert result["val_loss"] < 0.1 * math.log(64), result      # memorized: far below log(vocab) = 4.16
        assert result["val_loss"] < 0.1 * result["code_entropy"], result
        # save -> resume gives the same weights as one uninterrupted run
        kw = dict(max_steps=30, schedule_steps=30, eval_interval=1000, ckpt_interval=1000)
        train_ar.main(dataclasses.replace(cfg, out_dir=os.path.join(d, "straight"), **kw))
        train_ar.main(dataclasses.replace(cfg, out_dir=os.path.join(d, "resumed"), **dict(kw, max_steps=12)))
        train_ar.main(dataclasses.replace(cfg, out_dir=os.path.join(d, "resumed"), **kw))
        a, b = (torch.load(os.path.join(d, run, "ckpt.pt"), weights_only=True)
                for run in ("straight", "resumed"))
        assert a["step"] == b["step"] == 30
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        # and sample.py draws a labelled grid from it
        out = os.path.join(d, "grid.png")
        sample.main(sample.SampleConfig(ckpt=os.path.join(d, "ar", "ckpt.pt"), per_class=2, out=out))
        from PIL import Image
        assert Image.open(out).size[1] == 8 * 32                                  # a row per class
        for bad in (dict(classes="3,8"),
                    dict(tokenizer=_tiny_tokenizer_checkpoint(os.path.join(d, "other"), 128))):
            try:  # a class the model does not have, a tokenizer of another vocabulary: one-line errors
                sample.main(sample.SampleConfig(ckpt=os.path.join(d, "ar", "ckpt.pt"), per_class=2, out=out,
                                                **bad))
                raise AssertionError(f"{bad} was accepted")
            except runtime.UserError as e:
                assert "class ids from 0 to 7" in str(e) or "does not fit the AR model" in str(e), e


class _FewImages:  # a stand-in for make_dataset: n deterministic images at `size`, with labels i % 3
    classes = ["red", "green", "blue"]

    def __init__(self, data, split, size, n=6, num_classes=0, per_class=0):
        self.size, self.n, self.offset = size, n, 100 if split == "val" else 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.offset + i)
        return torch.rand(3, self.size, self.size, generator=g) * 2 - 1, i % 3


def test_train_ar_code_cache_is_ten_crops_written_once_and_reused():
    _register_tiny_ar()
    real, data.make_dataset = data.make_dataset, _FewImages
    try:
        with tempfile.TemporaryDirectory() as d:
            tok_path = _tiny_tokenizer_checkpoint(d)
            cfg = train_ar.ARConfig(tokenizer=tok_path, gpt="test-tiny", out_dir=os.path.join(d, "ar"),
                                    max_steps=2, batch_size=4, encode_batch=4, per_class=0)
            train_ar.main(cfg)
            folder = os.path.join(d, "tokenizer", "codes-synthetic")
            codes = np.load(os.path.join(folder, "train", "codes.npy"))
            assert codes.dtype == np.uint16 and codes.shape == (6, 10, 16)
            assert np.load(os.path.join(folder, "val", "codes.npy")).shape == (6, 1, 16)
            assert list(np.load(os.path.join(folder, "train", "labels.npy"))) == [0, 1, 2, 0, 1, 2]
            tok = model.load_tokenizer(tok_path)
            # image 4: ten crops of its 35x35 center crop (1.1 x 32), encoded one by one
            with torch.no_grad():
                views = train_ar.ten_crops(_FewImages(None, "train", 35)[4][0][None], 32)[0]
                assert np.array_equal(codes[4], tok.encode(views).numpy())
                assert np.array_equal(np.load(os.path.join(folder, "val", "codes.npy"))[2],
                                      tok.encode(_FewImages(None, "val", 32)[2][0][None]).numpy())
            stamp = os.stat(os.path.join(folder, "train", "codes.npy")).st_mtime_ns
            data.make_dataset = None  # a second run must not touch the images at all
            train_ar.main(dataclasses.replace(cfg, max_steps=4))
            assert os.stat(os.path.join(folder, "train", "codes.npy")).st_mtime_ns == stamp
            # a retrained tokenizer is noticed: the cache is rebuilt
            data.make_dataset = _FewImages
            ckpt = torch.load(tok_path, weights_only=True)
            ckpt["model"]["quantizer.embedding.weight"] += 0.01
            torch.save(ckpt, tok_path)
            try:  # the AR checkpoint of the old codes is not resumed
                train_ar.main(dataclasses.replace(cfg, max_steps=4))
                assert False, "resumed an AR model trained on another tokenizer's codes"
            except SystemExit as e:
                assert "another tokenizer" in str(e)
            assert os.stat(os.path.join(folder, "train", "codes.npy")).st_mtime_ns != stamp
    finally:
        data.make_dataset = real


# ---- train_tokenizer.py ----

def _tok_run(out_dir, **kw):
    """train_tokenizer.main on the toy (no teacher, no LPIPS: its defaults), tiny batches: (result, rows)"""
    cfg = train_tokenizer.TrainConfig(**{**dict(out_dir=out_dir, batch_size=2, warmup=0, log_interval=1,
                                      image_interval=10 ** 6, eval_images=4, device="cpu"), **kw})
    result = train_tokenizer.main(cfg)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        import json
        rows = [json.loads(line) for line in f]
    return result, [r for r in rows if "loss" in r]


def test_parse_config_flags_help_and_unknown_flags():
    cfg = runtime.parse_config(train_tokenizer.TrainConfig(), ["--size", "s-s", "--max-steps", "7",
                                       "--fresh", "--lr=3e-4", "--compile", "false", "--data", "/x"])
    assert (cfg.size, cfg.max_steps, cfg.fresh, cfg.lr, cfg.compile, cfg.data) == \
        ("s-s", 7, True, 3e-4, False, "/x")
    for bad in (["--no-such-flag", "1"], ["--max-steps", "seven"], ["--max-steps"], ["positional"]):
        try:
            runtime.parse_config(train_tokenizer.TrainConfig(), bad)
            raise AssertionError(f"{bad} was accepted")
        except SystemExit as e:
            assert e.code != 0, bad
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runtime.parse_config(train_tokenizer.TrainConfig(), ["--help"])
        except SystemExit as e:
            assert e.code == 0
    text = buf.getvalue()
    assert "--disc-start" in text and "PatchGAN starts" in text and "--max-steps" in text
    # the official XL-XXL recipe: `configs/vq/VQ_XLXXL256.yaml`, 300 epochs at batch 256
    # (`scripts/composite_cmd/train_vq_and_eval.sh`)

    resolved = train_tokenizer.resolve(train_tokenizer.TrainConfig(size="xl-xxl"))
    assert (resolved.batch_size, resolved.warmup, resolved.entropy_weight, resolved.aux_loss_end,
            resolved.disc_start, resolved.max_steps, resolved.lr) == \
        (256, 5000, 0.005, 0, 20000, 1_500_000, 1e-4)
    assert train_tokenizer.resolve(train_tokenizer.TrainConfig(size="b-l")).max_steps == 1_000_000


def test_synthetic_images_deterministic_any_size_and_held_out_differs():
    a = data.make_dataset("synthetic", "train", 48)
    b = data.make_dataset("synthetic", "train", 48)
    x, y = a[13]
    assert x.shape == (3, 48, 48) and -1 <= x.min() and x.max() <= 1 and y == 3 and len(a.classes) == 10
    assert torch.equal(x, b[13][0])
    assert data.make_dataset("synthetic", "train", 100)[13][0].shape == (3, 100, 100)
    val = data.make_dataset("synthetic", "val", 48)
    assert len(val) == 500 and not torch.equal(val[13][0], x)
    sub = data.make_dataset("synthetic", "train", 16, num_classes=3, per_class=4)
    assert len(sub) == 12 and sorted({sub[i][1] for i in range(12)}) == [0, 1, 2]


def test_synthetic_shape_classes_are_mirror_symmetric():
    # training flips images left-right (train_tokenizer, and train_ar's ten crops), so a class must be its
    # own mirror image: the horizontal skewness of its shapes averages to ~0 (a triangle pointing sideways
    # would not).
    for c in range(7):  # the shapes; patterns are symmetric by their random orientation
        skews = []
        for k in range(40):
            img = data.render_synthetic(c + 10 * k, "train", 64)[0].astype(float)
            # columns of the pixels unlike the corner
            x = np.nonzero(np.abs(img - img[0, 0]).sum(-1) > 60)[1]
            skews.append(((x - x.mean()) ** 3).mean() / x.std() ** 3)
        assert abs(np.mean(skews)) < 0.1, (data.SYNTHETIC_CLASSES[c], np.mean(skews))


def test_image_folder_recursive_flat_subsets_and_unreadable_files():
    from PIL import Image
    import warnings
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        for cls in ("b_cls", "a_cls", "c_cls"):
            os.makedirs(os.path.join(d, "train", cls, "images"))
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
                    os.path.join(d, "train", cls, "images", f"{i}.png"))
        with open(os.path.join(d, "train", "a_cls", "images", "3.png"), "w") as f:
            f.write("not an image")
        os.makedirs(os.path.join(d, "flat"))
        Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8), "L").save(
            os.path.join(d, "flat", "g.png"))
        # no val/: every 3rd image of each class held out (10 images)
        images = data.make_dataset(d, "train", 32)

        assert images.classes == ["a_cls", "b_cls", "c_cls"] and len(images) == 7
        x, y = images[0]
        assert x.shape == (3, 32, 32) and y == 0
        bad = [os.path.basename(p) for p, _ in images.samples].index("3.png")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x3, y3 = images[bad]                  # the unreadable one: reported, replaced by the next image
        assert any("unreadable image" in str(w.message) for w in caught) and y3 == 1
        xa, _ = images.train_item(0, np.random.default_rng(1))
        assert xa.shape == (3, 32, 32)
        assert len(data.make_dataset(d, "train", 32, num_classes=2, per_class=2)) == 4
        flat = data.make_dataset(os.path.join(d, "flat"), "train", 16)
        assert flat.classes == ["flat"] and flat[0][0].shape == (3, 16, 16)       # grayscale -> RGB


def _files_at(root, paths, text=None):
    """Tiny 8x8 images (or text files) at root/path for each path, each image a different colour."""
    from PIL import Image
    for k, p in enumerate(paths):
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        if text is None:
            Image.new("RGB", (8, 8), (k * 7 % 256, 50, 100)).save(os.path.join(root, p))
        else:
            with open(os.path.join(root, p), "w") as f:
                f.write(text)


def _items(images):
    """-> [(file name without extension, label)] of a dataset, in its order."""
    return [(os.path.splitext(os.path.basename(p))[0], y) for p, y in images.samples]


def _one_line_error(fn, *words):
    try:
        fn()
    except runtime.UserError as e:
        assert "\n" not in str(e) and all(w in str(e) for w in words), e
        return
    raise AssertionError(f"no error naming {words}")


def test_image_folder_reads_tiny_imagenet():
    import warnings
    with tempfile.TemporaryDirectory() as d:
        wnids = ["n02", "n01", "n03"]
        _files_at(d, [f"train/{w}/images/{w}_{i}.JPEG" for w in wnids for i in range(3)]
                  + [f"val/images/val_{i}.JPEG" for i in range(7)] + ["test/images/test_0.JPEG"])
        for w in wnids:  # the boxes beside each class's images/: expected, not "skipped files"
            _files_at(d, [f"train/{w}/{w}_boxes.txt"], f"{w}_0.JPEG\t0\t0\t8\t8\n")
        val = ["n03", "n01", "n01", "n02", "n03", "n01", "n02"]  # val_0 .. val_6
        rows = "".join(f"val_{i}.JPEG\t{w}\t0\t0\t8\t8\n" for i, w in enumerate(val))
        _files_at(d, ["val/val_annotations.txt"], rows)
        _files_at(d, ["wnids.txt"], "\n".join(wnids) + "\n")
        _files_at(d, ["words.txt"], "n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\n"
                  "n03\tbullfrog, Rana catesbeiana\nn04\tstingray\n")     # more wnids than trained on
        with warnings.catch_warnings():
            warnings.simplefilter("error")                                   # nothing skipped, nothing to say
            train, held = data.make_dataset(d, "train", 8), data.make_dataset(d, "val", 8)
        assert train.classes == held.classes == ["n01", "n02", "n03"]          # "images" is never a class
        assert train.names == ["goldfish", "tabby", "bullfrog"] and train.layout.startswith("Tiny ImageNet")
        assert _items(train) == [(f"{w}_{i}", y) for y, w in enumerate(train.classes) for i in range(3)]
        # val/images/ labelled by the annotations (test/ unlabelled: unused), the classes interleaved
        assert _items(held) == [("val_1", 0), ("val_3", 1), ("val_0", 2), ("val_2", 0), ("val_6", 1),
                                ("val_4", 2), ("val_5", 0)]
        assert held[0][0].shape == (3, 8, 8) and held[0][1] == 0
        # --data at the split folder finds val/; the subsets apply to both splits by class id
        at_train = os.path.join(d, "train")
        sub = lambda split: _items(data.make_dataset(at_train, split, 8, num_classes=2, per_class=1))
        assert sub("train") == [("n01_0", 0), ("n02_0", 1)] and sub("val") == [("val_1", 0), ("val_3", 1)]
        unknown = "".join(f"val_{i}.JPEG\t{w.replace('n03', 'n09')}\t0\t0\t8\t8\n" for i, w in enumerate(val))
        _files_at(d, ["val/val_annotations.txt"], unknown)                       # a class not trained on
        _one_line_error(lambda: data.make_dataset(d, "val", 8), "'n09'", "val_annotations.txt", "training")


def test_image_folder_reads_imagenet_flat_val_labelled_by_csv_or_val_txt():
    with tempfile.TemporaryDirectory() as d:
        wnids = ["n01440764", "n01443537", "n01484850"]
        _files_at(d, [f"train/{w}/{w}_{i}.JPEG" for w in wnids for i in range(2)]
                  + [f"val/ILSVRC2012_val_0000000{i}.JPEG" for i in range(1, 6)])
        _files_at(d, ["LOC_synset_mapping.txt"], "n01440764 tench, Tinca tinca\nn01443537 goldfish, "
                  "Carassius auratus\nn01484850 great white shark, white shark\n")
        labels = {5: 0, 1: 2, 2: 0, 3: 1, 4: 0}                                # val image -> class index
        csv = "ImageId,PredictionString\n" + "".join(
            f"ILSVRC2012_val_0000000{i},{wnids[k]} 1 2 7 7 {wnids[k]} 0 0 4 4\n" for i, k in labels.items())
        txt = "".join(f"ILSVRC2012_val_0000000{i}.JPEG {k}\n" for i, k in sorted(labels.items()))
        expected = [(f"ILSVRC2012_val_0000000{i}", labels[i]) for i in (2, 3, 1, 4, 5)]  # interleaved
        for name, text in (("LOC_val_solution.csv", csv), ("val.txt", txt)):
            _files_at(d, [name], text)
            train, held = data.make_dataset(d, "train", 8), data.make_dataset(d, "val", 8)
            assert train.classes == held.classes == wnids
            assert held.names == ["tench", "goldfish", "great white shark"]
            assert held.layout == f"ImageNet (flat val/ labelled by {name})" and len(train) == 6
            assert _items(held) == expected
            assert _items(data.make_dataset(d, "val", 8, num_classes=1, per_class=2)) == expected[::3]
            os.remove(os.path.join(d, name))
        _one_line_error(lambda: data.make_dataset(d, "val", 8), "no class folders", "LOC_val_solution.csv")
        _files_at(d, ["val.txt"], "ILSVRC2012_val_00000001.JPEG 3\n")                # 3 classes: 0 .. 2
        _one_line_error(lambda: data.make_dataset(d, "val", 8), "val.txt", "below 3")
        _files_at(d, ["val.txt"], "ILSVRC2012_val_00000001.JPEG 0\n")                # 4 images unlabelled
        _one_line_error(lambda: data.make_dataset(d, "val", 8), "4 images", "no label", "val.txt")
        _files_at(d, ["LOC_val_solution.csv"], csv.replace("n01484850", "n09999999"))
        _one_line_error(lambda: data.make_dataset(d, "val", 8), "'n09999999'", "LOC_val_solution.csv")


def test_image_folder_matches_class_folders_of_val_or_test_by_name():
    with tempfile.TemporaryDirectory() as d:  # ImageNet / Imagenette: val/<wnid>/, a class missing there
        imagenette = os.path.join(d, "imagenette")
        _files_at(imagenette, [f"train/{w}/{w}_{i}.JPEG" for w in ("n1", "n2", "n3") for i in range(3)]
                  + [f"val/{w}/v{w}_{i}.JPEG" for w in ("n3", "n1") for i in range(2)])
        _files_at(imagenette, ["noisy_imagenette.csv"], "path,noisy_labels_0\n")
        train, held = data.make_dataset(imagenette, "train", 8), data.make_dataset(imagenette, "val", 8)
        assert train.classes == held.classes == held.names == ["n1", "n2", "n3"] and len(train) == 9
        assert held.layout == "Imagenette: class folders train/ + val/"
        assert _items(held) == [("vn1_0", 0), ("vn3_0", 2), ("vn1_1", 0), ("vn3_1", 2)]   # by name: n3 is 2
        assert _items(data.make_dataset(imagenette, "val", 8, num_classes=2, per_class=1)) == [("vn1_0", 0)]
        _files_at(imagenette, ["val/n9/x.JPEG"])
        _one_line_error(lambda: data.make_dataset(imagenette, "val", 8), "'n9'", "training classes")
        # CIFAR as folders: train/<class>/ + test/<class>/, no val/: test/ is the held-out split
        cifar = os.path.join(d, "cifar")
        _files_at(cifar, [f"{s}/{c}/{s}_{c}_{i}.png" for s in ("train", "test") for c in ("dog", "cat")
                          for i in range(3)])
        pets = ["cat", "dog"]
        for root in (cifar, os.path.join(cifar, "train"), os.path.join(cifar, "test")):
            train, held = data.make_dataset(root, "train", 8), data.make_dataset(root, "val", 8)
            assert train.classes == held.classes == pets
            assert held.layout == "class folders train/ + test/"
            assert _items(train) == [(f"train_{c}_{i}", y) for y, c in enumerate(pets) for i in range(3)]
            assert _items(held) == [(f"test_{c}_{i}", y) for i in range(3) for y, c in enumerate(pets)]
        assert len(data.make_dataset(cifar, "val", 8, per_class=2)) == 4
        # a flat train/ and a flat val/: one class, named after the folder
        _files_at(d, ["flat/train/a.png", "flat/train/b.png", "flat/val/c.png"])
        assert _items(data.make_dataset(os.path.join(d, "flat"), "val", 8)) == [("c", 0)]
        assert data.make_dataset(os.path.join(d, "flat"), "train", 8).classes == ["flat"]
        # ImageNet's val/ alone (to evaluate on): its own classes, all its images; no training split
        _files_at(d, ["val_only/val/n2/a.png", "val_only/val/n5/b.png"])
        for root in (os.path.join(d, "val_only"), os.path.join(d, "val_only", "val")):
            assert _items(data.make_dataset(root, "val", 8)) == [("a", 0), ("b", 1)]
            _one_line_error(lambda: data.make_dataset(root, "train", 8), "no train/ folder")


def test_image_folder_carves_an_interleaved_held_out_split_never_trained_on():
    import warnings
    with tempfile.TemporaryDirectory() as d:
        phone = os.path.join(d, "phone")
        _files_at(phone, [f"IMG_{i:04d}.jpg" for i in range(28)])
        train, held = data.make_dataset(phone, "train", 8), data.make_dataset(phone, "val", 8)
        assert train.classes == held.classes == ["phone"] and train.layout.startswith("a flat folder")
        assert [n for n, _ in _items(held)] == [f"IMG_{i:04d}" for i in range(3, 28, 4)]   # every 4th: 7
        assert not {p for p, _ in train.samples} & {p for p, _ in held.samples} and len(train) == 21
        # classes carved alike, interleaved (3 classes of 20: every 6th holds out 9, at least 8)
        folders = os.path.join(d, "folders")
        _files_at(folders, [f"{c}/{c}{i:02d}.png" for c in "bca" for i in range(20)])
        train, held = data.make_dataset(folders, "train", 8), data.make_dataset(folders, "val", 8)
        assert held.layout == "class folders, every 6th image of each class held out" and len(train) == 51
        assert _items(held) == [(f"{c}{i:02d}", y) for i in (5, 11, 17) for y, c in enumerate("abc")]
        assert not {p for p, _ in train.samples} & {p for p, _ in held.samples}
        sub = data.make_dataset(folders, "val", 8, num_classes=2, per_class=1)
        assert _items(sub) == [("a05", 0), ("b05", 1)]
        assert len(data.make_dataset(folders, "train", 8, num_classes=2, per_class=30)) == 34
        # loose photos beside a sub-folder: one more class, said in a warning
        _files_at(phone, ["edited/e0.jpg", "edited/e1.jpg"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, held = data.make_dataset(phone, "train", 8), data.make_dataset(phone, "val", 8)
        assert train.classes == ["edited", "phone"] and len(train) + len(held) == 30
        assert any("28 images lie beside 1 class folders" in str(w.message) for w in caught)


def test_tokenizer_datasets_subset_both_splits_and_show_the_first_held_out_images():
    with tempfile.TemporaryDirectory() as d:  # 3 classes x 8 images, no val/: every 4th held out (6 images)
        _files_at(d, [f"{c}/{c}{i}.png" for c in "abc" for i in range(8)])
        cfg = train_tokenizer.TrainConfig(size="toy", data=d, per_class=1)
        train, held, shown = train_tokenizer.datasets(cfg, "cpu")
        assert _items(train) == [("a0", 0), ("b0", 1), ("c0", 2)]
        assert _items(held) == [("a3", 0), ("b3", 1), ("c3", 2)]                       # per_class on both
        assert shown.shape == (8, 3, 64, 64) and torch.equal(shown[3], held[0][0])       # 3 images, repeated
        assert len({x.sum().item() for x in shown}) == 3


def test_train_batches_are_a_function_of_seed_rank_and_step():
    images = data.make_dataset("synthetic", "train", 16, per_class=3)   # 30 images
    first = list(itertools.islice(data.train_batches(images, 4, rank=1, world=2, seed=5), 9))
    later = next(data.train_batches(images, 4, rank=1, world=2, seed=5, start=7))
    # a resume sees the same
    assert torch.equal(first[7][0], later[0]) and torch.equal(first[7][1], later[1])
    other = next(data.train_batches(images, 4, rank=0, world=2, seed=5, start=7))
    assert not torch.equal(other[0], later[0])


def test_keep_freed_memory_keeps_a_freed_block_for_reuse():
    # glibc unmaps a freed 64 MiB block at once (RSS falls back); after runtime.keep_freed_memory it stays in
    # the process for later allocations (the CPU speed-up: no fresh page faults for each step's activations)
    script = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import runtime
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
def kept():  # RSS left after a 64 MiB tensor is written and freed
    before = rss()
    x = torch.ones(2 ** 24)
    del x
    return rss() - before
default = kept()
runtime.keep_freed_memory()
print(default, kept())
"""
    out = subprocess.run([sys.executable, "-c", script, REPO], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    default, after = map(int, out.stdout.split())
    assert default < 8 * 2 ** 20 and after > 48 * 2 ** 20, (default, after)


def test_checkpoint_save_is_atomic():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        runtime.save_checkpoint(dict(step=1, w=torch.ones(3), config=dict(a="b")), path)
        real_save = torch.save

        def crash(obj, f, *a, **k):
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed while writing")
        torch.save = crash
        try:
            runtime.save_checkpoint(dict(step=2, w=torch.zeros(3)), path)
            raise AssertionError("the crash was swallowed")
        except KeyboardInterrupt:
            pass
        finally:
            torch.save = real_save
        ckpt = model.read_checkpoint(path)                  # weights_only=True
        assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3)) and os.listdir(d) == ["ckpt.pt"]


def test_toy_training_steps_reduce_the_loss_on_a_fixed_batch():
    # the default toy is the paper's 1D Q-Former tokenizer: trained with its own loss weights on one image,
    # the reconstruction MSE falls to under a quarter and its codes do not collapse
    # one training image: every batch is that image (flipped or not)
    with tempfile.TemporaryDirectory() as d:
        result, rows = _tok_run(d, max_steps=25, num_classes=1, per_class=1, lr=1e-3)
        assert result["tokenizer"].cfg.kind == "1d" and result["tokenizer"].cfg.num_tokens == 128
        losses = [r["mse"] for r in rows]
        assert len(losses) == 25 and np.mean(losses[-5:]) < 0.25 * np.mean(losses[:3]), losses
        # (1, 3, 64, 64)
        x = data.make_dataset("synthetic", "train", 64, 0, num_classes=1, per_class=1)[0][0][None]
        with torch.no_grad():
            assert result["tokenizer"].eval().encode(x).unique().numel() > 32   # of 128 codes
        assert (os.path.exists(os.path.join(d, "ckpt.pt"))
                and os.path.exists(os.path.join(d, "recon-0000025.png")))
        loaded = model.load_tokenizer(os.path.join(d, "ckpt.pt"))    # the checkpoint is what the loader reads
        assert loaded.cfg == result["tokenizer"].cfg


def test_discriminator_terms_zero_before_disc_start_and_active_after_and_resume_continues():
    with tempfile.TemporaryDirectory() as d:
        _, rows = _tok_run(d, max_steps=3, disc_start=3, lr=1e-4, end_lr=1e-4)
        assert [r["step"] for r in rows] == [1, 2, 3] and all(r["gan"] == 0 and r["d_loss"] == 0
                                                              for r in rows)
        torch.manual_seed(0)
        Tokenizer(TOKENIZER_PRESETS["toy"])
        # created right after the tokenizer, same seed
        init_disc = model.PatchDiscriminator().state_dict()
        ckpt = model.read_checkpoint(os.path.join(d, "ckpt.pt"))
        assert ckpt["step"] == 3 and all(torch.equal(v, ckpt["discriminator"][k])
                                         for k, v in init_disc.items())
        # the same command, longer
        result, rows = _tok_run(d, max_steps=5, disc_start=3, lr=1e-4, end_lr=1e-4)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]                           # continued at step 4
        assert all(r["gan"] != 0 and r["d_loss"] > 0 for r in rows[3:])
        weights = {k: v.clone() for k, v in result["tokenizer"].state_dict().items()}
        changed = result["discriminator"].state_dict()
        assert any(not torch.equal(v, changed[k]) for k, v in init_disc.items() if v.is_floating_point())
    with tempfile.TemporaryDirectory() as d:   # resumed == uninterrupted (constant lr: same schedule)
        result, _ = _tok_run(d, max_steps=5, disc_start=3, lr=1e-4, end_lr=1e-4)
        for k, v in result["tokenizer"].state_dict().items():
            assert torch.allclose(v, weights[k], atol=1e-6), k


TINY_HUBCONF = '''
import torch, torch.nn as nn
dependencies = ["torch"]

class TinyViT(nn.Module):
    """patch embedding + LayerNorm, the interface of DINOv2's hub models"""
    def __init__(self, dim):
        super().__init__()
        self.patch_size = 14
        self.patch_embed = nn.Conv2d(3, dim, 14, 14)
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        return {"x_norm_patchtokens": self.norm(t), "x_norm_clstoken": t.mean(1)}

def tiny_vit(dim=384, **kw):
    torch.manual_seed(123)
    return TinyViT(dim)
'''


def test_teacher_through_local_hub_repo_is_frozen_and_semantic_loss_is_direct():
    with tempfile.TemporaryDirectory() as d:
        repo = os.path.join(d, "hubrepo")
        os.makedirs(repo)
        with open(os.path.join(repo, "hubconf.py"), "w") as f:
            f.write(TINY_HUBCONF)
        out = os.path.join(d, "run")
        buf = io.StringIO()
        with contextlib.redirect_stderr(buf):  # the toy asks for a teacher with the paper's weight
            result, rows = _tok_run(out, max_steps=3, teacher="tiny_vit", teacher_repo=repo,
                                    semantic_weight=0.5)
        assert "xFormers" not in buf.getvalue()  # DINOv2's warnings at import, silenced
        teacher, tok = result["teacher"], result["tokenizer"]
        # the semantic loss is -mean cos
        assert teacher is not None and all(-1 <= r["semantic"] <= 1 and r["semantic"] != 0 for r in rows)
        fresh = torch.hub.load(repo, "tiny_vit", source="local")
        assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in teacher.net.state_dict().items())
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        torch.manual_seed(0)
        init = Tokenizer(TOKENIZER_PRESETS["toy"]).state_dict()
        assert not torch.equal(init["decoder.semantic_head.0.weight"],
                               tok.state_dict()["decoder.semantic_head.0.weight"])
        ckpt = model.read_checkpoint(os.path.join(out, "ckpt.pt"))
        assert not any(k.startswith(("teacher", "net.")) for k in ckpt["model"])   # the teacher is not saved
        # the teacher's input (official order, `tokenizer/tokenizer_image/vq/vq_train.py`: normalize, then
        # bicubic resize to grid*14) and the loss
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        mean, std = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                     torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        direct_in = F.interpolate(((x + 1) / 2 - mean) / std, size=8 * 14, mode="bicubic",
                                  align_corners=False)
        t = teacher(x)
        assert t.shape == (2, 64, 384) and torch.allclose(
            t, fresh.forward_features(direct_in)["x_norm_patchtokens"], atol=1e-5)
        s = torch.randn(2, 64, 384)
        direct = np.mean([np.mean([-(s[j, i] @ t[j, i]).item() / (s[j, i].norm() * t[j, i].norm()).item()
                                   for i in range(64)]) for j in range(2)])
        assert abs(train_tokenizer.semantic_loss(s, t).item() - direct) < 1e-5
        with torch.no_grad():
            _, aux = tok.train()(x)
        assert aux["sem_feat"].shape == t.shape


def test_init_from_fills_a_new_run_from_an_official_checkpoint():
    torch.manual_seed(0)
    src = Tokenizer(toy_cfg()).eval()
    stripped = {k: v for k, v in _official_tokenizer_state(src).items() if "distill_mlp" not in k}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "official.pt")
        torch.save(_official_checkpoint(stripped), path)
        torch.manual_seed(1)
        tok = Tokenizer(toy_cfg()).eval()
        head = tok.decoder.semantic_head[0].weight.clone()
        train_tokenizer.init_tokenizer(tok, path)
        _assert_same_tokenizer(src, tok, 64)
        assert torch.equal(tok.decoder.semantic_head[0].weight, head)   # absent there: kept as initialized
        other = Tokenizer(toy_cfg(num_latent_tokens=32))
        try:
            train_tokenizer.init_tokenizer(other, path)
            raise AssertionError("a mismatched --init-from was accepted")
        except SystemExit as e:
            assert "does not fit" in str(e), e


def test_helpers_load_only_when_their_weight_asks_and_a_missing_one_stops_the_run():
    with tempfile.TemporaryDirectory() as d:
        absent = os.path.join(d, "absent")
        cfg = train_tokenizer.TrainConfig(size="s-s", out_dir=d, teacher_repo=absent, perceptual_weight=0.0,
                                          device="cpu", max_steps=0, batch_size=1)
        toy = os.path.join(d, "toy")
        # the paper's preset (on by default), the toy opted in to each
        for run, says in ((lambda: train_tokenizer.main(cfg), "--semantic-weight 0"),
                          (lambda: _tok_run(toy, max_steps=1, semantic_weight=0.5, teacher_repo=absent),
                           "--semantic-weight 0"),
                          (lambda: _tok_run(toy, max_steps=1, perceptual_weight=1.0, vgg_path=absent),
                           "--perceptual-weight 0")):
            try:
                run()
                raise AssertionError("trained without the helper its weight asked for")
            except runtime.UserError as e:
                assert says in str(e) and "could not load" in str(e), e
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # the toy's defaults: neither helper, nothing looked for
            result, rows = _tok_run(os.path.join(d, "toy2"), max_steps=1, teacher_repo=absent,
                                    vgg_path=absent)
        assert result["teacher"] is None and "teacher: off (semantic weight 0); LPIPS: off" in out.getvalue()
        assert rows[-1]["lpips"] == rows[-1]["semantic"] == 0.0
        paper = train_tokenizer.resolve(train_tokenizer.TrainConfig(size="xl-xxl"))
        # the paper's recipe, as `tokenizer/tokenizer_image/vq/vq_loss.py` weighs the terms
        assert (paper.perceptual_weight, paper.semantic_weight) == (1.0, 0.5)



# ---- reliability: bad flags, bad files, bad numbers, kills and restarts ----

def _user_error(main, cfg, argv):
    """runtime.run(main, cfg) with the command line argv -> (exit status, what it printed on stderr)."""
    err, old = io.StringIO(), sys.argv
    sys.argv = ["script.py"] + argv
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runtime.run(main, cfg)
        return 0, err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()
    finally:
        sys.argv = old


def test_bad_flags_are_one_line_errors_with_exit_status_2():
    with tempfile.TemporaryDirectory() as d:
        cases = [(["--size", "foo"], "--size 'foo'"), (["--data", "/nonexistent"], "no such folder"),
                 (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-3"], "--batch-size -3"),
                 (["--grad-accum", "0"], "--grad-accum 0"), (["--max-steps", "seven"], "--max-steps"),
                 (["--lr", "0"], "--lr 0.0"), (["--precision", "fp8"], "--precision 'fp8'"),
                 (["--beta2", "1.5"], "--beta2 1.5"), (["--no-such-flag", "1"], "unrecognized")]
        for argv, says in cases:
            code, err = _user_error(train_tokenizer.main, train_tokenizer.TrainConfig(),
                                    argv + ["--out-dir", d])
            lines = [l for l in err.splitlines() if not l.startswith("usage:")]
            assert (code == 2 and len(lines) == 1 and says in lines[0]
                    and "Traceback" not in err), (argv, code, err)
        for argv, says in [(["--gpt", "foo"], "--gpt 'foo'"), (["--decay-frac", "0"], "--decay-frac 0.0")]:
            code, err = _user_error(train_ar.main, train_ar.ARConfig(tokenizer=os.path.join(d, "none.pt")),
                                    argv)
            assert code == 2 and says in err, (argv, code, err)
        for argv, says in [(["--cfg-scale", "-5"], "--cfg-scale -5.0"), (["--top-p", "3"], "--top-p 3.0"),
                           (["--temperature", "-1"], "--temperature -1.0"),
                           (["--classes", "a,b"], "--classes")]:
            code, err = _user_error(sample.main, sample.SampleConfig(), argv)
            assert code == 2 and says in err, (argv, code, err)
        os.makedirs(os.path.join(d, "empty"))
        os.makedirs(os.path.join(d, "one"))
        from PIL import Image
        Image.new("RGB", (8, 8)).save(os.path.join(d, "one", "0.png"))
        with open(os.path.join(d, "ref.npz"), "w") as f:
            f.write("not an npz")
        for argv, says in [(["--samples", os.path.join(d, "empty")], "no images there"),
                           (["--samples", os.path.join(d, "one"), "--ref", os.path.join(d, "ref.npz")],
                            "not a folder"),
                           ([], "nothing to evaluate")]:
            code, err = _user_error(evaluate.main,
                                    evaluate.EvalConfig(inception_path=os.path.join(d, "no.pth")), argv)
            assert code == 2 and says in err, (argv, code, err)
    # and as a real process: status 2, one line after argparse's usage line, no traceback
    p = subprocess.run([sys.executable, "train_tokenizer.py", "--batch-size", "0"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == "error: --batch-size 0: 1 or more", p.stderr


def test_bf16_on_a_cpu_needs_native_bf16_and_runs_attention_in_fp32():
    # a CPU without native bf16 (AVX-512 BF16 or AMX): --precision bf16 is a one-line error naming fp32;
    # a memory plan or bench.py's count, which only borrow the CPU's autocast for fake tensors, still work
    native = runtime.native_bf16
    runtime.native_bf16 = lambda: False
    try:
        with tempfile.TemporaryDirectory() as d:
            code, err = _user_error(train_tokenizer.main, train_tokenizer.TrainConfig(),
                                    ["--precision", "bf16", "--device", "cpu", "--out-dir", d])
        assert (code == 2 and "no native bf16" in err and "--precision fp32" in err
                and "Traceback" not in err), err
        assert runtime.autocast_for("bf16", torch.device("cpu"), planning=True)[0] == "bf16"
        import bench  # so does bench.py's count, which runs no kernel either
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench.main(bench.BenchConfig(count=True, precision="bf16", device="cpu", batch_size=1,
                                         ar_batch_size=1))
        assert "; bf16;" in buf.getvalue() and "GFLOP per token" in buf.getvalue(), buf.getvalue()
    finally:
        runtime.native_bf16 = native
    assert runtime.autocast_for("fp32", torch.device("cpu"))[0] == "fp32"  # fp32 runs on every CPU
    # model.fp32_on_cpu: under a CPU autocast the attention is the fp32 one of the bf16 inputs;
    # without an autocast, untouched
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 8).bfloat16() for n in (5, 7, 7))
    plain = F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", torch.bfloat16):
        inside = model.fp32_on_cpu(F.scaled_dot_product_attention, q, k, v)
        mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        x = torch.randn(2, 5, 16)
        out = model.fp32_on_cpu(mha, x.bfloat16(), x.bfloat16(), x.bfloat16(), need_weights=False)[0]
    assert inside.dtype == torch.float32 and torch.equal(
        inside, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    # three separate fp32 copies, as fp32_on_cpu makes them: one tensor passed three times would take
    # MHA's packed projection
    assert out.dtype == torch.float32 and torch.equal(
        out, mha(*(x.bfloat16().float() for _ in range(3)), need_weights=False)[0])
    assert (torch.equal(model.fp32_on_cpu(F.scaled_dot_product_attention, q, k, v), plain)
            and plain.dtype == q.dtype)


def _odd_image_folder(d):
    """A folder of every kind of file a classroom's photos may hold; -> the number of usable images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    for folder in (a, b, os.path.join(d, "empty_class")):
        os.makedirs(folder)
    rgb(40, 30).convert("P").save(os.path.join(a, "palette.png"))
    rgb(40, 30).convert("CMYK").save(os.path.join(a, "cmyk.jpg"))
    rgb(40, 30).convert("1").save(os.path.join(a, "bilevel.png"))
    Image.fromarray((rng.integers(0, 65535, (40, 30))).astype(np.uint16)).save(os.path.join(a, "sixteen.png"))
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))                        # fully transparent red
    rgba.save(os.path.join(a, "transparent.png"))
    Image.new("LA", (30, 30), (0, 0)).save(os.path.join(a, "la.png"))
    rgb(1, 1).save(os.path.join(a, "tiny.png"))                               # smaller than any crop
    rgb(3, 4000).save(os.path.join(a, "wide.png"))                            # very wide
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:, :10] = 255                                                     # left half white
    exif = Image.Exif()
    exif[0x0112] = 6                                                          # "rotate 90 clockwise to view"
    Image.fromarray(upright).save(os.path.join(b, "exif.jpg"), exif=exif.tobytes(), quality=95)
    rgb(30, 30).save(os.path.join(b, "png_named.jpg"), format="PNG")          # misnamed, but an image
    buf = io.BytesIO()
    rgb(64, 64).save(buf, format="JPEG")
    with open(os.path.join(b, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[:300])
    open(os.path.join(b, "empty.png"), "wb").close()
    with open(os.path.join(b, "text.png"), "w") as f:
        f.write("not an image")
    with open(os.path.join(b, "notes.txt"), "w") as f:
        f.write("not an image either")
    return 13


def test_image_folder_uses_odd_images_and_skips_bad_files_with_a_count():
    import warnings
    with tempfile.TemporaryDirectory() as d:
        _odd_image_folder(d)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, val = data.make_dataset(d, "train", 16), data.make_dataset(d, "val", 16)
        assert any("skipped 1 files that are not images" in str(w.message)
                   and "1 class folders without images" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        assert train.classes == val.classes == ["a", "b", "empty_class"]
        assert len(train) + len(val) == 13 and len(val) == 3                   # every 4th image of each class
        seen = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(len(train)):
                x, y = train[i]
                assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
                seen[os.path.basename(train.samples[i][0])] = x
                assert train.train_item(i, np.random.default_rng(i))[0].shape == (3, 16, 16)
        unreadable = {os.path.basename(str(w.message).split()[2]) for w in caught
                      if "unreadable image" in str(w.message)}
        assert unreadable == ({"truncated.jpg", "empty.png", "text.png"}
                              & {os.path.basename(p) for p, _ in train.samples})
        assert torch.allclose(seen["transparent.png"], torch.ones(3, 16, 16))  # transparency over white
        assert seen["sixteen.png"].std() > 0.2  # 16-bit scaled, not clipped white
        exif = data.open_rgb(os.path.join(d, "b", "exif.jpg"))
        # upright: the white half on top
        assert exif.size == (40, 20) and np.asarray(exif)[:10].mean() > 200 > np.asarray(exif)[10:].mean()
        with tempfile.TemporaryDirectory() as d1:  # a class of one image cannot be split: a one-line error
            os.makedirs(os.path.join(d1, "only"))
            from PIL import Image
            Image.new("RGB", (8, 8)).save(os.path.join(d1, "only", "x.png"))
            try:
                data.make_dataset(d1, "val", 16)
                raise AssertionError("an unsplittable set was accepted")
            except runtime.UserError as e:
                assert "at least 2 images" in str(e), e


def test_nonfinite_steps_are_skipped_and_counted_and_a_run_of_them_stops_cleanly():
    real = train_tokenizer.loss_terms
    calls = [0]

    def sometimes_nan(*a, **k):
        terms, recons = real(*a, **k)
        if isinstance(a[1], torch._subclasses.fake_tensor.FakeTensor):  # the memory plan's pass, not a step
            return terms, recons
        calls[0] += 1
        if calls[0] in poisoned:
            terms = dict(terms, mse=terms["mse"] * float("nan"))
        return terms, recons
    train_tokenizer.loss_terms = sometimes_nan
    try:
        with tempfile.TemporaryDirectory() as d:
            poisoned = {3}
            result, rows = _tok_run(d, max_steps=5)
            assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1]
            assert all(torch.isfinite(v).all() for v in result["tokenizer"].state_dict().values()
                       if v.is_floating_point())
            poisoned, calls[0] = set(range(100)), 0
            before = model.read_checkpoint(os.path.join(d, "ckpt.pt"))["model"]
            try:
                _tok_run(d, max_steps=12, max_bad_steps=3, fresh=True, ckpt_interval=1)
                raise AssertionError("a run of non-finite steps went on")
            except SystemExit as e:
                assert "not finite for 3 steps in a row" in str(e), e
            after = model.read_checkpoint(os.path.join(d, "ckpt.pt"))
            assert after["step"] == 2 and all(torch.isfinite(v).all() for v in after["model"].values()
                                              if v.is_floating_point())
            # the fresh run's checkpoint, intact
            assert not all(torch.equal(before[k], after["model"][k]) for k in before)
    finally:
        train_tokenizer.loss_terms = real


def test_fp16_loss_scale_calibration_does_not_stop_a_run_but_a_nan_loss_still_does():
    # The GradScaler halves its scale on every step whose scaled gradients overflow and skips that step:
    # calibration, not a bad step. Gradients of ~1e10 overflow fp32 at a scale above ~2^98, so 2^120 takes
    # ~20 skips to calibrate
    torch.manual_seed(0)
    net, x = torch.nn.Linear(4, 1), torch.randn(8, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler, bad = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120), runtime.BadSteps(5, "ckpt.pt")
    w0 = net.weight.detach().clone()
    for step in range(60):
        scaler.scale(1e10 * net(x).pow(2).mean()).backward()
        bad(runtime.optimizer_step(opt, scaler, net.parameters(), 10.0), step, scaler)  # no SystemExit
    # no bad step counted, the scale calibrated, and it trained
    assert bad.total == 0 and scaler.get_scale() < 2.0 ** 100 and not torch.equal(w0, net.weight)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # a NaN loss overflows at every scale
    try:
        for step in range(30):
            scaler.scale(net(x).sum() * float("nan")).backward()
            bad(runtime.optimizer_step(opt, scaler, net.parameters(), 10.0), step, scaler)
        raise AssertionError("a NaN loss went on")
    except SystemExit as e:
        assert "not finite for 5 steps in a row" in str(e) and scaler.get_scale() < 1, (e, scaler.get_scale())


def test_resume_accepts_changed_training_fields_and_names_changed_architecture_fields():
    with tempfile.TemporaryDirectory() as d:
        _tok_run(d, max_steps=2)
        ckpt = model.read_checkpoint(os.path.join(d, "ckpt.pt"))
        assert {"scaler", "scaler_disc"} <= set(ckpt)                         # fp16's loss scale is saved too
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _tok_run(d, max_steps=3, entropy_weight=0.02)
        assert (f"entropy_weight {train_tokenizer.TRAIN_PRESETS['toy']['entropy_weight']:g} -> 0.02"
                in buf.getvalue())
        bad = dict(ckpt, config=dict(ckpt["config"],
                                     tokenizer=dict(ckpt["config"]["tokenizer"], codebook_size=512)))
        runtime.save_checkpoint(bad, os.path.join(d, "ckpt.pt"))
        try:
            _tok_run(d, max_steps=4)
            raise AssertionError("a checkpoint of another architecture was resumed")
        except runtime.UserError as e:
            assert "codebook_size 512 -> 1024" in str(e) and "--fresh" in str(e), e


def _toy_command(out_dir, *extra):
    return [sys.executable, "train_tokenizer.py", "--out-dir", out_dir, "--batch-size", "2",
            "--max-steps", "12", "--ckpt-interval", "1", "--log-interval", "1", "--image-interval", "1000",
            "--eval-images", "2", "--threads", "1", "--per-class", "2", *extra]


def test_weight_average_is_the_moving_average_and_the_weights_come_back_exactly():
    net = torch.nn.Linear(3, 2)
    ema, opt = runtime.EMA(net, 0.9), torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []
    for _ in range(4):
        net(torch.randn(5, 3)).square().sum().backward()
        opt.step(), opt.zero_grad()
        ema.update()
        seen.append([p.detach().clone() for p in net.parameters()])
    expect = seen[0]  # the first step's weights, then avg <- 0.9 avg + 0.1 weights
    for w in seen[1:]:
        expect = [0.9 * a + 0.1 * b for a, b in zip(expect, w)]
    with ema.applied():
        assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(net.parameters(), expect))
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), seen[-1]))  # the live weights, bit for bit
    sd = ema.state_dict()
    assert torch.allclose(sd["weight"], expect[0], atol=1e-6) and not torch.equal(sd["weight"], net.weight)
    other = runtime.EMA(net, 0.9)
    other.load_state_dict(sd)  # a resumed run's average
    with other.applied():
        assert torch.equal(net.weight, sd["weight"]) and torch.equal(net.bias, sd["bias"])
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), seen[-1]))


def test_toy_checkpoint_holds_the_average_which_the_loader_and_the_held_out_psnr_use():
    with tempfile.TemporaryDirectory() as d:
        ck = _tok_in_process(d, max_steps=6, lr=1e-3, eval_images=8)
        assert _max_diff(ck["model"], ck["ema"]) > 1e-4  # the average trails the weights
        tok = model.load_tokenizer(os.path.join(d, "ckpt.pt"))
        assert _max_diff(tok.state_dict(), ck["ema"]) == 0  # what train_ar.py, sample.py and evaluate.py use
        import json
        logged = json.loads(open(os.path.join(d, "log.jsonl")).readlines()[-1])["val_psnr"]
        val = data.make_dataset("synthetic", "val", 64)
        psnr = train_tokenizer.evaluate_held_out(tok, val, 8, 32, 0, 1, torch.device("cpu"))[0]
        tok.load_state_dict(ck["model"])
        live = train_tokenizer.evaluate_held_out(tok, val, 8, 32, 0, 1, torch.device("cpu"))[0]
        # to the rounding of another thread count; the weights themselves are farther off
        assert abs(psnr - logged) < 1e-4 < abs(live - logged), (psnr, live, logged)


def test_kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_weights():
    import signal
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(_toy_command(os.path.join(d, "straight")), cwd=REPO, check=True, capture_output=True)
        killed = os.path.join(d, "killed")
        # kills at these seconds after the start: in steps and in checkpoint writes
        for delay in (3.5, 5.0, 6.2):
            p = subprocess.Popen(_toy_command(killed), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
            p.wait()
        subprocess.run(_toy_command(killed), cwd=REPO, check=True, capture_output=True)
        a, b = (model.read_checkpoint(os.path.join(d, run, "ckpt.pt")) for run in ("straight", "killed"))
        assert a["step"] == b["step"] == 12
        for key in ("model", "ema"):  # the weights and their moving average
            diff = max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key])
            assert diff == 0, (key, diff)
        # no half-written files left
        assert os.listdir(killed) and not [f for f in os.listdir(killed) if ".tmp" in f]


def _class_folder(root, classes, per_class=3, size=40):
    """root/<class>/<i>.png, flat class folders of small deterministic pictures -> root"""
    from PIL import Image
    g = torch.Generator().manual_seed(len(classes))
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            a = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(a).save(os.path.join(root, c, f"{i}.png"))
    return root


def _said(fn, *args):
    """-> (fn's result, what it printed), without the trainers' memory plans (seconds of fake tensors per run,
    tested on their own)"""
    out, plans = io.StringIO(), (train_tokenizer.memory_plan, train_ar.memory_plan)
    train_tokenizer.memory_plan = train_ar.memory_plan = lambda *args, **kw: "memory plan: not made here"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            result = fn(*args)
    finally:
        train_tokenizer.memory_plan, train_ar.memory_plan = plans
    return result, out.getvalue()


def _said_error(fn, *args):
    """fn(*args) as _said runs it must stop on a one-line runtime.UserError -> its message."""
    try:
        _said(fn, *args)
    except runtime.UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("no error")


def test_ctrl_c_saves_at_the_step_reached_and_the_rerun_gives_the_uninterrupted_weights():
    import signal
    _register_tiny_ar()
    threads, real_log = torch.get_num_threads(), runtime.Logger.__call__

    def ctrl_c_at_step_3(self, step, **numbers):  # Ctrl-C in the middle of a run, as a user would press it
        real_log(self, step, **numbers)
        if step == 3 and "loss" in numbers:
            os.kill(os.getpid(), signal.SIGINT)
    with tempfile.TemporaryDirectory() as d:
        tok_path, code_dir = _tiny_code_cache(d)
        # the tokenizer and the AR model, each saved only at the end or at Ctrl-C (no periodic checkpoints)
        short = ("--ckpt-interval", "1000", "--max-steps", "6")
        tok = lambda out: runtime.parse_config(train_tokenizer.TrainConfig(), _toy_command(out, *short)[2:])
        ar = lambda out: train_ar.ARConfig(tokenizer=tok_path, code_dir=code_dir, gpt="test-tiny",
                                           per_class=0, batch_size=4, max_steps=6, log_interval=1,
                                           eval_interval=1000, ckpt_interval=1000, threads=1, out_dir=out)
        try:
            for main, cfg in ((train_tokenizer.main, tok), (train_ar.main, ar)):
                stopped = os.path.join(d, "stopped")
                _said(main, cfg(os.path.join(d, "straight")))
                if main is train_tokenizer.main:  # the command line: one line, exit status 130, no traceback
                    p = subprocess.Popen(_toy_command(stopped, *short), cwd=REPO, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
                    for line in p.stdout:
                        if line.startswith("step       3 |"):
                            p.send_signal(signal.SIGINT)
                            break
                    out, err = p.communicate(timeout=120)
                    code = p.returncode
                else:  # in this process
                    runtime.Logger.__call__ = ctrl_c_at_step_3
                    try:
                        _said(main, cfg(stopped))
                        raise AssertionError("Ctrl-C did not stop the run")
                    except SystemExit as e:
                        code, out, err = e.code, "", ""
                    finally:
                        runtime.Logger.__call__ = real_log
                ckpt = model.read_checkpoint(os.path.join(stopped, "ckpt.pt"))
                assert code == 130 and "Traceback" not in err and 3 <= ckpt["step"] < 6, (code, out, err)
                said = f"interrupted at step {ckpt['step']}, saved {stopped}/ckpt.pt; run the same command to"
                assert out == "" or said in out, out[-300:]
                _said(main, cfg(stopped))  # the same command again
                a, b = (model.read_checkpoint(os.path.join(d, r, "ckpt.pt")) for r in ("straight", "stopped"))
                assert a["step"] == b["step"] == 6
                for key in ("model", "ema", "discriminator"):  # the weights, their moving average, the critic
                    if key in a:
                        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
                assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][0].values(),
                                                             b["optimizer"]["state"][0].values()))
                for run in ("straight", "stopped"):
                    shutil.rmtree(os.path.join(d, run))
        finally:
            torch.set_num_threads(threads)


def test_the_ladder_follows_the_tokenizer_data_and_refuses_to_mix_runs():
    _register_tiny_ar()
    with tempfile.TemporaryDirectory() as d:
        F = _class_folder(os.path.join(d, "F"), ["café", "goldfish", "zebra"])
        tok_dir, ar_dir = os.path.join(d, "out", "tokenizer-toy"), os.path.join(d, "out", "ar")
        tok_cfg = train_tokenizer.TrainConfig(data=F, out_dir=tok_dir, max_steps=1, batch_size=2,
                                              eval_images=2, device="cpu")
        _said(train_tokenizer.main, tok_cfg)
        config = model.read_checkpoint(os.path.join(tok_dir, "ckpt.pt"))["config"]
        assert config["dataset"] == dict(data=F, num_classes=0, per_class=0)
        assert config["classes"] == config["names"] == ["café", "goldfish", "zebra"]
        # train_ar.py, sample.py and evaluate.py without --data: the tokenizer's folder and its classes
        tok_path, ar_path = os.path.join(tok_dir, "ckpt.pt"), os.path.join(ar_dir, "ckpt.pt")
        ar_cfg = train_ar.ARConfig(tokenizer=tok_path, gpt="test-tiny", out_dir=ar_dir, max_steps=2,
                                   batch_size=4, per_class=0, eval_interval=1000, device="cpu")
        _, said = _said(train_ar.main, ar_cfg)
        assert f"data {F} (from the tokenizer checkpoint): 6 training images" in said, said
        assert "memory plan" not in said, said  # a CPU run prints no plan (a CUDA run and --plan do)
        seen, real = [], sample.labelled_grid
        sample.labelled_grid = lambda rows, names: seen.append(names) or real(rows, names)
        try:
            _, said = _said(sample.main, sample.SampleConfig(ckpt=ar_path, per_class=1, device="cpu"))
        finally:
            sample.labelled_grid = real
        assert seen == [["0 café", "1 goldfish", "2 zebra"]] and f"3 classes of {F}" in said, (seen, said)
        ev = dict(lpips=False, pca=False, inception_path=os.path.join(d, "absent.pth"), device="cpu")
        results, said = _said(evaluate.main, evaluate.EvalConfig(tokenizer=tok_path, **ev))
        assert f"data {F} (from the tokenizer checkpoint): 3 val images of 3 classes" in said, said
        assert results["reconstruction"]["images"] == 3
        # a second data set into the same folders: one line each, naming the way out; nothing trained
        G = _class_folder(os.path.join(d, "G"), ["ant", "bee"])
        e = _said_error(train_tokenizer.main, dataclasses.replace(tok_cfg, data=G, max_steps=2))
        assert "another dataset" in e and G in e and "--fresh" in e and "--out-dir" in e, e
        assert model.read_checkpoint(os.path.join(tok_dir, "ckpt.pt"))["step"] == 1
        e = _said_error(train_ar.main, dataclasses.replace(ar_cfg, data=G, max_steps=3))
        assert "another dataset" in e and "--fresh" in e, e
        # the folder changed under the tokenizer: its classes are not the recorded ones
        os.rename(os.path.join(F, "zebra"), os.path.join(F, "yak"))
        e = _said_error(evaluate.main, evaluate.EvalConfig(tokenizer=tok_path, **ev))
        assert "yak" in e and "zebra" in e, e
        os.rename(os.path.join(F, "yak"), os.path.join(F, "zebra"))
        # the tokenizer trained again: the AR model's codes are another tokenizer's
        _said(train_tokenizer.main, dataclasses.replace(tok_cfg, fresh=True, seed=1))
        for run in (lambda: sample.main(sample.SampleConfig(ckpt=ar_path, device="cpu")),
                    lambda: evaluate.main(evaluate.EvalConfig(ckpt=ar_path, **ev))):
            e = _said_error(run)
            assert "is not the one whose codes" in e and "--fresh" in e, e


def test_sample_labels_are_whole_names_in_a_font_with_their_accents():
    from PIL import ImageFont, features
    font = sample.label_font()
    assert isinstance(font, ImageFont.FreeTypeFont) or not features.check("freetype2")
    name = "Grand Méliès tortoiseshell, Carassius auratus"
    text = sample.drawable(name, font)
    assert text in (name, "Grand Melies tortoiseshell, Carassius auratus")  # the accents, or plain letters
    lines = sample.label_lines(text, font, 80)
    assert " ".join(lines) == text and len(lines) > 1  # wrapped, not cut
    assert all(font.getlength(line) <= 80 for line in lines if " " in line)
    rows = [np.zeros((2, 16, 16, 3), np.uint8)] * 2
    grid = sample.labelled_grid(rows, ["0 " + name, "1 ant"])
    assert grid.size[0] > 2 * 16 + 80 and grid.size[1] >= 2 * 16


class _CountingServer:
    """A local HTTP server of a folder on 127.0.0.1 (a thread) that counts its GET requests; stops on exit."""
    def __init__(self, folder):
        import functools
        import http.server
        import threading
        counts = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                counts.append(self.path)
                return super().do_GET()

            def log_message(self, *args):  # quiet
                pass
        handler = functools.partial(Handler, directory=folder)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a free port
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def test_checkpoint_urls_download_once_into_the_hub_cache():
    old = os.environ.get("TORCH_HOME")
    with tempfile.TemporaryDirectory() as d:
        os.environ["TORCH_HOME"] = os.path.join(d, "torch-home")
        try:
            tok_path = _tiny_tokenizer_checkpoint(os.path.join(d, "served"))
            with _CountingServer(os.path.join(d, "served")) as server:
                url = f"{server.url}/tokenizer/ckpt.pt"
                with contextlib.redirect_stderr(io.StringIO()):
                    a = model.load_tokenizer(url)
                b = model.load_tokenizer(url)  # from the cache: the server is not asked again
                assert server.requests == ["/tokenizer/ckpt.pt"], server.requests
                local = model.checkpoint_file(url)
                assert local.startswith(os.path.join(d, "torch-home", "hub", "checkpoints", ""))
                assert local.endswith("-ckpt.pt")
                ref = model.load_tokenizer(tok_path)
                assert all(torch.equal(v, a.state_dict()[k]) and torch.equal(v, b.state_dict()[k])
                           for k, v in ref.state_dict().items())
                try:  # a 404: one line, which runtime.run prints as a user's error
                    model.read_checkpoint(f"{server.url}/absent.pt")
                    raise AssertionError("no error for an absent URL")
                except model.DownloadError as e:
                    assert "could not download" in str(e) and "absent.pt" in str(e) and "\n" not in str(e), e
        finally:
            if old is None:
                os.environ.pop("TORCH_HOME")
            else:
                os.environ["TORCH_HOME"] = old


def test_evaluate_reconstruct_puts_each_image_beside_its_reconstruction_with_its_psnr():
    from PIL import Image
    with tempfile.TemporaryDirectory() as d:
        tok_path = _tiny_tokenizer_checkpoint(d)  # 32x32 images
        g = torch.Generator().manual_seed(0)
        a, b = os.path.join(d, "a.jpg"), os.path.join(d, "b.png")
        Image.fromarray((torch.rand(48, 80, 3, generator=g) * 255).to(torch.uint8).numpy()).save(a)
        Image.fromarray((torch.rand(30, 30, 4, generator=g) * 255).to(torch.uint8).numpy(), "RGBA").save(b)
        argv = ["--tokenizer", tok_path, "--reconstruct", f"{a},{b}", "--out-dir", os.path.join(d, "out"),
                "--device", "cpu"]
        cfg = runtime.parse_config(evaluate.EvalConfig(), argv)
        assert cfg.reconstruct == (a, b)
        result, said = _said(evaluate.main, cfg)
        grid = np.asarray(Image.open(result["path"]))
        assert grid.shape == (2 * 32, 2 * 32, 3)  # a row per image: the original, its reconstruction
        tok = model.load_tokenizer(tok_path)
        for i, p in enumerate((a, b)):
            x = data.to_tensor(data.center_crop(data.open_rgb(p), 32))[None]
            with torch.no_grad():
                rec = tok.decode(tok.encode(x))
            assert np.array_equal(grid[32 * i:32 * (i + 1), :32], data.to_uint8(x)[0])
            assert np.array_equal(grid[32 * i:32 * (i + 1), 32:], data.to_uint8(rec)[0])
            v = data.psnr(data.pixel_values(rec), data.pixel_values(x))[0]
            assert f"{p}: PSNR {v:.2f} dB" in said and abs(result["reconstruct"][p] - v) < 1e-9, said
        absent = os.path.join(d, "absent.png")
        e = _said_error(evaluate.main, dataclasses.replace(cfg, reconstruct=(absent,)))
        assert "--reconstruct" in e and "absent.png" in e


def _torchrun_cli(n, *args, restarts=0):
    """The scripts' own command line under torchrun -> the CompletedProcess; a hanging run fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           f"--max-restarts={restarts}", *args]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # torchrun and its workers: none outlives the test
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _max_weight_diff(d, run_a, run_b):
    a, b = (model.read_checkpoint(os.path.join(d, run, "ckpt.pt"))["model"] for run in (run_a, run_b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_two_gloo_processes_equal_one_at_twice_the_batch_with_and_without_grad_accum():
    # The entropy loss averages over each process's micro-batch (a batch-dependent term): off here, as the
    # README says. On the 2D toy: in the 1D toy some gradient elements sit at rounding level, and AdamW turns
    # their reduction-order differences into lr-sized steps of either sign (see EXPERIMENTS.md)
    with tempfile.TemporaryDirectory() as d:
        common = ["--size", "toy-2d", "--max-steps", "3", "--eval-images", "2", "--threads", "1",
                  "--entropy-weight", "0", "--per-class", "2", "--image-interval", "1000",
                  "--log-interval", "1"]
        for name, n, extra in [("one", 1, ["--batch-size", "4"]), ("two", 2, ["--batch-size", "4"]),
                               ("one-8", 1, ["--batch-size", "8"]),
                               ("two-accum", 2, ["--batch-size", "8", "--grad-accum", "2"])]:
            p = _torchrun_cli(n, "train_tokenizer.py", "--out-dir", os.path.join(d, name), *extra, *common)
            assert p.returncode == 0, p.stderr[-2000:]
        diffs = _max_weight_diff(d, "one", "two"), _max_weight_diff(d, "one-8", "two-accum")
        print(f"max abs weight difference after 3 steps: 2 processes {diffs[0]:.2e}, "
              f"with --grad-accum 2 {diffs[1]:.2e}")
        assert max(diffs) < 1e-5, diffs


def _pids_running(text):
    """The processes whose command line contains text (Linux /proc)."""
    pids = []
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if p.isdigit() and text in f.read().decode(errors="replace") and int(p) != os.getpid():
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def test_torchrun_restarts_a_killed_worker_and_the_run_continues_from_its_checkpoint():
    import signal
    with tempfile.TemporaryDirectory() as d:
        common = ["--batch-size", "4", "--max-steps", "15", "--ckpt-interval", "5", "--eval-images", "2",
                  "--threads", "1", "--entropy-weight", "0", "--per-class", "2",
                  "--image-interval", "1000", "--log-interval", "1"]
        out = os.path.join(d, "restarted")
        # one worker: a restarted pair of gloo workers can time out connecting to each other on a loaded
        # machine
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "--max-restarts=1", "train_tokenizer.py", "--out-dir", out, *common]
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "ckpt.pt")) and time.time() < deadline:
            time.sleep(0.2)
        workers = [q for q in _pids_running(out) if q != p.pid and "torch.distributed.run" not in
                   open(f"/proc/{q}/cmdline", "rb").read().decode(errors="replace")]
        assert workers, "no worker to kill"
        os.kill(workers[-1], signal.SIGKILL)                                     # one worker dies mid-run
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
        assert "resuming from step" in log, log[-3000:]  # the restarted workers resumed
        p = _torchrun_cli(1, "train_tokenizer.py", "--out-dir", os.path.join(d, "straight"), *common)
        assert p.returncode == 0, p.stderr[-2000:]
        diff = _max_weight_diff(d, "straight", "restarted")
        print(f"restarted vs uninterrupted: max abs weight difference {diff:.2e}")
        assert diff < 1e-6, diff


# ---- bench.py ----

def test_bench_prints_a_row_for_every_measurement():
    import bench
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.main(bench.BenchConfig(batch_size=2, ar_batch_size=2, samples=1, steps=1, device="cpu"))
    rows = [l for l in buf.getvalue().splitlines() if "GFLOP" in l]
    # every row holds figures, not only timings
    assert len(rows) == 7 and all("/s" in r and "peak" in r for r in rows), buf.getvalue()
    # one plan for the tokenizer's step, one for the AR model's
    assert sum("memory plan per process" in l for l in buf.getvalue().splitlines()) == 2


def test_bench_counts_on_fake_tensors_the_flops_of_the_real_steps():
    # --count counts from the shapes alone (fake tensors); it must give what the same steps count on real
    # tensors
    import bench
    cfg = bench.BenchConfig(batch_size=2, ar_batch_size=2, count=True)
    tcfg = TOKENIZER_PRESETS["toy"]
    gcfg = dataclasses.replace(GPT_PRESETS["toy"], vocab_size=tcfg.codebook_size, block_size=tcfg.num_tokens)
    with contextlib.redirect_stdout(io.StringIO()):
        fake = bench.count_only(cfg, tcfg, gcfg, "fp32")
    torch.manual_seed(0)
    tok, disc, gpt = Tokenizer(tcfg), model.PatchDiscriminator(), GPT(gcfg)
    codes = torch.randint(gcfg.vocab_size, (2, gcfg.block_size))
    tokenizer_step, ar_step = bench.training_steps(tok, disc, gpt, torch.rand(2, 3, 64, 64) * 2 - 1, codes,
                                                   torch.randint(gcfg.num_classes, (2,)),
                                                   contextlib.nullcontext())
    real = [bench.flops(lambda: tokenizer_step(False)) / 2, bench.flops(lambda: tokenizer_step(True)) / 2,
            bench.flops(ar_step) / (2 * gcfg.block_size)]
    assert list(fake.values()) == real and real[0] > 1e9, (fake, real)  # toy: ~2.4 GFLOP an image


# ---- distributed: FSDP and activation checkpointing (runtime.wrap) ----

def _torchrun(script, nproc=2, env=(), **flags):
    """script's main ("train_tokenizer" or "train_ar", with the tests' tiny presets) under torchrun: nproc
    CPU processes over gloo, one thread each, on the cores this process may use; env: more environment
    variables."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", script] + [f"--{k}={v}" for k, v in flags.items()]
    p = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **dict(env)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = p.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # torchrun and its workers: none outlives the test
        raise
    assert p.returncode == 0, f"{' '.join(cmd)}\n{out[-5000:]}"


def _worker(script, argv):  # the other end of _torchrun
    _register_tiny_ar()
    # torch.compile with another backend (aot_eager: no C compiler)
    if os.environ.get("TEST_COMPILE_BACKEND"):
        import functools
        torch.compile = functools.partial(torch.compile, backend=os.environ["TEST_COMPILE_BACKEND"])
    # this process sees no checkpoint file (as on a node whose --out-dir is its own disk)
    if os.environ.get("TEST_BLIND_RANK") == os.environ["RANK"]:
        exists = os.path.exists
        os.path.exists = lambda path: not str(path).endswith("ckpt.pt") and exists(path)
    module, config = dict(train_tokenizer=(train_tokenizer, train_tokenizer.TrainConfig),
                          train_ar=(train_ar, train_ar.ARConfig))[script]
    module.main(runtime.parse_config(config(), argv))


def _max_diff(a, b):
    """The largest |a - b| over the tensors of two state dicts with the same names (and, for an optimizer's,
    the same parameter indices and state)."""
    if isinstance(a, dict) and "state" in a:  # an optimizer's: compare its moments
        assert a["param_groups"] == b["param_groups"] and sorted(a["state"]) == sorted(b["state"])
        return max(_max_diff(a["state"][i], b["state"][i]) for i in a["state"])
    assert list(a) == list(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _ckpt(folder):
    return torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)


# the toy tokenizer, 3 steps of 4 images, offline; a constant lr of 1e-4: at its first steps AdamW moves every
# weight by about lr whatever the gradient's size, so the rounding of tiny gradients (a sum over 4 images, or
# two over 2) shows in the weights at a fraction of lr; a larger lr makes one and two processes differ more
# (DDP exactly as FSDP; see EXPERIMENTS.md)
TOK_RUN = dict(size="toy", batch_size=4, max_steps=3, eval_images=2, per_class=2,
               entropy_weight=0.0, warmup=0, lr=1e-4, end_lr=1e-4, log_interval=1, image_interval=10 ** 6)


def _tok_in_process(out_dir, **kw):  # the same run in this process (one process, no torchrun)
    # one thread, as each torchrun worker: the rounding of a reduction depends on the thread count
    flags, threads = ({**TOK_RUN, **kw, "out_dir": out_dir, "device": "cpu", "threads": 1},
                      torch.get_num_threads())
    try:
        train_tokenizer.main(runtime.parse_config(train_tokenizer.TrainConfig(),
                                                  [f"--{k}={v}" for k, v in flags.items()]))
    finally:
        torch.set_num_threads(threads)
    return _ckpt(out_dir)


def test_fsdp_two_processes_equal_one():
    with tempfile.TemporaryDirectory() as d:
        # 65 held-out images: 33 = 32 + 1 on one process, 32 on the other, one batch more to run (a stand-in)
        # on the 2D toy, for the reason test_two_gloo_processes_equal_one_at_twice_the_batch... gives;
        # with a weight average (toy-2d has none of its own)
        run = dict(eval_images=65, size="toy-2d", ema=0.99)
        one = _tok_in_process(os.path.join(d, "one"), **run)
        _torchrun("train_tokenizer", **dict(TOK_RUN, **run), fsdp="true", out_dir=os.path.join(d, "fsdp"))
        fsdp = _ckpt(os.path.join(d, "fsdp"))
        diff = _max_diff(one["model"], fsdp["model"])
        # 2 processes x 2 images = 1 x 4, to fp32 rounding: convolutions over 2 or 4 images add in another
        # order (the CPU's kernels set how far; see EXPERIMENTS.md), against the ~3e-4 that 3 Adam steps at
        # lr 1e-4 move
        assert diff <= 5e-5, diff
        assert _max_diff(one["optimizer"], fsdp["optimizer"]) <= 1e-6  # one format: torch.optim's, by index
        assert _max_diff(one["ema"], fsdp["ema"]) <= 5e-5  # the average of the shards, gathered
        assert set(fsdp) == set(one) and fsdp["step"] == 3
        import json
        psnr = [json.loads(open(os.path.join(d, run, "log.jsonl")).readlines()[-1])["val_psnr"]
                for run in ("one", "fsdp")]
        assert abs(psnr[0] - psnr[1]) < 1e-3, psnr  # the same 65 images, each counted once
        model.load_tokenizer(os.path.join(d, "fsdp", "ckpt.pt"))  # the loader reads it as any of ours


def test_fsdp_with_a_weight_average_shown_every_step_equals_one_process():
    # FSDP2 keeps the root unit (codebook, quant convs, the CNN's middle, the heads) gathered after a forward
    # without gradients; the pictures and the held-out PSNR run with the average swapped in (EMA.applied), so
    # the root must be resharded on leaving it, or the next training step runs on the averaged root. The 2D
    # toy, as in test_fsdp_two_processes_equal_one; a fast average (0.5), so that the average is far from the
    # weights
    run = dict(TOK_RUN, size="toy-2d", max_steps=4, ema=0.5, image_interval=1, eval_images=8)
    with tempfile.TemporaryDirectory() as d:
        one = _tok_in_process(os.path.join(d, "one"), **run)
        _torchrun("train_tokenizer", **run, fsdp="true", out_dir=os.path.join(d, "fsdp"))
        fsdp = _ckpt(os.path.join(d, "fsdp"))
        for key in ("model", "ema"):
            diff = _max_diff(one[key], fsdp[key])
            assert diff <= 1e-5, (key, diff)
        psnr = [_last_log(os.path.join(d, run))["val_psnr"] for run in ("one", "fsdp")]
        assert abs(psnr[0] - psnr[1]) < 1e-3, psnr


def test_held_out_psnr_at_bf16_is_the_same_with_and_without_fsdp():
    # The held-out PSNR and the pictures run under the training's autocast in every mode; the code choice in
    # float32 (FSDP's bf16 policy gathers every unit but the quantizer's in bf16). The bug this guards: pure
    # bf16 under FSDP (a bf16 codebook), float32 without. The initial weights (max_steps 0), so that only the
    # evaluation can differ
    _needs(native_bf16=True)
    run = dict(TOK_RUN, size="toy-2d", max_steps=0, precision="bf16", eval_images=16)
    with tempfile.TemporaryDirectory() as d:
        _tok_in_process(os.path.join(d, "one"), **run)
        _torchrun("train_tokenizer", **run, fsdp="true", out_dir=os.path.join(d, "fsdp"))
        psnr = [_last_log(os.path.join(d, run))["val_psnr"] for run in ("one", "fsdp")]
        assert abs(psnr[0] - psnr[1]) < 1e-3, psnr


def _last_log(folder):
    import json
    with open(os.path.join(folder, "log.jsonl")) as f:
        return json.loads(f.readlines()[-1])


def test_fsdp_start_up_is_the_plain_init_exactly():
    # under FSDP only rank 0 builds the model in memory, the other process on the meta device; rank 0 hands
    # out its weights one tensor at a time (runtime.build, fill_from_rank0): the init is the plain run's, to
    # the bit
    with tempfile.TemporaryDirectory() as d:
        one = _tok_in_process(os.path.join(d, "one"), max_steps=0)
        _torchrun("train_tokenizer", **dict(TOK_RUN, max_steps=0), fsdp="true",
                  out_dir=os.path.join(d, "fsdp"))
        fsdp = _ckpt(os.path.join(d, "fsdp"))
        for key in ("model", "discriminator"):
            assert list(one[key]) == list(fsdp[key]) and all(torch.equal(one[key][k], fsdp[key][k])
                                                             for k in one[key])


def test_fsdp_with_the_discriminator_equals_ddp():
    # The PatchGAN's BatchNorm normalizes over each process's own images (2 of them, not all 4, as in the
    # official DDP trainer, tokenizer/tokenizer_image/vq/vq_train.py), so against one process its outputs, and
    # through the GAN term the tokenizer, differ by design; FSDP against DDP at the same world size sees the
    # same statistics and must agree. On the 2D toy, for the reason
    # test_two_gloo_processes_equal_one_at_twice_the_batch... gives (in the 1D toy AdamW flips the sign of
    # rounding-level gradient elements after the first step)
    run = dict(TOK_RUN, size="toy-2d", disc_start=0)
    with tempfile.TemporaryDirectory() as d:
        _torchrun("train_tokenizer", **run, fsdp="true", out_dir=os.path.join(d, "fsdp"))
        _torchrun("train_tokenizer", **run, out_dir=os.path.join(d, "ddp"))
        fsdp, ddp = _ckpt(os.path.join(d, "fsdp")), _ckpt(os.path.join(d, "ddp"))
        for key in ("model", "discriminator", "optimizer", "optimizer_disc"):
            diff = _max_diff(fsdp[key], ddp[key])
            assert diff <= 1e-5, (key, diff)
        # the discriminator trained
        assert any(not torch.equal(v, _ckpt_init_disc("toy-2d")[k]) for k, v in fsdp["discriminator"].items()
                   if v.is_floating_point())


def _ckpt_init_disc(size="toy"):  # the discriminator as build_models creates it (seed 0, after the tokenizer)
    torch.manual_seed(0)
    Tokenizer(TOKENIZER_PRESETS[size])
    return model.PatchDiscriminator().state_dict()


def test_fsdp_resume_is_exact_with_or_without_checkpointing_and_resumes_in_one_process():
    with tempfile.TemporaryDirectory() as d:
        run = lambda folder, steps, **kw: _torchrun(
            "train_tokenizer", **dict(TOK_RUN, max_steps=steps, fsdp="true",
                                      out_dir=os.path.join(d, folder), **kw))
        run("straight", 4, checkpointing="true")  # activations recomputed in the backward: the same numbers
        run("resumed", 2)
        import shutil
        shutil.copytree(os.path.join(d, "resumed"), os.path.join(d, "alone"))  # the 2-step sharded checkpoint
        run("resumed", 4)  # continues at step 3
        straight, resumed = _ckpt(os.path.join(d, "straight")), _ckpt(os.path.join(d, "resumed"))
        for key in ("model", "optimizer", "ema"):  # resumed = uninterrupted, checkpointing = not, exactly
            assert _max_diff(straight[key], resumed[key]) == 0, key
        alone = _tok_in_process(os.path.join(d, "alone"), max_steps=4)  # a sharded checkpoint, one process
        diff = _max_diff(straight["model"], alone["model"])
        assert alone["step"] == 4 and diff <= 1e-5, diff


def test_the_resume_decision_is_rank_0s():
    # every process continues from the checkpoint when rank 0 sees it, even one that does not see the file
    # (here rank 1: os.path.exists says no); otherwise rank 0 would resume alone and the processes would run
    # different steps
    with tempfile.TemporaryDirectory() as d:
        run = lambda folder, steps, **kw: _torchrun(
            "train_tokenizer", **dict(TOK_RUN, max_steps=steps, fsdp="true",
                                      out_dir=os.path.join(d, folder)), **kw)
        run("straight", 3)
        run("resumed", 2)
        run("resumed", 3, env=dict(TEST_BLIND_RANK="1"))
        straight, resumed = _ckpt(os.path.join(d, "straight")), _ckpt(os.path.join(d, "resumed"))
        assert resumed["step"] == 3 and all(_max_diff(straight[k], resumed[k]) == 0
                                            for k in ("model", "optimizer"))


def test_compile_with_fsdp_and_with_ddp_equals_eager():
    # FSDP: each block's forward compiled before fully_shard (FSDP's hooks outside the graphs); DDP: the DDP
    # module compiled (graphs split at its buckets). aot_eager traces forward and backward as inductor does,
    # but runs torch's own kernels: no C compiler needed, and the same numbers as eager up to the order of a
    # few sums
    run = dict(TOK_RUN, size="toy-2d", max_steps=2, checkpointing="true")
    with tempfile.TemporaryDirectory() as d:
        for mode in ("fsdp", "ddp"):
            for compiled in (False, True):
                _torchrun("train_tokenizer", **run, fsdp=str(mode == "fsdp").lower(),
                          compile=str(compiled).lower(), out_dir=os.path.join(d, f"{mode}-{compiled}"),
                          env=dict(TEST_COMPILE_BACKEND="aot_eager"))
            eager, compiled = _ckpt(os.path.join(d, f"{mode}-False")), _ckpt(os.path.join(d, f"{mode}-True"))
            diff = _max_diff(eager["model"], compiled["model"])
            assert compiled["step"] == 2 and diff <= 1e-6, (mode, diff)


def test_fsdp_ar_two_processes_with_accumulation_equal_one():
    _register_tiny_ar()
    with tempfile.TemporaryDirectory() as d:
        tok_path, code_dir = _tiny_code_cache(d)
        flags = dict(tokenizer=tok_path, code_dir=code_dir, gpt="test-exact", per_class=0, batch_size=12,
                     max_steps=3, warmup=0, lr=1e-4, eval_interval=1000, log_interval=1000)
        train_ar.main(train_ar.ARConfig(**flags, out_dir=os.path.join(d, "one")))
        # and two micro-steps of 3 sequences each: the gradients are reduce-scattered after the second only;
        # the 8 held-out sequences make 2 batches of 3 for one process, 1 for the other (which must run a
        # stand-in)
        _torchrun("train_ar", **flags, fsdp="true", checkpointing="true", grad_accum=2,
                  out_dir=os.path.join(d, "fsdp"))
        one, fsdp = _ckpt(os.path.join(d, "one")), _ckpt(os.path.join(d, "fsdp"))
        diff = _max_diff(one["model"], fsdp["model"])
        assert diff <= 1e-5 and _max_diff(one["optimizer"], fsdp["optimizer"]) <= 1e-6, diff
        model.load_gpt(os.path.join(d, "fsdp", "ckpt.pt"))


def _grads(net, loss_of, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for both passes
    net.zero_grad(set_to_none=True)
    loss_of(net).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _saved_bytes(net, loss_of):
    """Bytes of the tensors autograd keeps for the backward of one forward (those kept inside a checkpointed
    block are the checkpoint's business and do not pass through this hook)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(net)
    return total[0]


def test_activation_checkpointing_same_gradients_and_state_dict_names():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes, labels = torch.randint(0, 64, (2, 16)), torch.tensor([1, 2])
    # a 1D and a 2D tokenizer (official init: every branch live), and a GPT with dropout on
    torch.manual_seed(0)
    nets = [(Tokenizer(toy_cfg(image_size=32, num_latent_tokens=16, codebook_size=64, teacher_dim=16,
                               dropout=0.1)),
             lambda t: (lambda r, a: F.mse_loss(r, x) + a["codebook"]
                        + a["sem_feat"].square().mean())(*t(x))),
            (Tokenizer(toy_cfg(image_size=32, kind="2d", layer_type="vit", codebook_size=64, teacher_dim=0)),
             lambda t: F.mse_loss(t(x)[0], x)),
            (GPT(dataclasses.replace(GPT_PRESETS["toy"], n_layer=2, dim=64, vocab_size=64, block_size=16,
                                     num_classes=4, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1)),
             lambda g: F.cross_entropy(g(codes, labels).flatten(0, 1), codes.flatten()))]
    for net, loss_of in nets:
        names, kept = list(net.state_dict()), _saved_bytes(net, loss_of)
        plain = _grads(net, loss_of)
        runtime.checkpoint_blocks(net)
        assert list(net.state_dict()) == names  # a checkpoint made with it loads without it
        assert _saved_bytes(net, loss_of) < 0.7 * kept  # the blocks' insides are not kept
        again = _grads(net, loss_of)
        assert plain.keys() == again.keys() and len(plain) > 10
        diff = max((plain[k] - again[k]).abs().max().item() for k in plain)
        assert diff <= 1e-6, diff


# ---- the memory plan (runtime.memory_plan) and the bounded start-up ----

_MEASURE = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import model, runtime, train_tokenizer
torch.manual_seed(0); torch.set_num_threads(1)
micro, checkpointing = int(sys.argv[2]), sys.argv[3] == "1"
tok, disc, lpips = (model.Tokenizer(model.TOKENIZER_PRESETS["toy"]), model.PatchDiscriminator(),
                    model.LPIPS().train())
if checkpointing:
    runtime.checkpoint_blocks(tok)
x = torch.rand(micro, 3, 64, 64) * 2 - 1
step = lambda: sum(train_tokenizer.loss_terms(tok, x, None, lpips, disc, True, True, True)[0].values())
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
step().backward()  # the gradients exist from here on (zeroed, kept), as in a training loop
for m in (tok, disc, lpips):
    m.zero_grad(set_to_none=False)
before = rss()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) from here
step().backward()
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(peak - before)
"""


def _plan_numbers(line):
    """{what: bytes} of a plan's printed line (runtime.describe_plan), with "total"."""
    head, body = line.split("): ", 1)
    unit = 2 ** 30 if head.endswith("GiB") else 2 ** 20
    # "name (detail) 1.23" items, separated by ", " and ended by "," or ";"
    n = {k: float(v) * unit
         for k, v in re.findall(r"(?:^|, )([A-Za-z][\w .]*?(?: \([^)]*\))?) ([\d.]+)(?=[,;])", body)}
    n["total"] = float(re.search(r"; total ([\d.]+)", body).group(1)) * unit
    return n


def test_memory_plan_activations_match_a_measured_cpu_peak():
    # the plan's activations (counted on fake tensors) against the peak memory of a real forward and backward
    # on this CPU, measured by the kernel (VmHWM) in a fresh process whose allocator returns freed memory at
    # once;
    # toy, 8 images, the GAN and the shortcut on, with and without activation checkpointing
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    for checkpointing in (False, True):
        measured = int(subprocess.run([sys.executable, "-c", _MEASURE, REPO, "8",
                                       str(int(checkpointing))], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
        cfg = train_tokenizer.validate(train_tokenizer.resolve(train_tokenizer.TrainConfig(
            batch_size=8, disc_start=0, aux_loss_end=10, checkpointing=checkpointing, perceptual_weight=1.0)))
        line = train_tokenizer.memory_plan(cfg, 1, "fp32", with_teacher=False)
        planned = [v for k, v in _plan_numbers(line).items() if k.startswith("activations")][0]
        assert 0.8 <= planned / measured <= 1.25, (checkpointing, planned / 2 ** 20, measured / 2 ** 20)


def test_plan_flag_prints_the_xl_xxl_plan_without_building_it():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train_tokenizer.main(train_tokenizer.TrainConfig(size="xl-xxl", fsdp=True,
                                                                  checkpointing=True, batch_size=128,
                                                                  plan=True, plan_world=8))
    assert result == dict(plan=True)  # returned before any process group, dataset or model
    line = out.getvalue().strip()
    assert "FSDP over 8, bf16" in line, line
    n = _plan_numbers(line)
    gib = 2 ** 30 / 100  # the printed figures are rounded to 0.01 GiB
    assert abs(n["parameters (fp32)"] - 4 * 2893.97e6 / 8) <= gib  # 1/8 of the fp32 weights
    assert abs(n["AdamW moments (fp32)"] - 2 * n["parameters (fp32)"]) <= 2 * gib
    # the goal: 16 images per GPU in at most 60 GB, with FSDP over 8 and checkpointing
    assert n["total"] <= 60e9 and n["activations (16 per micro-batch, checkpointed)"] > 2 ** 30, line


def test_ar_plan_checkpointing_keeps_less_and_ddp_keeps_everything_whole():
    _register_tiny_ar()
    plan = lambda **kw: _plan_numbers(train_ar.memory_plan(
        train_ar.resolve(train_ar.ARConfig(gpt="gpt-b", batch_size=16, **kw)),
        dataclasses.replace(model.GPT_PRESETS["gpt-b"], vocab_size=16384, block_size=256), 2, "bf16"))
    ddp, ddp_ck, fsdp = plan(), plan(checkpointing=True), plan(fsdp=True)
    act = lambda n: [v for k, v in n.items() if k.startswith("activations")][0]
    assert act(ddp_ck) < act(ddp) / 3 and act(fsdp) == act(ddp)      # per process: the same 8 sequences
    assert abs(ddp["parameters (fp32)"] - 2 * fsdp["parameters (fp32)"]) <= 2 ** 30 / 50  # over 2 (rounding)
    assert "bf16 weight copies (autocast)" in ddp and "gathered weights (FSDP)" in fsdp


def test_code_cache_written_by_two_processes_or_with_loading_workers_equals_one():
    # each process encodes a contiguous block of the images into its own part files (processes on different
    # nodes never write into the same file pages), rank 0 joins them: the same files as one process writes,
    # no parts left; and one process whose images two loading workers read writes the same files too
    _register_tiny_ar()
    with tempfile.TemporaryDirectory() as d:
        tok_path = _tiny_tokenizer_checkpoint(d)
        flags = dict(tokenizer=tok_path, gpt="test-exact", num_classes=2, per_class=3, max_steps=0)
        train_ar.main(train_ar.ARConfig(**flags, code_dir=os.path.join(d, "one"),
                                        out_dir=os.path.join(d, "ar1")))
        _torchrun("train_ar", **flags, code_dir=os.path.join(d, "two"), out_dir=os.path.join(d, "ar2"))
        train_ar.main(train_ar.ARConfig(**flags, num_workers=2, code_dir=os.path.join(d, "workers"),
                                        out_dir=os.path.join(d, "ar3")))
        for split in ("train", "val"):
            for name in ("codes.npy", "labels.npy"):
                a, b, c = (np.load(os.path.join(d, w, split, name)) for w in ("one", "two", "workers"))
                assert (a.dtype == b.dtype == c.dtype and np.array_equal(a, b)
                        and np.array_equal(a, c)), (split, name)
            assert sorted(os.listdir(os.path.join(d, "two", split))) == ["codes.npy", "labels.npy",
                                                                        "meta.json"]


# ---- the GPU check: with CUDA, `python test_all.py` runs these too (skipped and counted elsewhere) ----

def _on_cuda(main, config, flags):
    """main(config from flags) on CUDA, its stdout captured -> (result, printed text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = main(runtime.parse_config(
            config, [f"--{k}={v}" for k, v in {**flags, "device": "cuda"}.items()]))
    return result, buf.getvalue()


def test_cuda_tokenizer_and_gpt_steps_at_bf16_with_fused_adamw():
    _needs(cuda_devices=1)
    _register_tiny_ar()
    with tempfile.TemporaryDirectory() as d:
        # --precision auto
        result, out = _on_cuda(train_tokenizer.main, train_tokenizer.TrainConfig(),
                               dict(TOK_RUN, eval_images=16, out_dir=os.path.join(d, "tok")))
        assert "device cuda" in out and ", bf16" in out and "measured after the first step" in out, out
        assert result["step"] == 3 and math.isfinite(result["val_psnr"]) and result["val_psnr"] > 5, result
        tok_path, code_dir = _tiny_code_cache(d)
        result, out = _on_cuda(train_ar.main, train_ar.ARConfig(), dict(
            tokenizer=tok_path, code_dir=code_dir, gpt="test-tiny", out_dir=os.path.join(d, "ar"),
            batch_size=16, max_steps=20, warmup=2, lr=3e-3, eval_interval=1000, log_interval=1000,
            ckpt_interval=1000))
        assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(64), result
    opt = runtime.adamw(torch.nn.Linear(2, 2).cuda().parameters(), train_tokenizer.TrainConfig(lr=1e-4),
                        torch.device("cuda"), "bf16")[0]
    assert opt.defaults["fused"]                                       # one kernel for all tensors on CUDA


def test_cuda_code_choice_is_float32_with_tf32_and_a_bf16_autocast():
    _needs(cuda_devices=1)
    _code_choice_at_low_precision("cuda")


def test_cuda_fsdp_and_ddp_over_nccl_agree():
    _needs(cuda_devices=2)
    run = dict(TOK_RUN, size="toy-2d", precision="fp32", device="cuda")  # fp32 (TF32 on, as the trainers run)
    with tempfile.TemporaryDirectory() as d:
        for mode in ("fsdp", "ddp"):
            _torchrun("train_tokenizer", **run, fsdp=str(mode == "fsdp").lower(),
                      out_dir=os.path.join(d, mode))
        fsdp, ddp = _ckpt(os.path.join(d, "fsdp")), _ckpt(os.path.join(d, "ddp"))
        assert fsdp["step"] == ddp["step"] == 3
        diff = _max_diff(fsdp["model"], ddp["model"])
        assert diff <= 1e-4, diff                                      # TF32 rounding, against lr 1e-4 steps


def test_cuda_sampling_is_seeded_and_the_cache_changes_nothing():
    _needs(cuda_devices=1)
    gpt, labels = _tiny_gpt().cuda(), torch.tensor([0, 1, 2, 4], device="cuda")
    draw = lambda **kw: sample.generate(gpt, labels, cfg_scale=2.0, top_k=8, generator=torch.Generator("cuda")
                                        .manual_seed(7), **kw)
    a, b = draw(), draw()
    assert (a.shape == (4, 12) and a.device.type == "cuda" and torch.equal(a, b)
            and 0 <= a.min() <= a.max() < 40)
    assert torch.equal(draw(temperature=0), draw(temperature=0, kv_cache=False))  # fp32: greedy is exact


def test_cuda_memory_plan_against_the_measured_peak_of_one_step():
    # S-S (136M parameters) at 8 images: the plan's total against the allocator's peak after the first step
    _needs(cuda_devices=1)
    with tempfile.TemporaryDirectory() as d:
        _, out = _on_cuda(train_tokenizer.main, train_tokenizer.TrainConfig(), dict(
            size="s-s", data="synthetic", batch_size=8, max_steps=1, semantic_weight=0, perceptual_weight=0,
            eval_images=2, image_interval=10 ** 6, out_dir=d))
    planned = float(re.search(r"; total ([\d.]+) GiB", out).group(1))
    measured = float(re.search(r"measured after the first step: peak ([\d.]+) GiB", out).group(1))
    print(f"plan {planned:.2f} GiB, measured peak {measured:.2f} GiB")
    assert 0.7 <= measured / planned <= 1.4, (planned, measured)


def test_cuda_bench_prints_the_mfu():
    _needs(cuda_devices=1)
    import bench
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench.main(bench.BenchConfig(device="cuda", precision="bf16", peak_tflops=989.0, steps=2,
                                     batch_size=4, ar_batch_size=4, samples=2))
    assert "MFU" in buf.getvalue(), buf.getvalue()


def test_the_runner_counts_skipped_tests_in_its_closing_line():
    # with no CUDA device every CUDA test is skipped, and counted: "N passed, M failed, K skipped"
    count, buf = torch.cuda.device_count, io.StringIO()
    torch.cuda.device_count = lambda: 0
    try:
        with contextlib.redirect_stdout(buf):
            _run("test_cuda_")
    finally:
        torch.cuda.device_count = count
    cuda_tests = [n for n in globals() if n.startswith("test_cuda_")]
    assert buf.getvalue().splitlines()[-1] == f"0 passed, 0 failed, {len(cuda_tests)} skipped", buf.getvalue()


# ---- the words: README.md and EXPERIMENTS.md name real flags; the code cites what a reader can open ----

def test_every_flag_in_the_readme_and_experiments_exists_in_its_script():
    import bench
    configs = dict(train_tokenizer=train_tokenizer.TrainConfig, train_ar=train_ar.ARConfig,
                   sample=sample.SampleConfig, evaluate=evaluate.EvalConfig, bench=bench.BenchConfig)
    flags = {s: {"--" + f.name.replace("_", "-") for f in dataclasses.fields(c)} | {"--help"}
             for s, c in configs.items()}
    # torchrun's flags, written before the script's name, and pip's and docker's
    launcher = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv-backend",
                "--rdzv-endpoint", "--index-url", "--shm-size", "--ipc"}
    known = set().union(*flags.values(), launcher)
    checked = 0
    for doc in ("README.md", "EXPERIMENTS.md"):
        with open(os.path.join(REPO, doc)) as f:
            text = f.read().replace("\\\n", " ")  # a command continued on the next line is one command
        for line in text.splitlines():
            # a command ends at a backtick (inline code), a shell separator or a comment
            for part in re.split(r"`|&&|;|\|(?=\s)|\s#", line):
                script = re.search(r"\b(\w+)\.py\b(.*)", part)
                words = re.findall(r"(?<![\w-])--[a-z][\w-]*", script.group(2) if script else part)
                for flag in words:
                    name = script.group(1) if script and script.group(1) in flags else None
                    assert flag in (flags[name] if name else known), \
                        f"{doc}: {flag} is no flag of {name or 'any script'}: {line.strip()}"
                    checked += 1
    assert checked > 50, checked  # the check read the commands


def _project_files():
    return sorted(f for f in os.listdir(REPO) if f.endswith((".py", ".md", ".txt"))) + [".ci/run"]


def test_no_python_line_over_110_characters_and_no_reference_a_reader_cannot_open():
    # pytorch-fid's weights file carries TensorFlow's graph date in its name: a name, not a date of ours
    allowed = "pt_inception-2015-12-05-6726825d.pth"
    unopenable = re.compile(r"spec [0-9]|[Ii]ssue [0-9]|20[0-9][0-9]-[0-9][0-9]-[0-9][0-9]|shared/[n]otes")
    for name in _project_files():
        with open(os.path.join(REPO, name)) as f:
            for i, line in enumerate(f, 1):
                assert not unopenable.search(line.replace(allowed, "")), f"{name}:{i}: {line.strip()}"
                if name.endswith(".py"):
                    assert len(line.rstrip("\n")) <= 110, f"{name}:{i} is {len(line.rstrip())} characters"


# ------------------------------------------------------------------------------------------------
# the runner

def _run(pattern=""):
    import traceback
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f) and pattern in n]
    passed = failed = skipped = 0
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f"ok    {name} ({time.time() - t0:.1f}s)", flush=True)
        except unittest.SkipTest as e:  # a test for a device this machine lacks (see _needs)
            skipped += 1
            print(f"skip  {name}: {e}", flush=True)
        # SystemExit too: a runtime.UserError that escapes fails its test, not the run
        except (Exception, SystemExit):
            failed += 1
            print(f"FAIL  {name} ({time.time() - t0:.1f}s)", flush=True)
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return failed


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a process of a distributed test (see _torchrun)
        _worker(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(1 if _run(sys.argv[1] if len(sys.argv) > 1 else "") else 0)
