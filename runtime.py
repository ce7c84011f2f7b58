"""
What every script runs on: the command line, the processes and devices, checkpoints, logs, and the steps that
both trainers share (the learning-rate schedule, resume, compile/DDP wrapping, the optimizer step).

    parse_config(cfg)                  dataclass defaults <- command line (--field-name value), --help
    setup(cfg) -> (rank, world, device)  torchrun -> one process per device (DDP), else one plain process
    barrier(), all_reduce(t), cleanup_distributed()
    micro_batch(cfg, world), autocast_for(cfg, device)   the per-process batch, the precision
    get_lr(step, ...)                  linear warmup, then cosine or WSD
    resume(path, parts, ...), wrap(model, ...), save_checkpoint(obj, path), optimizer_step(...)
    Logger(out_dir, master)(step, **numbers), write_json(path, obj), read_json(path)
"""
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import model

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
# Processes and devices (nanoGPT's idiom): no RANK in the environment -> one plain process; under torchrun ->
# one process per device, DDP over nccl (CUDA) or gloo (CPU). Multi-node is torchrun's business (--nnodes ...).

def setup(cfg):
    """-> (rank, world size, device) for a config with `device` and `threads` fields. device "" picks cuda, then
    mps, then cpu. Under torchrun each process takes the GPU of its LOCAL_RANK (so the local rank is device.index).
    threads > 0 sets torch's CPU threads (0 leaves torch's default: OMP_NUM_THREADS, or the cores it may use)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else
                            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
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


def micro_batch(cfg, world):
    """The per-process micro-batch of the global cfg.batch_size: batch = world x grad_accum x micro."""
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if micro < 1 or micro * world * cfg.grad_accum != cfg.batch_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} does not split into {world} processes x --grad-accum "
                         f"{cfg.grad_accum} micro-steps of at least one image each")
    return micro


def autocast_for(precision, device):
    """-> (precision name, autocast context). "auto" is bf16 autocast on CUDA and fp32 elsewhere; fp16 needs the
    GradScaler (the trainers make one, enabled for fp16 only)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise SystemExit(f"--precision {precision!r}: auto, bf16, fp16 or fp32")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=None)[precision]
    return precision, (torch.autocast(device.type, dtype) if dtype else nullcontext())

# -----------------------------------------------------------------------------------------------------------
# The steps both trainers share


def get_lr(step, lr, warmup, total, end_lr=0.0, schedule="cosine", decay_frac=0.2):
    """Linear warmup from lr/100 over `warmup` steps, then either half a cosine down to end_lr at `total` (the
    tokenizer's, official cosine_v2) or WSD: hold lr, then lr * (1 - sqrt(progress)) over the last decay_frac
    of `total` (the AR model's, official)."""
    if step < warmup:
        return lr / 100 + (lr - lr / 100) * step / warmup
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return end_lr + 0.5 * (lr - end_lr) * (1 + math.cos(math.pi * progress))
    if schedule != "wsd":
        raise SystemExit(f"--schedule {schedule!r}: wsd or cosine")
    decay = int(decay_frac * total)
    hold = total - decay
    return lr if step < hold else lr * max(0.0, 1 - math.sqrt((step - hold) / decay))


def same(a, b):
    """Config dicts compare equal when they would be written equal (tuples and lists alike)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def resume(path, parts, identity, train, master):
    """Continue a run: fill each of `parts` ({checkpoint key: module or optimizer}) from the checkpoint at path and
    return its step, or 0 when there is none. identity ({config key: value}) is what must not change (the model's
    architecture, the codes it learns): a checkpoint made with another is refused. Training fields (batch size,
    lr ...) may change; the changed ones are named in a note. The checkpoint is read to CPU and freed here."""
    if not os.path.exists(path):
        return 0
    ckpt = model.read_checkpoint(path)
    for key, value in identity.items():
        if not same(ckpt["config"].get(key), value):
            raise SystemExit(f"{path} was made with another {key.replace('_', ' ')}: pass --fresh or another --out-dir")
    for key, part in parts.items():
        part.load_state_dict(ckpt[key])
    changed = {k: v for k, v in ckpt["config"].get("train", {}).items() if not same(v, train.get(k, v))}
    if changed and master:
        print("note: resuming with changed training settings: "
              + ", ".join(f"{k} {v} -> {train[k]}" for k, v in changed.items()))
    step = ckpt["step"]
    del ckpt
    return step


def wrap(net, cfg, world, device, find_unused=False):
    """The module to train with: `net` compiled (cfg.compile), then wrapped in DDP when there are several processes.
    Save and evaluate through `net` itself (its state dict has no wrapper prefixes)."""
    if cfg.compile:
        net = torch.compile(net)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None, find_unused_parameters=find_unused)
    return net


def optimizer_step(optimizer, scaler, params, clip):
    """Unscale (fp16), clip the gradient norm to `clip`, step, update the scaler, zero the gradients -> the norm."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0

# -----------------------------------------------------------------------------------------------------------
# Files: one checkpoint format (a plain dict of tensors, numbers, strings and config dicts, readable with
# torch.load(weights_only=True); read back with model.read_checkpoint), JSON, and the training log.

def save_checkpoint(obj, path):
    """Write obj to path atomically, from rank 0 only: a temporary file, flushed to disk, then moved into place,
    so a crash while writing leaves the previous checkpoint intact."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Atomically, as save_checkpoint."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


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


def save(path, parts, **extra):
    """The checkpoint of a run: the state dict of each of parts ({key: module or optimizer}) and the extra entries
    (step, config ...), written by save_checkpoint."""
    save_checkpoint(dict({k: p.state_dict() for k, p in parts.items()}, **extra), path)
