"""
How fast the models run, in the units people compare (nanoGPT's bench.py, for this project). It prints figures
and never fails on a number: images/s of the tokenizer training step (plain, and with the discriminator), of
encode and decode; tokens/s of the AR training step and of sampling (with and without the KV cache); peak
memory; and the FLOPs of each (counted from the shapes by torch's FlopCounterMode), with the achieved FLOP/s
and, on CUDA, the MFU against --peak-tflops; and the memory plan of both training steps (runtime.memory_plan).

    python bench.py                                  # the toys, on this machine's default device
    python bench.py --size s-s --gpt gpt-b --batch-size 2 --threads 1
    # 989: an H100's dense bf16 peak
    python bench.py --size b-l --gpt gpt-b --device cuda --precision bf16 --peak-tflops 989
    # FLOPs and memory plans only, on fake tensors: any preset on any machine
    python bench.py --size xl-xxl --gpt gpt-xxl --count true
"""
import dataclasses
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import runtime
import sample
import train_ar
import train_tokenizer
from model import GPT, GPT_PRESETS, TOKENIZER_PRESETS, PatchDiscriminator, Tokenizer


@dataclass
class BenchConfig:
    size: str = "toy"            # tokenizer preset (model.TOKENIZER_PRESETS)
    gpt: str = "toy"             # AR preset (model.GPT_PRESETS), on the tokenizer's vocabulary and length
    batch_size: int = 8          # images per tokenizer step
    ar_batch_size: int = 8       # sequences per AR step
    samples: int = 4             # labels sampled at once (guidance doubles the batch)
    cfg_scale: float = 4.0       # guidance while sampling (1 = none)
    steps: int = 5               # timed repetitions of each measurement (after one untimed warm-up)
    precision: str = "fp32"      # "fp32", "bf16" (autocast; the quantizer's distances stay fp32), "fp16",
                                 # "auto"
    compile: bool = False        # torch.compile the tokenizer and the GPT
    peak_tflops: float = 0.0     # the device's peak TFLOP/s at this precision, for the MFU; 0 = do not
                                 # print it
    count: bool = False          # only count: the training steps' FLOPs on fake tensors (no memory, no
                                 # compute, so any preset on any machine) and the memory plans, then exit
    device: str = ""             # "" = cuda, else mps, else cpu
    threads: int = 0             # torch CPU threads (0 = torch's default)
    seed: int = 0


def flops(fn, *args):
    """FLOPs of fn(*args), counted by FlopCounterMode (matmuls and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def timed(fn, steps, device):
    """Seconds per call of fn(), the median of `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def training_steps(tok, disc, gpt, x, codes, labels, autocast):
    """The two training steps measured: the tokenizer's (x (B, 3, S, S)) and the AR model's (codes (B, N),
    labels (B,)), each a forward and a backward (no optimizer)."""
    def tokenizer_step(gan):  # the generator's forward and backward (no teacher, no LPIPS), then D's if gan
        with autocast:
            terms, recons = train_tokenizer.loss_terms(tok, x, None, None, disc, gan, False, True)
            loss = sum(terms.values())
        loss.backward()
        if gan:
            with autocast:
                train_tokenizer.discriminator_loss(disc, x, recons, 0.5).backward()

    def ar_step():
        with autocast:
            loss = F.cross_entropy(gpt(codes, labels).flatten(0, 1), codes.flatten())
        loss.backward()
    return tokenizer_step, ar_step


def print_plans(cfg, gcfg, precision):
    """What the training steps hold, from the memory plan (runtime.memory_plan): the tokenizer with the
    discriminator."""
    tcfg_train = train_tokenizer.resolve(train_tokenizer.TrainConfig(
        size=cfg.size, batch_size=cfg.batch_size, semantic_weight=0.0, perceptual_weight=0.0, disc_start=0))
    print("  tokenizer step with the discriminator, " + train_tokenizer.memory_plan(tcfg_train, 1, precision))
    print("  AR step, " + train_ar.memory_plan(train_ar.resolve(train_ar.ARConfig(gpt=cfg.gpt,
                                                                batch_size=cfg.ar_batch_size)),
                                               gcfg, 1, precision))


def count_only(cfg, tcfg, gcfg, precision):
    """FLOPs of both training steps, per image and per token, counted on fake tensors (runtime.fake_modules):
    the shapes alone, so the 2.9B tokenizer counts on a laptop. (Under autocast the CPU's stands in.)"""
    mode, (tok, disc, gpt) = runtime.fake_modules(lambda: (Tokenizer(tcfg), PatchDiscriminator(), GPT(gcfg)))
    autocast = runtime.autocast_for(precision, torch.device("cpu"), planning=True)[1]
    with mode:
        x = torch.randn(cfg.batch_size, 3, tcfg.image_size, tcfg.image_size)
        codes = torch.randint(gcfg.vocab_size, (cfg.ar_batch_size, gcfg.block_size))
        labels = torch.randint(gcfg.num_classes, (cfg.ar_batch_size,))
        tokenizer_step, ar_step = training_steps(tok, disc, gpt, x, codes, labels, autocast)
        counts = {}  # name -> FLOPs per image or token
        for name, fn, units, unit in [("tokenizer step (no teacher, LPIPS or GAN)",
                                       lambda: tokenizer_step(False), cfg.batch_size, "image"),
                                      ("tokenizer step with the discriminator", lambda: tokenizer_step(True),
                                       cfg.batch_size, "image"),
                                      ("AR step", ar_step, cfg.ar_batch_size * gcfg.block_size, "token")]:
            counts[name] = flops(fn) / units
            print(f"  {name:<40} {counts[name] / 1e9:12.4f} GFLOP per {unit} (forward and backward)")
    return counts


def main(cfg: BenchConfig):
    rank, world, device = runtime.setup(cfg, tf32=True)
    # counting runs no kernel: a plan for bf16 GPUs is made on any CPU, even one without native bf16
    precision, autocast = runtime.autocast_for(cfg.precision, device, planning=cfg.count)
    torch.manual_seed(cfg.seed)
    tcfg = TOKENIZER_PRESETS[cfg.size]
    gcfg = dataclasses.replace(GPT_PRESETS[cfg.gpt], vocab_size=tcfg.codebook_size,
                               block_size=tcfg.num_tokens)
    if cfg.count:
        print(f"bench: tokenizer {cfg.size}, AR {cfg.gpt} ({gcfg.block_size} tokens of {gcfg.vocab_size}); "
              f"{precision}; counted on fake tensors")
        print_plans(cfg, gcfg, precision)
        return count_only(cfg, tcfg, gcfg, precision)
    tok, disc, gpt = Tokenizer(tcfg).to(device), PatchDiscriminator().to(device), GPT(gcfg).to(device)
    train_tok, train_gpt = (torch.compile(m) if cfg.compile else m for m in (tok, gpt))
    x = torch.rand(cfg.batch_size, 3, tcfg.image_size, tcfg.image_size, device=device) * 2 - 1
    codes = torch.randint(gcfg.vocab_size, (cfg.ar_batch_size, gcfg.block_size), device=device)
    labels = torch.randint(gcfg.num_classes, (cfg.ar_batch_size,), device=device)

    tokenizer_step, ar_step = training_steps(train_tok, disc, train_gpt, x, codes, labels, autocast)

    @torch.no_grad()
    def encode():
        with autocast:
            return tok.encode(x)

    @torch.no_grad()
    def decode():
        with autocast:
            return tok.decode(ids)

    def generate(kv_cache):
        gpt.eval()
        with autocast:
            sample.generate(gpt, labels[:cfg.samples], cfg.cfg_scale, kv_cache=kv_cache)
        gpt.train()

    tok.eval()
    ids = encode()
    tok.train()
    # name, units of work per call, unit, the call, timed repetitions (sampling without the cache recomputes
    # every prefix, which is slow: timed once)
    rows = [("tokenizer step (no teacher, LPIPS or GAN)", cfg.batch_size, "img",
             lambda: tokenizer_step(False), cfg.steps),
            ("tokenizer step with the discriminator", cfg.batch_size, "img",
             lambda: tokenizer_step(True), cfg.steps),
            ("encode", cfg.batch_size, "img", encode, cfg.steps),
            ("decode", cfg.batch_size, "img", decode, cfg.steps),
            ("AR step", cfg.ar_batch_size * gcfg.block_size, "tok", ar_step, cfg.steps),
            ("sampling, KV cache", cfg.samples * gcfg.block_size, "tok", lambda: generate(True), cfg.steps),
            ("sampling, no cache (timed once)", cfg.samples * gcfg.block_size, "tok",
             lambda: generate(False), 1)]
    print(f"bench: tokenizer {cfg.size} ({runtime.count(tok) / 1e6:.2f}M), "
          f"AR {cfg.gpt} ({runtime.count(gpt) / 1e6:.2f}M, {gcfg.block_size} tokens of {gcfg.vocab_size}); "
          f"device {device}, {precision}, {torch.get_num_threads()} threads"
          f"{', compiled' if cfg.compile else ''}; median of {cfg.steps}")
    print_plans(cfg, gcfg, precision)
    for name, units, unit, fn, steps in rows:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        count = flops(fn)                                 # the same work, counted once
        seconds = timed(fn, steps, device)
        # elsewhere the process's peak, in KiB on Linux -> GiB
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        mfu = f", MFU {100 * count / seconds / (cfg.peak_tflops * 1e12):.1f}%" if cfg.peak_tflops else ""
        print(f"  {name:<40} {units / seconds:10.1f} {unit}/s  {seconds * 1e3:9.1f} ms  "
              f"{count / 1e9:10.2f} GFLOP  {count / seconds / 1e12:7.3f} TFLOP/s{mfu}  peak {peak:.2f} GiB")
        tok.zero_grad(set_to_none=True)
        gpt.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)


if __name__ == "__main__":
    runtime.run(main, BenchConfig())
