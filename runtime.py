"""
What every script runs on: the command line, the processes and devices, checkpoints, logs, and the steps that
both trainers share (the learning-rate schedule, resume, wrapping: activation checkpointing, FSDP, compile, DDP;
the optimizer step).

    parse_config(cfg)                  dataclass defaults <- command line (--field-name value), --help
    setup(cfg) -> (rank, world, device)  torchrun -> one process per device (DDP), else one plain process
    barrier(), all_reduce(t), cleanup_distributed()
    micro_batch(cfg, world), autocast_for(cfg, device)   the per-process batch, the precision
    get_lr(step, ...)                  linear warmup, then cosine or WSD
    resume(path, parts, ...), wrap(model, ...) (checkpointing, FSDP, compile, DDP), grad_sync(net, sync)
    save_checkpoint(obj, path), save(path, parts, ...), optimizer_step(...)
    Logger(out_dir, master)(step, **numbers), write_json(path, obj), read_json(path)
"""
import argparse
import dataclasses
import functools
import glob
import inspect
import json
import math
import os
import re
import sys
import time
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import model

# -----------------------------------------------------------------------------------------------------------
# Command-line configuration: every field of a config dataclass is a flag, `--field-name value` (or
# `--field_name=value`); a bare `--flag` sets a bool field to True. Unknown flags are an error. The text of
# --help is the comment written after each field in the dataclass's source.

def field_help(cls):
    """{field name: the comment after it in the class source (and comment-only lines right below it)}"""
    try:
        lines = inspect.getsource(cls).splitlines()  # the dataclass's own source lines
    except (OSError, TypeError):
        return {}
    out, last = {}, None
    for line in lines:
        m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s?(.*)$", line)  # "name: type = default  # comment"
        if m:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last and re.match(r"\s+#", line):  # a comment-only line continues the field's help
            out[last] += " " + line.strip().lstrip("#").strip()
        else:
            last = None
    return out


def _field_type(default):
    """argparse's type for a field: bools read true/false (yes/no, on/off, 1/0), tuples a comma-separated list."""
    def convert(text):
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return text.lower() in ("1", "true", "yes", "on")
            raise ValueError(text)
        return tuple(type(default[0])(t) for t in text.split(",")) if isinstance(default, tuple) else type(default)(text)
    convert.__name__ = "true/false" if isinstance(default, bool) else type(default).__name__  # named in errors
    return convert


class UserError(SystemExit):
    """A user's mistake (a flag, a path, a file that does not fit): the message, exit status 2, no traceback.
    runtime.run prints it as one line; a test calling main() catches it (str(e) is the message)."""
    def __init__(self, message):
        super().__init__(2)  # exit status 2, as argparse's for a bad flag
        self.message = message

    def __str__(self):
        return self.message


def check(cfg, rules):
    """rules: (ok, field, what is valid) triples; the first that fails is a UserError naming the flag and value."""
    for ok, field, valid in rules:
        if not ok:  # the first broken rule is the one reported
            raise UserError(f"--{field.replace('_', '-')} {getattr(cfg, field)!r}: {valid}")


def run(main, cfg):
    """The scripts' entry point: main(the config from the command line); a UserError is one line on stderr."""
    try:
        main(parse_config(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_config(cfg, argv=None):
    """A copy of the dataclass instance `cfg` with the fields set on the command line (sys.argv by default).
    A wrong flag or value is one line naming it, and exit status 2 (argparse's), before anything starts."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # the field name's underscores become dashes in the flag; the value after = is kept as typed
    argv = [a.split("=")[0].replace("_", "-") + a[len(a.split("=")[0]):] if a.startswith("--") else a
            for a in argv]                                                  # --field_name is --field-name
    doc = field_help(type(cfg))  # --help shows each field's comment from the dataclass source
    # no abbreviations: a typo is an error
    parser = argparse.ArgumentParser(usage="%(prog)s [--field-name value ...]", allow_abbrev=False,
                                     description=f"Every field of {type(cfg).__name__} is a flag.")
    for f in dataclasses.fields(cfg):
        default = getattr(cfg, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else repr(default)
        bare = dict(nargs="?", const=True) if isinstance(default, bool) else {}     # a bare --flag is true
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_type(default), default=default,
                            metavar=type(default).__name__, help=f"{doc.get(f.name, '')} (default {shown})"
                            .replace("%", "%%"), **bare)
    # unknown flags and bad values exit here with status 2
    return dataclasses.replace(cfg, **vars(parser.parse_args(argv)))

# -----------------------------------------------------------------------------------------------------------
# Processes and devices (nanoGPT's idiom): no RANK in the environment -> one plain process; under torchrun ->
# one process per device, DDP over nccl (CUDA) or gloo (CPU). Multi-node is torchrun's business (--nnodes ...).

def setup(cfg, tf32=False):
    """-> (rank, world size, device) for a config with `device` and `threads` fields. device "" picks cuda, then
    mps, then cpu. Under torchrun each process takes the GPU of its LOCAL_RANK (so the local rank is device.index).
    threads > 0 sets torch's CPU threads (0 leaves torch's default: OMP_NUM_THREADS, or the cores it may use).
    tf32=True lets CUDA matmuls and convolutions use TF32 (the official trainers do)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = cfg.device or ("cuda" if torch.cuda.is_available() else
                            "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    # set by torchrun
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")  # gloo: CPU processes (the CI's tests)
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
    check(cfg, [(cfg.grad_accum >= 1, "grad_accum", "at least 1")])
    micro = cfg.batch_size // (world * cfg.grad_accum)  # images per process per micro-step
    check(cfg, [(micro >= 1 and micro * world * cfg.grad_accum == cfg.batch_size, "batch_size",
                 f"a positive multiple of {world} processes x --grad-accum {cfg.grad_accum}")])
    return micro


def autocast_for(precision, device):
    """-> (precision name, autocast context). "auto" is bf16 autocast on CUDA and fp32 elsewhere; fp16 needs the
    GradScaler (the trainers make one, enabled for fp16 only)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision {precision!r}: auto, bf16, fp16 or fp32")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=None)[precision]  # fp32: no autocast at all
    return precision, (torch.autocast(device.type, dtype) if dtype else nullcontext())

# -----------------------------------------------------------------------------------------------------------
# The steps both trainers share


def get_lr(step, lr, warmup, total, end_lr=0.0, schedule="cosine", decay_frac=0.2):
    """Linear warmup from lr/100 over `warmup` steps, then either half a cosine down to end_lr at `total` (the
    tokenizer's, official cosine_v2) or WSD: hold lr, then lr * (1 - sqrt(progress)) over the last decay_frac
    of `total` (the AR model's, official)."""
    if step < warmup:
        return lr / 100 + (lr - lr / 100) * step / warmup  # linear from lr/100 to lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 -> 1 after the warmup
        return end_lr + 0.5 * (lr - end_lr) * (1 + math.cos(math.pi * progress))
    if schedule != "wsd":
        raise UserError(f"--schedule {schedule!r}: wsd or cosine")
    decay = int(decay_frac * total)  # WSD: the last decay_frac of the steps decay ...
    hold = total - decay  # ... after a hold at the peak lr
    return lr if step < hold else lr * max(0.0, 1 - math.sqrt((step - hold) / decay))


def same(a, b):
    """Config dicts compare equal when they would be written equal (tuples and lists alike)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def resume(path, parts, identity, train, master):
    """Continue a run: fill each of `parts` ({checkpoint key: module, or (module, its optimizer)}) from the
    checkpoint at path and return its step, or 0 when there is none. identity ({config key: value}) is what must
    not change (the model's architecture, the codes it learns): a checkpoint made with another is refused.
    Training fields (batch size, lr ...) may change; the changed ones are named in a note. The checkpoint is read
    to CPU and freed here."""
    if not os.path.exists(path):
        return 0
    ckpt = model.read_checkpoint(path)  # to CPU (memory-mapped): the device holds only the live copy
    for key, value in identity.items():  # e.g. {"tokenizer": the architecture's config dict}
        theirs = ckpt["config"].get(key)  # what the checkpoint was made with
        if not same(theirs, value):
            fields = [f"{k} {theirs.get(k)!r} -> {v!r}" for k, v in value.items() if not same(theirs.get(k), v)] \
                if isinstance(value, dict) and isinstance(theirs, dict) else []
            raise UserError(f"{path} was made with another {key.replace('_', ' ')}" + (f" ({', '.join(fields)})"
                            if fields else "") + ": pass --fresh, or another --out-dir")
    for key, part in parts.items():
        if ckpt.get(key):  # a GradScaler's state: {} when it was off (fp32), absent in older checkpoints
            load_state_dict(part, ckpt[key])  # copies into the module's (device) tensors, or their shards
    changed = {k: v for k, v in ckpt["config"].get("train", {}).items() if not same(v, train.get(k, v))}
    if changed and master:
        print("note: resuming with changed training settings: "
              + ", ".join(f"{k} {v} -> {train[k]}" for k, v in changed.items()))
    step = ckpt["step"]  # the run continues at step + 1; the batch stream is a function of the step
    del ckpt  # nothing of the file outlives the resume
    return step


def blocks(net):
    """The units that FSDP shards and activation checkpointing recomputes, one at a time: every transformer block
    and every CNN resolution level of a Tokenizer, every block of a GPT. What is left (embeddings, norms, the
    quantizer, the CNN's middle blocks, the heads) belongs to the root unit."""
    if isinstance(net, model.Tokenizer):
        return [*net.cnn_encoder.down, *net.encoder.layers, *net.decoder.layers, *net.cnn_decoder.up]
    return list(net.layers)


def checkpoint_blocks(net):
    """Activation checkpointing: each of blocks(net) keeps only its inputs in the forward and runs again in the
    backward (torch.utils.checkpoint, non-reentrant; the RNG state is replayed, so dropout masks repeat). The
    original forward is wrapped on the instance: no wrapper module, the state-dict names do not change."""
    for block in blocks(net):
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)


def shard(net, precision):
    """FSDP2 in place: each of blocks(net) one unit, then the root (the rest). A unit's parameters, gradients and
    AdamW moments live as 1/world shards (DTensors, dim 0); its full weights are all-gathered just before its
    forward (and again for its backward) and freed after; gradients are reduce-scattered (averaged). bf16: the
    gathered weights are bf16 copies, the gradients reduced in fp32 (the fp32 shards stay the master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()  # fp32 (CPU): no casts
    for block in blocks(net):
        fully_shard(block, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    # the tokenizer returns views (its codes); nothing modifies them in place, which is what FSDP warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for method in ("encode", "decode"):  # gather the root's weights for these too (evaluation, pictures)
        if hasattr(net, method):
            register_fsdp_forward_method(net, method)


def is_sharded(net):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(getattr(net, "_orig_mod", net), FSDPModule)  # seen through torch.compile's wrapper


def wrap(net, cfg, world, device, precision="fp32", find_unused=False):
    """The module to train with: `net` with activation checkpointing (cfg.checkpointing), sharded in place (cfg.fsdp,
    several processes), compiled (cfg.compile), then wrapped in DDP when there are several processes and no FSDP.
    Build the optimizer after this (FSDP replaces the parameters by their shards). Save and evaluate through `net`
    itself (its state dict has no wrapper prefixes)."""
    if cfg.checkpointing:
        checkpoint_blocks(net)
    if cfg.fsdp and world > 1:  # one process: nothing to shard, a plain run
        shard(net, precision)
    if cfg.compile:
        net = torch.compile(net)  # compiled module, same parameters (and state dict, but for a prefix)
    if world > 1 and not cfg.fsdp:
        # all-reduces gradients in backward; the gradients are views into DDP's buckets (no second copy)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None, find_unused_parameters=find_unused,
                                                        gradient_as_bucket_view=True)
    return net


def grad_sync(net, sync):
    """The context of a micro-step's forward: gradients are reduced over the processes only when sync (the last
    micro-step of an optimizer step); before that they accumulate locally. DDP: no_sync(); FSDP: a flag that
    holds until changed (so it is set at every micro-step)."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else net.no_sync()
    if is_sharded(net):
        net.set_requires_gradient_sync(sync)
    return nullcontext()


def optimizer_step(optimizer, scaler, params, clip, average=False):
    """Unscale (fp16), clip the gradient norm to `clip`, step, update the scaler, zero the gradients -> the norm.
    A non-finite norm (a NaN or inf loss or gradient) skips the update: the caller counts it (BadSteps).
    average=True first averages the gradients over the processes (for a module that DDP does not wrap)."""
    params = list(params)
    if average and dist.is_initialized():
        for p in params:
            if p.grad is not None:
                all_reduce(p.grad).div_(dist.get_world_size())
    scaler.unscale_(optimizer)  # fp16: the gradients back to their true scale before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # the total norm before clipping
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over all shards (a replicated DTensor), not one shard's
        grad_norm = grad_norm.full_tensor()
    if scaler.is_enabled() or torch.isfinite(grad_norm):       # (one host sync per step)
        scaler.step(optimizer)  # fp16: skipped if the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class BadSteps:
    """Counts the optimizer steps that a non-finite gradient norm skipped (see optimizer_step); `limit` of them in a
    row stop the run with a clear message, leaving the last good checkpoint as it is."""
    def __init__(self, limit, ckpt_path):
        self.limit, self.ckpt_path, self.total, self.in_row = limit, ckpt_path, 0, 0

    def __call__(self, grad_norm, step):
        finite = bool(torch.isfinite(grad_norm))  # a NaN anywhere makes the total norm NaN
        self.total, self.in_row = self.total + (not finite), 0 if finite else self.in_row + 1
        if self.limit and self.in_row >= self.limit:
            raise SystemExit(f"stopped at step {step}: the loss or its gradients were not finite for {self.in_row} "
                             f"steps in a row (lower --lr, or check the data); the last good checkpoint is "
                             f"{self.ckpt_path}, and rerunning the command continues from it")


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
    # one writer per run folder (rank 0), so any temporary file here is a dead writer's
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a writer killed mid-write
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"  # in the same folder, so the rename is atomic
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave half a file under path
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path, parts, **extra):
    """The checkpoint of a run: the full state dict of each of parts ({key: module, or (module, its optimizer)})
    and the extra entries (step, config ...), written by save_checkpoint. Every process calls it (FSDP gathers)."""
    # plain dict, weights_only-readable
    save_checkpoint(dict({k: state_dict(p) for k, p in parts.items()}, **extra), path)
    # FSDP: every process waits for the gathers to end before its next collective (without this, gloo was seen to
    # pair another process's next all-gather with a pending one of the state dict: a size mismatch)
    barrier()


# The same format with or without FSDP: a module's plain state dict, and an optimizer's as torch.optim writes it
# (state keyed by parameter index), so that a sharded run resumes at another world size or in one process, and
# model.load_tokenizer / load_gpt read it. FSDP's own (torch.distributed.checkpoint.state_dict) names the
# optimizer's parameters by their module paths instead: translated here, both ways.

def state_dict(part):
    """The full state dict of a module, or of the optimizer of a (module, optimizer) pair. Sharded: gathered onto
    rank 0's CPU (the other processes get {}); every process must call it."""
    module, opt = part if isinstance(part, tuple) else (part, None)
    if not is_sharded(module):
        return (opt or module).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(module, options=options)
    # {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{"lr": ..., "params": [name, ...]}]}
    sd = get_optimizer_state_dict(module, opt, options=options)
    if not sd:  # not rank 0
        return sd
    # module path -> parameter index, in torch.optim's order (the groups' parameters one after the other)
    index = {name: i for i, name in enumerate(n for g in sd["param_groups"] for n in g["params"])}
    return dict(state={index[n]: s for n, s in sd["state"].items()},
                param_groups=[dict(g, params=[index[n] for n in g["params"]]) for g in sd["param_groups"]])


def load_state_dict(part, sd):
    """The inverse of state_dict: sd (a full state dict, held by every process) into a module or a (module,
    optimizer) pair's optimizer; sharded, each process keeps its own shard of every tensor."""
    module, opt = part if isinstance(part, tuple) else (part, None)
    if not is_sharded(module):
        return (opt or module).load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)  # strict: every tensor filled
    if opt is None:
        return set_model_state_dict(module, sd, options=options)
    path_of = {p: n for n, p in module.named_parameters()}
    names = [path_of[p] for g in opt.param_groups for p in g["params"]]  # parameter index -> module path
    sd = dict(state={names[i]: s for i, s in sd["state"].items()},
              param_groups=[dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]])
    # strict=False: a parameter that never had a gradient (the semantic head without a teacher) has no AdamW
    # state, in torch.optim's dict as here; DCP gives it a zero state, dropped again so that the optimizer is
    # exactly the one that was saved
    set_optimizer_state_dict(module, opt, sd, options=StateDictOptions(full_state_dict=True, strict=False))
    for p, name in path_of.items():
        if name not in sd["state"]:
            opt.state.pop(p, None)
    for group, saved in zip(opt.param_groups, sd["param_groups"]):  # the hyperparameters as saved: DCP turns
        group.update({k: v for k, v in saved.items() if k != "params"})  # tuples (betas) into lists


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

    def say(self, text):  # a plain line, on the main process only
        if self.master:
            print(text)

    def __call__(self, step, **numbers):
        if not self.master:
            return
        fmt = lambda v: f"{v:.3e}" if isinstance(v, float) and 0 < abs(v) < 1e-3 else \
            f"{v:.4f}" if isinstance(v, float) else str(v)
        # above the progress bar
        tqdm.write(f"step {step:>7d} | " + " | ".join(f"{k} {fmt(v)}" for k, v in numbers.items()))
        with open(self.path, "a") as f:
            # one JSON object per line
            f.write(json.dumps(dict(step=step, time=round(time.time(), 3), **numbers)) + "\n")

