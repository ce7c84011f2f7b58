"""
Class-conditional image generation: the AR model writes codes token by token, the tokenizer paints them.

    # toy: a labelled grid, one row per class -> out/ar-toy/samples.png
    python sample.py
    python sample.py --ckpt out/ar-gpt-b/ckpt.pt --cfg-scale 1.75 --cfg-schedule step \
        --classes 207,360,387,974
    # PNGs + an .npz for FID (evaluate.py)
    torchrun --nproc_per_node=8 sample.py --ckpt ... --num-samples 50000

Classifier-free guidance as the official autoregressive/models/generate.py: the batch is doubled with the
null class and logits = uncond + s * (cond - uncond). The "step" schedule keeps s = 1 until a fraction
step_start of the codes is written, except the first code, which always gets the full scale (the official
prefill ignores the schedule).
"""
import dataclasses
import math
import os
import re
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import model
import runtime
from data import image_grid, to_uint8
from train_ar import check_tokenizer


@dataclass
class SampleConfig:
    ckpt: str = "out/ar-toy/ckpt.pt"  # AR checkpoint or URL (ours from train_ar.py, or an official GigaTok
                                      # gpt_1d one)
    tokenizer: str = ""               # tokenizer checkpoint or URL; "" = the one the AR model was trained on
    cfg_scale: float = -1.0           # guidance scale s (1 = none); -1 = the AR model's (train_ar.py: toy 3,
                                      # else 4)
    cfg_schedule: str = "constant"    # "constant" or "step" (official gFID setting: step, start 0.18, s 1.75)
    step_start: float = 0.18          # step schedule: fraction of the codes written before s applies
    temperature: float = 1.0          # 0 = greedy (argmax)
    top_k: int = 0                    # 0 = off (official default)
    top_p: float = 1.0                # 1 = off (official default)
    seed: int = 0
    kv_cache: bool = True             # False: recompute the whole prefix at every step (slow; for testing)
    classes: str = ""                 # grid rows, comma-separated class ids; "" = up to 10 evenly spaced
    per_class: int = 8                # grid columns
    num_samples: int = 0              # > 0: write this many images (classes uniformly at random) + an .npz
    batch_size: int = 32              # images generated at once (per process)
    out: str = ""                     # grid PNG path, or folder for num_samples; "" = beside the checkpoint
    precision: str = "auto"           # the AR model's: "auto" (bf16 on CUDA, fp32 elsewhere), bf16, fp16,
                                      # fp32 (bf16 on a CPU: AVX-512 BF16 or AMX only); the tokenizer decodes
                                      # in fp32
    device: str = ""                  # "" = cuda, else mps, else cpu
    threads: int = 0                  # torch CPU threads (0 = torch's default)


# -----------------------------------------------------------------------------------------------------------
# Generation

def guidance_scale(i, n, scale, schedule, step_start):
    """Scale for code i of n. Official step schedule: ratio = i / (n - 1); the first code gets the full
    scale."""
    if schedule == "constant" or i == 0:
        return scale
    assert schedule == "step", f"unknown cfg_schedule {schedule!r}; known: constant, step"
    return scale if i / (n - 1) >= step_start else 1.0  # no guidance for the first step_start of the codes


def guide(logits, scale):
    """(2B, V) logits of [conditional; null class] -> (B, V) guided logits uncond + s * (cond - uncond)."""
    cond, uncond = logits.chunk(2)  # (B, V) each
    return uncond + scale * (cond - uncond)


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) codes: temperature, then top-k, then top-p (nucleus) filtering, then a draw."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        # (B, 1) the k-th largest logit
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:  # keep the smallest set of most likely codes whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p                 # the mass before this code already exceeds top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(gpt, labels, cfg_scale=1.0, cfg_schedule="constant", step_start=0.18, temperature=1.0, top_k=0,
             top_p=1.0, generator=None, kv_cache=True):
    """labels (B,) -> codes (B, N), one code at a time. With guidance (cfg_scale != 1) every step runs a
    doubled batch [labels; null class]. kv_cache=False recomputes the whole prefix each step: same codes,
    slower."""
    assert not gpt.training, "generate needs gpt.eval() (train mode drops labels and applies dropout)"
    B, N = len(labels), gpt.cfg.block_size
    guided = cfg_scale != 1.0
    # (2B,) [labels; null]
    cond = torch.cat([labels, torch.full_like(labels, gpt.cfg.num_classes)]) if guided else labels
    codes = labels.new_zeros(B, N)  # (B, N), filled left to right
    if kv_cache:
        # the cache in the compute dtype: bf16 under bf16 autocast (half the bytes)
        device = labels.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # positions [class token, codes 0 .. N-2]
        gpt.setup_cache(len(cond), N, dtype=dtype, device=labels.device)
    try:
        for i in range(N):
            if kv_cache and i == 0:
                logits = gpt.forward_cached(None, cond, 0)                    # (2B, 1, V): the class token
            elif kv_cache:
                prev = codes[:, i - 1:i]
                # the same code for both halves
                logits = gpt.forward_cached(torch.cat([prev, prev]) if guided else prev, None, i)
            else:
                # forward() reads codes[:, :i] and predicts code i at its last position;
                # the last column is a dummy
                x = codes[:, :i + 1]
                logits = gpt(torch.cat([x, x]) if guided else x, cond)
            logits = logits[:, -1].float()  # (2B or B, V): the next code's logits
            if guided:
                logits = guide(logits, guidance_scale(i, N, cfg_scale, cfg_schedule, step_start))
            codes[:, i] = sample_logits(logits, temperature, top_k, top_p, generator)  # (B,)
    finally:
        if kv_cache:
            gpt.clear_cache()
    return codes


# -----------------------------------------------------------------------------------------------------------
# Images

def label_font(size=12):
    """A TrueType font for the labels: a system one with accented letters (DejaVu on Linux, Arial on macOS and
    Windows), else Pillow's built-in one (TrueType with FreeType, a bitmap without; ASCII only either way)."""
    for name in ("DejaVuSans.ttf", "Arial.ttf", "arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:  # not installed here
            continue
    return ImageFont.load_default(size=size)


def drawable(text, font):
    """text with each character that the font has no glyph for (it would draw a box) replaced by its letters
    without accents (e -> e for an e acute), or by "?" when it has none (a font without CJK, say)."""
    glyph = lambda c: np.asarray(font.getmask(c)).tobytes()
    box = glyph("\U0010fffd")  # what the font draws for a character it lacks
    has = lambda c: c.isspace() or glyph(c) != box
    plain = lambda c: "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
    return "".join(c if has(c) else plain(c) if plain(c) and all(map(has, plain(c))) else "?" for c in text)


def label_lines(name, font, width):
    """The name in lines of at most `width` pixels, broken between words (a longer word: a line alone)"""
    words, lines = name.split(), []
    for w in words:
        if lines and font.getlength(lines[-1] + " " + w) <= width:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines or [""]


def labelled_grid(rows, names, max_label_width=200):
    """rows: list of (per_class, H, W, 3) uint8 arrays, one per class -> PIL image with the class names at
    left, whole: the margin is as wide as the longest name (at most max_label_width pixels), longer ones
    wrap."""
    n, H, W, _ = rows[0].shape
    font = label_font()
    names = [drawable(name, font) for name in names]
    width = min(max_label_width, int(max(font.getlength(name) for name in names)) + 1)
    lines = [label_lines(name, font, width) for name in names]
    width = max(width, *(int(font.getlength(line)) + 1 for ls in lines for line in ls))  # a long word: wider
    step = font.size + 2  # line spacing in pixels
    height = max(H, *(len(ls) * step + 4 for ls in lines))  # a row as tall as its image or its label
    grid = Image.new("RGB", (width + 8 + n * W, len(rows) * height), "white")  # a white margin for the names
    draw = ImageDraw.Draw(grid)
    for r, (row, ls) in enumerate(zip(rows, lines)):
        grid.paste(Image.fromarray(image_grid([row])), (width + 8, r * height))
        top = r * height + (H - len(ls) * step) // 2 if len(ls) * step < H else r * height + 2
        for k, line in enumerate(ls):
            draw.text((4, top + k * step), line, fill="black", font=font)
    return grid


def validate(cfg):
    """Every sampling field in its range, before anything is loaded (the flag, its value and what is
    valid)."""
    runtime.check(cfg, [
        (cfg.cfg_scale == -1 or cfg.cfg_scale >= 0, "cfg_scale",
         "0 or more (1 = no guidance), or -1 for the model's"),
        (cfg.cfg_schedule in ("constant", "step"), "cfg_schedule", "constant or step"),
        (0 <= cfg.step_start <= 1, "step_start", "in [0, 1]"),
        (cfg.temperature >= 0, "temperature", "0 (greedy) or more"),
        (cfg.top_k >= 0, "top_k", "0 (off) or more"), (0 < cfg.top_p <= 1, "top_p", "in (0, 1] (1 = off)"),
        (cfg.per_class >= 1, "per_class", "1 or more"),
        (cfg.num_samples >= 0, "num_samples", "0 (a grid) or more"),
        (cfg.batch_size >= 1, "batch_size", "1 or more"), (cfg.threads >= 0, "threads", "0 or more"),
        (re.fullmatch(r"(\d+(,\d+)*)?", cfg.classes) is not None, "classes",
         "comma-separated class ids, e.g. 0,3,7")])


def grid_classes(cfg, num_classes):
    """The grid's rows: --classes, each checked against the model's classes, or up to 10 evenly spaced
    ones."""
    if not cfg.classes:  # the default grid: up to 10 rows, spread over the classes
        return sorted({round(i * (num_classes - 1) / max(1, min(10, num_classes) - 1))
                       for i in range(min(10, num_classes))})
    # ids the model knows
    runtime.check(cfg, [(all(int(c) < num_classes for c in cfg.classes.split(",")), "classes",
                         f"class ids from 0 to {num_classes - 1} (this model has {num_classes} classes)")])
    return [int(c) for c in cfg.classes.split(",")]


def load_models(cfg, device):
    """-> (the AR model, the tokenizer it was trained on, class names, cfg with the model's guidance scale)"""
    if not (os.path.exists(cfg.ckpt) or model.is_url(cfg.ckpt)):
        raise runtime.UserError(f"no AR checkpoint at {cfg.ckpt}: train one first "
                                f"(`python train_tokenizer.py && python train_ar.py` for the toy), or pass "
                                f"--ckpt <ours or an official GigaTok GPT checkpoint>")
    ckpt = model.read_checkpoint(cfg.ckpt)          # ours or an official one (the loader reads both)
    ours = ckpt.get("config") or {}
    # how train_ar.py made it (empty for an official checkpoint)
    trained = ours.get("train", {})
    gpt = model.load_gpt(ckpt, device=device)        # eval mode
    if cfg.cfg_scale == -1:                          # official checkpoints: the official 4.0
        cfg = dataclasses.replace(cfg, cfg_scale=trained.get("cfg_scale", 4.0))
    tok_path = cfg.tokenizer or trained.get("tokenizer")
    if not tok_path:
        raise runtime.UserError(f"{cfg.ckpt} does not name its tokenizer: pass --tokenizer <checkpoint>")
    tok = model.load_tokenizer(tok_path, device=device)
    if (tok.cfg.codebook_size, tok.cfg.num_tokens) != (gpt.cfg.vocab_size, gpt.cfg.block_size):
        raise runtime.UserError(f"--tokenizer {tok_path} ({tok.cfg.codebook_size} codes x "
                                f"{tok.cfg.num_tokens}) does not fit the AR model ({gpt.cfg.vocab_size} x "
                                f"{gpt.cfg.block_size})")
    check_tokenizer(tok, tok_path, ours, cfg.ckpt)  # the codes it writes are that tokenizer's
    # human-readable names (train_ar.py records the data's: "goldfish" for n01443537), else the class ids
    names = ours.get("names") or ours.get("classes") or [str(c) for c in range(gpt.cfg.num_classes)]
    if int(os.environ.get("RANK", 0)) == 0:  # the start-up line
        print(f"AR model {cfg.ckpt}: {gpt.cfg.num_classes} classes of {trained.get('data', 'its data')}; "
              f"tokenizer {tok_path}")
    return gpt, tok, names, cfg


def main(cfg: SampleConfig):
    validate(cfg)
    rank, world, device = runtime.setup(cfg)
    gpt, tok, names, cfg = load_models(cfg, device)
    autocast = runtime.autocast_for(cfg.precision, device)[1]
    # each process its own stream
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + rank)
    stats = dict(tokens=0, seconds=0.0)
    # the outputs go beside the checkpoint (a URL's: under out/)
    here = os.path.join("out", os.path.basename(cfg.ckpt)) if model.is_url(cfg.ckpt) else cfg.ckpt

    def images_for(labels):  # (B,) class ids -> (B, H, W, 3) uint8
        t0 = time.time()
        with autocast:
            codes = generate(gpt, labels, cfg.cfg_scale, cfg.cfg_schedule, cfg.step_start, cfg.temperature,
                             cfg.top_k, cfg.top_p, generator, cfg.kv_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats["seconds"] += time.time() - t0
        stats["tokens"] += codes.numel()
        with torch.no_grad():
            return to_uint8(tok.decode(codes).float())

    if cfg.num_samples == 0:  # a labelled grid, one row per class
        classes = grid_classes(cfg, gpt.cfg.num_classes)
        out = cfg.out or os.path.join(os.path.dirname(here), "samples.png")
        if rank == 0:  # one small grid: sampled once, by the main process
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            rows = [images_for(torch.full((cfg.per_class,), c, dtype=torch.long, device=device))
                    for c in tqdm(classes, desc="sampling", disable=rank != 0)]
            row_names = [f"{c} {names[c]}" if names[c] != str(c) else str(c) for c in classes]
            labelled_grid(rows, row_names).save(out)
    else:  # num_samples images, classes uniformly at random (official), sharded over the processes
        out = cfg.out or os.path.splitext(here)[0] + f"-samples-{cfg.num_samples}"
        os.makedirs(out, exist_ok=True)
        # the same labels on every rank
        labels_all = torch.randint(gpt.cfg.num_classes, (cfg.num_samples,),
                                   generator=torch.Generator().manual_seed(cfg.seed))
        mine = list(range(rank, cfg.num_samples, world))  # this process's images
        for s in tqdm(range(0, len(mine), cfg.batch_size), desc="sampling", disable=rank != 0):
            idx = mine[s:s + cfg.batch_size]
            for i, img in zip(idx, images_for(labels_all[idx].to(device))):
                Image.fromarray(img).save(os.path.join(out, f"{i:06d}.png"))
        runtime.barrier()
        if rank == 0:  # the .npz that FID tools read: arr_0 = (n, H, W, 3) uint8, plus the labels
            arr = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:06d}.png")))
                            for i in range(cfg.num_samples)])
            np.savez(out + ".npz", arr_0=arr, labels=labels_all.numpy())
            out = f"{out}/ and {out}.npz"
    if rank == 0:
        mode = "KV cache" if cfg.kv_cache else "no cache"
        print(f"wrote {out}; {stats['tokens'] / max(stats['seconds'], 1e-9):.0f} codes/s per process "
              f"({mode}, guidance {cfg.cfg_scale} {cfg.cfg_schedule})")
    runtime.cleanup_distributed()


if __name__ == "__main__":
    runtime.run(main, SampleConfig())
