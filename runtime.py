"""
What every script runs on: the command line, the processes and devices, checkpoints, logs, and the steps
that both trainers share (the learning-rate schedule, resume, wrapping: activation checkpointing, FSDP,
compile, DDP; the optimizer step), and the memory plan.

    parse_config(cfg)                  dataclass defaults <- command line (--field-name value), --help
    setup(cfg) -> (rank, world, device)  torchrun -> one process per device (DDP), else one plain process
    keep_freed_memory()                glibc keeps freed blocks for reuse (setup calls it; CPU speed)
    barrier(), all_reduce(t), cleanup_distributed()
    micro_batch(cfg, world)            the per-process batch
    precision_for / autocast_for(precision, device)   the precision
    get_lr(step, ...)                  linear warmup, then cosine or WSD
    resume(path, parts, ...), build(make, ...), grad_sync(...)
    wrap(model, ...)                   checkpointing, FSDP, compile, DDP
    save_checkpoint(obj, path), save(path, parts, ...), optimizer_step(...)
    Logger(out_dir, master)(step, **numbers), write_json(path, obj), read_json(path)
    fake_modules(make), memory_plan(...), describe_plan(...), plan_only(cfg, plan)   what a run will hold
"""
import argparse
import ctypes
import dataclasses
import datetime
import functools
import glob
import inspect
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext

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
    """argparse's type for a field: bools read true/false (yes/no, on/off, 1/0), tuples a comma-separated
    list."""
    def convert(text):
        if isinstance(default, bool):
            if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return text.lower() in ("1", "true", "yes", "on")
            raise ValueError(text)
        if isinstance(default, tuple):  # an empty default holds strings
            return tuple(type(default[0] if default else "")(t) for t in text.split(",") if t)
        return type(default)(text)
    # the name argparse's errors give the type
    convert.__name__ = "true/false" if isinstance(default, bool) else type(default).__name__
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
    """rules: (ok, field, what is valid) triples; the first that fails is a UserError naming the flag and its
    value."""
    for ok, field, valid in rules:
        if not ok:  # the first broken rule is the one reported
            raise UserError(f"--{field.replace('_', '-')} {getattr(cfg, field)!r}: {valid}")


def run(main, cfg):
    """The scripts' entry point: main(the config from the command line). A UserError, or a checkpoint URL that
    could not be fetched, is one line on stderr (exit status 2), and so is Ctrl-C outside a training loop
    (inside one the trainer saves first: Interrupt; exit status 130, the shell's)."""
    try:
        main(parse_config(cfg))
    except (UserError, model.DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


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
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_type(default),
                            default=default, metavar=type(default).__name__,
                            help=f"{doc.get(f.name, '')} (default {shown})".replace("%", "%%"), **bare)
    # unknown flags and bad values exit here with status 2
    return dataclasses.replace(cfg, **vars(parser.parse_args(argv)))

# -----------------------------------------------------------------------------------------------------------
# Processes and devices (nanoGPT's idiom): no RANK in the environment -> one plain process; under torchrun
# -> one process per device, DDP over nccl (CUDA) or gloo (CPU). Multi-node is torchrun's business
# (--nnodes ...).

def setup(cfg, tf32=False):
    """-> (rank, world size, device) for a config with `device` and `threads` fields. device "" picks cuda,
    then mps, then cpu. Under torchrun each process takes the GPU of its LOCAL_RANK (so the local rank is
    device.index). threads > 0 sets torch's CPU threads (0 leaves torch's default: OMP_NUM_THREADS, or the
    cores it may use). tf32=True lets CUDA matmuls and convolutions use TF32 (the official trainers do)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    device = cfg.device or ("cuda" if torch.cuda.is_available()
                            else "mps" if getattr(torch.backends, "mps", None)
                            and torch.backends.mps.is_available() else "cpu")
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
        # gloo: CPU processes (the CI's tests). A collective that waits longer than `timeout` ends the run
        # (NCCL's watchdog, 10 minutes by default): the processes wait at barriers behind long work of one or
        # some of them (rank 0 writing a multi-GB checkpoint, downloading the helpers; train_ar.py's code
        # extraction), so 2 hours. device_id binds the process group to this GPU at once (NCCL's communicator
        # is made eagerly).
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=dev if dev.type == "cuda" else None)
    return rank, world, dev


def on_rank0(value):
    """Rank 0's value of a small picklable object in every process (a decision: does a checkpoint exist, did a
    helper load), so that processes whose file systems or networks differ still take one path; as is alone."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # pickled, sent from rank 0 (through the GPU under NCCL)
    return box[0]


def everywhere(flag):
    """Whether flag holds in every process (a helper that loaded on every node); flag itself alone."""
    if not dist.is_initialized():
        return bool(flag)
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))  # pickled (through the GPU under NCCL)
    return all(flags)


def keep_freed_memory():
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the OS at once. By
    default a block above its mmap threshold (128 KiB, rising to at most 32 MiB) is mapped fresh on every
    allocation and unmapped on free, so each step's activations page-fault their memory in again. With mmap
    off and a 1 GiB trim threshold, CPU steps are faster (EXPERIMENTS.md, "Speed"), for at most about the
    largest step's activations of extra RSS. A no-op off glibc, and when the user has set MALLOC_MMAP_MAX_ or
    MALLOC_TRIM_THRESHOLD_ (theirs win)."""
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): its allocator, its defaults
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(t, op="sum"):
    """In-place sum (or "max") over the processes; a no-op in a single process. Returns t."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def cleanup_distributed():
    """The end of a distributed run. Every process reaches it before any tears its connections down (the
    barrier); then, for a moment without the GIL (the sleep), the collectives' worker threads release the
    last collectives' tensors, which needs the GIL. Without that pause a gloo group whose destructor joined
    those threads while this thread held the GIL (when DDP's reducer, which holds the group, was freed)
    deadlocked at exit under load, or aborted ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        time.sleep(0.5)
        dist.destroy_process_group()


def micro_batch(cfg, world):
    """The per-process micro-batch of the global cfg.batch_size: batch = world x grad_accum x micro."""
    check(cfg, [(cfg.grad_accum >= 1, "grad_accum", "at least 1")])
    micro = cfg.batch_size // (world * cfg.grad_accum)  # images per process per micro-step
    check(cfg, [(micro >= 1 and micro * world * cfg.grad_accum == cfg.batch_size, "batch_size",
                 f"a positive multiple of {world} processes x --grad-accum {cfg.grad_accum}")])
    return micro


def precision_for(precision, device):
    """--precision as run on `device`: "auto" is bf16 on CUDA and fp32 elsewhere; anything else is checked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--precision {precision!r}: auto, bf16, fp16 or fp32")
    return precision


def native_bf16():
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX). Without it, oneDNN emulates bf16,
    many times slower than fp32 (EXPERIMENTS.md, "Speed"). torch's checks are private; a torch without them
    counts as no."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast_for(precision, device, planning=False):
    """-> (precision name, autocast context), the name from precision_for; fp16 needs the GradScaler (the
    trainers make one, enabled for fp16 only). bf16 on a CPU needs native_bf16(); planning=True: a CPU
    stand-in for a plan's device (fake tensors, no kernels run), where this CPU's own bf16 does not matter."""
    precision = precision_for(precision, device)
    if precision == "bf16" and device.type == "cpu" and not planning and not native_bf16():
        raise UserError("--precision bf16: this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 "
                        "runs tens to hundreds of times slower than fp32; use --precision fp32")
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


def trained_data(cfg, config, source):
    """--data "" means the data that a checkpoint was trained on (its config's "dataset", which
    train_tokenizer.py writes, or else its "train" fields), with that run's --num-classes when the flag is 0;
    one that does not say (an official checkpoint) means the synthetic set. A folder is made absolute.
    -> (cfg, where the data came from, for the start-up line, the class ids that the data must still have
    (None: not checked))."""
    if cfg.data:
        folder = cfg.data if cfg.data == "synthetic" else os.path.abspath(cfg.data)
        return dataclasses.replace(cfg, data=folder), "", None
    record = (config or {}).get("dataset") or (config or {}).get("train") or {}
    if "data" not in record:
        return dataclasses.replace(cfg, data="synthetic"), f" ({source} does not name its data)", None
    num_classes = cfg.num_classes or record.get("num_classes", 0)
    same_classes = num_classes == record.get("num_classes", 0)  # else a subset of them: not compared
    return (dataclasses.replace(cfg, data=record["data"], num_classes=num_classes), f" (from {source})",
            config.get("classes") if same_classes else None)


def check_classes(found, expected, data, source):
    """A UserError when the class ids found in the data are not the ones the checkpoint was trained on."""
    if expected is not None and list(found) != list(expected):
        short = lambda c: ", ".join(c[:5]) + (f", ... ({len(c)} in all)" if len(c) > 5 else "")
        raise UserError(f"--data {data} has the classes {short(list(found))}, but {source} was trained on "
                        f"{short(list(expected))}: the folder changed since; pass --data (and --num-classes) "
                        f"to use it anyway, or train the tokenizer on it again")


def same(a, b):
    """Config dicts compare equal when they would be written equal (tuples and lists alike)."""
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def resume(path, parts, identity, train, master):
    """Continue a run: fill each of `parts` ({checkpoint key: module, or (module, its optimizer)}) from the
    checkpoint at path and return its step, or 0 when there is none. identity ({config key: value}) is what
    must not change (the model's architecture, the codes it learns): a checkpoint made with another is
    refused. Training fields (batch size, lr ...) may change; the changed ones are named in a note. The
    checkpoint is read to CPU and freed here."""
    if not on_rank0(os.path.exists(path)):  # rank 0 decides: every process resumes, or none
        return 0
    try:
        ckpt = model.read_checkpoint(path)  # to CPU (memory-mapped): the device holds only the live copy
    except FileNotFoundError:  # e.g. an --out-dir on a disk of rank 0's node only
        raise UserError(f"{path}: rank 0 continues from this checkpoint, which process {dist.get_rank()} "
                        f"cannot read; put --out-dir on a file system that every node shares") from None
    for key, value in identity.items():  # e.g. {"tokenizer": the architecture's config dict}
        theirs = ckpt["config"].get(key)  # what the checkpoint was made with
        if not same(theirs, value):
            short = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:56] + " ..."  # 1000 ids: a few
            fields = [f"{k} {short(theirs.get(k))} -> {short(v)}" for k, v in value.items()
                      if not same(theirs.get(k), v)] \
                if isinstance(value, dict) and isinstance(theirs, dict) else []
            raise UserError(f"{path} was made with another {key.replace('_', ' ')}"
                            + (f" ({', '.join(fields)})" if fields else "")
                            + ": pass --fresh, or another --out-dir")
    for key, part in parts.items():
        # a GradScaler's state is {} when it was off (fp32), and absent in older checkpoints
        if ckpt.get(key):
            load_state_dict(part, ckpt[key])  # copies into the module's (device) tensors, or their shards
    changed = {k: v for k, v in ckpt["config"].get("train", {}).items() if not same(v, train.get(k, v))}
    if changed and master:
        print("note: resuming with changed training settings: "
              + ", ".join(f"{k} {v} -> {train[k]}" for k, v in changed.items()))
    step = ckpt["step"]  # the run continues at step + 1; the batch stream is a function of the step
    del ckpt  # nothing of the file outlives the resume
    return step


def blocks(net):
    """The units that FSDP shards and activation checkpointing recomputes, one at a time: every transformer
    block and every CNN resolution level of a Tokenizer, every block of a GPT. What is left (embeddings,
    norms, the quantizer, the CNN's middle blocks, the heads) belongs to the root unit."""
    if isinstance(net, model.Tokenizer):
        return [*net.cnn_encoder.down, *net.encoder.layers, *net.decoder.layers, *net.cnn_decoder.up]
    return list(net.layers)


def checkpoint_blocks(net):
    """Activation checkpointing: each of blocks(net) keeps only its inputs in the forward and runs again in
    the backward (torch.utils.checkpoint, non-reentrant; the RNG state is replayed, so dropout masks repeat).
    The original forward is wrapped on the instance: no wrapper module, the state-dict names do not change."""
    for block in blocks(net):
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward,
                                          use_reentrant=False)


def shard(net, precision):
    """FSDP2 in place: each of blocks(net) one unit, then the root (the rest). A unit's parameters, gradients
    and AdamW moments live as 1/world shards (DTensors, dim 0); its full weights are all-gathered just before
    its forward (and again for its backward) and freed after; gradients are reduce-scattered (averaged). bf16:
    the gathered weights are bf16 copies, the gradients reduced in fp32 (the fp32 shards stay the master
    weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()  # fp32 (CPU): no casts
    for block in blocks(net):
        fully_shard(block, mp_policy=mp)
    if isinstance(net, model.Tokenizer):
        # the code choice in float32 (Tokenizer.to_code_space): one unit whose weights are gathered as they
        # are (fp32), not in bf16
        fully_shard([net.quant_conv, net.quantizer])
        register_fsdp_forward_method(net.quantizer, "lookup")  # decode's codebook lookup gathers it too
    fully_shard(net, mp_policy=mp)
    # the tokenizer returns views (its codes); nothing modifies them in place, which is what FSDP warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for method in ("encode", "decode"):  # gather the root's weights for these too (evaluation, pictures)
        if hasattr(net, method):
            register_fsdp_forward_method(net, method)


def reshard(net):
    """FSDP: free every unit's gathered weights. The root unit stays gathered after a forward without
    gradients (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, _lazy_init: no reshard after forward for
    the root), and the next forward reuses what was gathered instead of reading the shards: after weights are
    written into the shards (EMA.applied), the gathered copies must go. A no-op unsharded."""
    from torch.distributed.fsdp import FSDPModule
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(net):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(getattr(net, "_orig_mod", net), FSDPModule)  # seen through torch.compile's wrapper


def build(make, cfg, world, rank, device):
    """The model to train: make() (its init seeded by the caller), on `device`. Under FSDP over several
    processes only rank 0 builds it in memory (on the CPU, the init a plain run gets) and the others on the
    meta device (no memory, no init); wrap() then gives each process its shard of rank 0's weights, one tensor
    at a time. Host memory at start-up: one whole model on rank 0 (as a plain run), a shard on each of the
    others, instead of a whole model in every process. (Why not on the meta device everywhere: the official
    init draws its truncated normals by rejection sampling, so the values a tensor gets depend on every draw
    before it, and only a process that builds the whole model in order gets exactly the plain run's init.)"""
    if not (cfg.fsdp and world > 1):
        return make().to(device)
    if rank == 0:
        return make()  # on the CPU: FSDP moves the shards to the device
    with torch.device("meta"):
        return make()


def broadcast(tensors):
    """Rank 0's values of `tensors` (a module's parameters or buffers) in every process; a no-op in one
    process."""
    if dist.is_initialized():
        for t in tensors:
            dist.broadcast(t.data, 0)


def fill_from_rank0(net, full, device):
    """Every parameter and buffer of `net` (sharded, or whole) from rank 0's {name: full tensor}, which
    empties as it goes: one tensor is broadcast at a time and each process keeps its shard of it, so that rank
    0 holds its whole model or the shards, never both, and the others a shard and one tensor."""
    from torch.distributed.tensor import distribute_tensor
    for name, t in [*net.named_parameters(), *net.named_buffers()]:  # the same order in every process
        # rank 0 sends its tensor (and drops its own copy), the others receive into a buffer of the full shape
        value = (full.pop(name).to(device) if dist.get_rank() == 0
                 else torch.empty(t.shape, dtype=t.dtype, device=device))
        dist.broadcast(value, 0)
        if isinstance(t, DTensor):  # this process's shard of it (FSDP2's dim-0 chunks), cut locally
            value = distribute_tensor(value, t.device_mesh, t.placements, src_data_rank=None).to_local()
            t = t.to_local()
        with torch.no_grad():
            t.copy_(value)


def wrap(net, cfg, world, device, precision="fp32", find_unused=False):
    """The module to train with: `net` with activation checkpointing (cfg.checkpointing), sharded in place
    (cfg.fsdp, several processes; compiled block by block before), or wrapped in DDP when there are several
    processes and no FSDP, and then compiled (cfg.compile). Build the optimizer after this (FSDP replaces the
    parameters by their shards). Save and evaluate through `net` itself (its state dict has no wrapper
    prefixes)."""
    if cfg.checkpointing:
        checkpoint_blocks(net)
    sharded = cfg.fsdp and world > 1  # one process: nothing to shard, a plain run
    # each block's forward compiled, FSDP's gathers and frees outside the graphs (compiling the sharded
    # module would break its graph at every unit's hooks)
    if cfg.compile and sharded:
        for block in blocks(net):
            block.forward = torch.compile(block.forward)
    if sharded:
        # rank 0's weights (the others built theirs on the meta device: see build), handed out one tensor at
        # a time
        full = ({k: t.detach() for k, t in [*net.named_parameters(), *net.named_buffers()]}
                if dist.get_rank() == 0 else {})
        shard(net.to("meta"), precision)  # every process: meta shards ...
        net.to_empty(device=device)       # ... given memory (uninitialized) ...
        fill_from_rank0(net, full, device)  # ... and rank 0's values
    if world > 1 and not cfg.fsdp:
        # all-reduces gradients in backward; the gradients are views into DDP's buckets (no second copy)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused, gradient_as_bucket_view=True)
    # DDP wrapped first, then compiled: dynamo splits the graph at DDP's bucket boundaries (DDPOptimizer,
    # torch/_dynamo/backends/distributed.py), so that the all-reduces overlap the backward
    if cfg.compile and not sharded:
        net = torch.compile(net)
    return net


def grad_sync(net, sync):
    """The context of a micro-step's forward. DDP: gradients are all-reduced only when sync (the last
    micro-step of an optimizer step), before that they accumulate locally (no_sync()). FSDP reduce-scatters
    every micro-step into the sharded gradients, which then accumulate: without the sync, FSDP2 would keep
    each unit's whole gradient, unsharded and in fp32, across the micro-steps
    (torch/distributed/fsdp/_fully_shard/_fsdp_param.py, to_accumulated_grad_if_needed), a whole model's fp32
    gradients per process; the cost is one more reduce-scatter per unit and micro-step, which overlaps the
    backward as the last one does."""
    net = getattr(net, "_orig_mod", net)  # seen through torch.compile's wrapper
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return nullcontext() if sync else net.no_sync()
    return nullcontext()


def adamw(params, cfg, device, precision):
    """-> AdamW with the run's lr, betas and weight decay (params: tensors, or groups that set their own
    decay), fused into one kernel for all tensors on CUDA (as nanoGPT), and the GradScaler that fp16 needs (a
    no-op otherwise)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    return opt, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(optimizer, scaler, params, clip, average=False):
    """Unscale (fp16), clip the gradient norm to `clip`, step, update the scaler, zero the gradients -> the
    norm. A non-finite norm (a NaN or inf loss or gradient) skips the update: the caller counts it (BadSteps).
    average=True first averages the gradients over the processes (for a module that DDP does not wrap)."""
    params = list(params)
    if average and dist.is_initialized():
        for p in params:
            if p.grad is not None:
                all_reduce(p.grad).div_(dist.get_world_size())
    scaler.unscale_(optimizer)  # fp16: the gradients back to their true scale before clipping
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)  # the total norm before clipping
    # FSDP: the norm over all shards (a replicated DTensor), not one shard's
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    if scaler.is_enabled() or torch.isfinite(grad_norm):       # (one host sync per step)
        scaler.step(optimizer)  # fp16: skipped if the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class BadSteps:
    """Counts the optimizer steps that a non-finite gradient norm skipped (see optimizer_step); `limit` of
    them in a row stop the run with a clear message, leaving the last good checkpoint as it is. fp16: a step
    that the GradScaler skipped while its scale is still above 1 is not counted: the loss scale starts at 2^16
    and halves on each overflow of the scaled gradients, which says that the scale is too large, not that the
    gradients are bad (a loss that is NaN at any scale drives the scale below 1 within ~17 steps, and is then
    counted)."""
    def __init__(self, limit, ckpt_path):
        self.limit, self.ckpt_path, self.total, self.in_row = limit, ckpt_path, 0, 0

    def __call__(self, grad_norm, step, scaler=None):
        finite = bool(torch.isfinite(grad_norm))  # a NaN anywhere makes the total norm NaN
        if not finite and scaler is not None and scaler.is_enabled() and scaler.get_scale() >= 1:
            return  # the scaler calibrating (get_scale: the scale after update(), halved for this step)
        self.total, self.in_row = self.total + (not finite), 0 if finite else self.in_row + 1
        if self.limit and self.in_row >= self.limit:
            raise SystemExit(f"stopped at step {step}: the loss or its gradients were not finite for "
                             f"{self.in_row} steps in a row (lower --lr, or check the data); the last good "
                             f"checkpoint is {self.ckpt_path}, and rerunning the command continues from it")


class Interrupt:
    """Ctrl-C (SIGINT) in a training loop: a request to stop when the step in progress has ended, so that the
    trainer saves the run at the step it reached (what a periodic save would write there) and the same command
    continues it exactly. A second Ctrl-C stops at once, without saving. Made before the data loader's
    processes start: forked, they inherit the handler and keep loading instead of dying of the signal.
    stop(device) -> bool, called once per step by every process: whether any of them was interrupted."""
    def __init__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C
            self.restore()
            raise KeyboardInterrupt
        self.requested = True  # (nothing printed here: a print inside a print's write would fail)

    def __call__(self, device):
        if not dist.is_initialized():
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        return bool(all_reduce(flag, "max"))  # all the processes stop after the same step

    def restore(self):
        """The previous handler back; -> whether Ctrl-C was pressed."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None
        return self.requested

    def end(self, save, say, step, path, fresh):
        """After the loop: the previous handler back, and if Ctrl-C was pressed, save() the run at the step
        it reached, say so in one line and exit with the shell's status for Ctrl-C (130). Rerunning the same
        command (without --fresh) continues exactly."""
        if not self.restore():
            return
        save()
        say(f"interrupted at step {step}, saved {path}; run the same command"
            f"{' without --fresh' if fresh else ''} to continue")
        cleanup_distributed()
        raise SystemExit(130)


class EMA:
    """An exponential moving average of a module's weights (official --ema; DiT's update_ema): after each
    optimizer step, avg <- decay * avg + (1 - decay) * weights. The average starts from the weights after the
    first step (or a resumed run's saved average) and is a copy of each parameter (its shard under FSDP). To
    be evaluated or saved it is swapped into the module: `with ema.applied(): ...`. In a checkpoint it is the
    module's full state dict with the averaged weights, under "ema", which model.load_tokenizer prefers, as
    the official scripts do."""
    def __init__(self, module, decay):
        self.module, self.decay, self.avg = module, decay, None  # avg: None until the first update

    def weights(self):  # the module's parameters as plain tensors: under FSDP this process's shards, in place
        return [p.detach().to_local() if isinstance(p, DTensor) else p.detach()
                for p in self.module.parameters()]

    @torch.no_grad()
    def update(self):
        live = self.weights()
        if self.avg is None:
            self.avg = [p.clone() for p in live]
        else:
            torch._foreach_lerp_(self.avg, live, 1 - self.decay)  # avg += (1 - decay) * (weights - avg)

    @contextmanager
    def applied(self):
        """The module holds the average inside the block and its own weights again after it (what the block
        loads into the module becomes the average)."""
        if self.avg is None:  # no step yet: the average is the weights
            yield
            return
        params = self.weights()
        live = [p.clone() for p in params]
        with torch.no_grad():
            torch._foreach_copy_(params, self.avg)
            try:
                yield
            finally:
                reshard(self.module)  # FSDP: drop the units gathered with the average (see reshard)
                torch._foreach_copy_(self.avg, params)
                torch._foreach_copy_(params, live)

    def state_dict(self):
        with self.applied():
            sd = state_dict(self.module)  # gathered onto rank 0's CPU under FSDP: copies
            # unsharded, the state dict's tensors are the module's own, which the weights are about to refill
            return sd if is_sharded(self.module) else {k: v.clone() for k, v in sd.items()}

    def load_state_dict(self, sd):
        if self.avg is None:  # a copy to load into
            self.avg = [p.clone() for p in self.weights()]
        with self.applied():
            load_state_dict(self.module, sd)


def count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0

# -----------------------------------------------------------------------------------------------------------
# Files: one checkpoint format (a plain dict of tensors, numbers, strings and config dicts, readable with
# torch.load(weights_only=True); read back with model.read_checkpoint), JSON, and the training log.

def save_checkpoint(obj, path):
    """Write obj to path atomically, from rank 0 only: a temporary file, flushed to disk, then moved into
    place, so a crash while writing leaves the previous checkpoint intact."""
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
    """The checkpoint of a run: the full state dict of each of parts ({key: module, or (module, its
    optimizer)}) and the extra entries (step, config ...), written by save_checkpoint. Every process calls it
    (FSDP gathers)."""
    # plain dict, weights_only-readable
    save_checkpoint(dict({k: state_dict(p) for k, p in parts.items()}, **extra), path)
    # FSDP: every process waits for the gathers to end before its next collective (without this, gloo was
    # seen to pair another process's next all-gather with a pending one of the state dict: a size mismatch)
    barrier()


# The same format with or without FSDP: a module's plain state dict, and an optimizer's as torch.optim writes
# it (state keyed by parameter index), so that a sharded run resumes at another world size or in one process,
# and model.load_tokenizer / load_gpt read it. FSDP's own (torch.distributed.checkpoint.state_dict) names the
# optimizer's parameters by their module paths instead: translated here, both ways.

def state_dict(part):
    """The full state dict of a module, or of the optimizer of a (module, optimizer) pair. Sharded: gathered
    onto rank 0's CPU (the other processes get {}); every process must call it."""
    if isinstance(part, EMA):
        return part.state_dict()
    module, opt = part if isinstance(part, tuple) else (part, None)
    if not is_sharded(module):
        return (opt or module).state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if opt is None:
        return get_model_state_dict(module, options=options)
    # before the first step: nothing to gather (DCP would first create zero moments for all)
    if not opt.state:
        return opt.state_dict() if dist.get_rank() == 0 else {}
    # {"state": {name: {"step", "exp_avg", "exp_avg_sq"}},
    #  "param_groups": [{"lr": ..., "params": [name, ...]}]}
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
    if isinstance(part, EMA):
        return part.load_state_dict(sd)
    module, opt = part if isinstance(part, tuple) else (part, None)
    if not is_sharded(module):
        return (opt or module).load_state_dict(sd)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
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


# -----------------------------------------------------------------------------------------------------------
# The memory plan: what each process will hold, before anything is allocated. The models are built on the
# meta device (no memory, no init) and given fake tensors (shapes and dtypes, no data), so one forward and
# backward of a micro-batch runs in seconds even at 2.9B parameters; what autograd saves for the backward is
# counted as it is saved. The rest is arithmetic: fp32 weights, gradients and the two AdamW moments, 1/world
# of each under FSDP.

GiB = 2 ** 30


def fake_modules(make):
    """-> (fake mode, the modules make() returns), built on the meta device and then given fake CPU tensors:
    their forward runs (shapes, dtypes, what autograd saves) without memory, data or initialization."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with torch.device("meta"):  # no memory, and no init: the init functions are no-ops on meta tensors
        nets = make()
    # fake tensors compute shapes and dtypes as CPU tensors would (so CPU autocast stands in for CUDA's), and
    # their storages are distinct objects, which is how saved_for_backward tells one tensor from another
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for net in nets:
            if net is not None:
                net.to_empty(device="cpu")
    return mode, nets


def is_weight_cast(t):
    """Is t (a view of) autocast's low-precision copy of a weight, or of a slice of one (ToCopy of a leaf)?"""
    fn = (t._base if t._base is not None else t).grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    fn = fn.next_functions[0][0]
    while fn is not None and re.match(r"(Slice|Select|Split|SplitWithSizes|Unbind|View|T|Transpose|Permute|"
                                      r"Expand|Reshape|Alias)Backward\d$", type(fn).__name__):
        fn = fn.next_functions[0][0]  # through the views of the weight (an attention's in_proj cut in three)
    return type(fn).__name__ == "AccumulateGrad"


class CudaAutocastRules(torch.overrides.TorchFunctionMode):
    """The plan's fake tensors are CPU tensors (a CPU-only torch runs no op on fake CUDA tensors), and CPU
    autocast keeps normalizations, softmax and reductions in bf16 where CUDA's runs them in fp32
    (aten/src/ATen/autocast_mode.cpp, CUDA's fp32 and fp32_set_opt_dtype lists). Inside this mode a CPU
    autocast follows CUDA's rules for those ops (their inputs in fp32), and attention runs in bf16
    (model.fp32_on_cpu off), as CUDA's flash attention does."""
    F = torch.nn.functional
    FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.mse_loss, F.cross_entropy,
            F.cosine_similarity, F.interpolate, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax, torch.pow, torch.Tensor.pow, torch.sum, torch.Tensor.sum, torch.norm,
            torch.Tensor.norm, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.rsqrt,
            torch.Tensor.rsqrt, torch.logsumexp}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FP32 and torch.is_autocast_enabled("cpu"):
            low = (torch.bfloat16, torch.float16)
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype in low else a
            args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def __enter__(self):
        self.cpu_fp32_attention, model.CPU_FP32_ATTENTION = model.CPU_FP32_ATTENTION, False
        return super().__enter__()

    def __exit__(self, *exc):
        model.CPU_FP32_ATTENTION = self.cpu_fp32_attention
        return super().__exit__(*exc)


def saved_for_backward(net, step, mode, checkpointing=False):
    """Run step() (one micro-batch's forward on fake tensors, returning the loss) and its backward, counting
    the bytes autograd saves, once per storage: -> (activation bytes at their peak, bytes of autocast's
    low-precision copies of the weights). Without checkpointing the peak is everything saved, at the end of
    the forward. With it, a block of blocks(net) keeps only its inputs, and recomputes what it saves in the
    backward, when what was saved after it is gone: the peak is the larger of the forward's end and the worst
    block's recomputation."""
    key = lambda t: t.untyped_storage()._cdata  # one storage, however many views of it are saved
    weights = {key(p) for p in net.parameters()}  # counted as parameters, not as activations
    where, seen, seen_inputs, alive = [None], set(), set(), []
    # kept: what a checkpointed run keeps (bytes, forward order)
    kept, inside, entered, casts = [], {}, {}, [0]

    def enter(i, args):
        where[0] = i
        for a in args:  # what a checkpointed block keeps: its inputs
            if isinstance(a, torch.Tensor) and key(a) not in seen_inputs:
                seen_inputs.add(key(a))
                alive.append(a)
                kept.append((True, a.untyped_storage().nbytes()))
        entered[i] = len(kept)  # what was kept up to this block's start

    def pack(t):
        k = key(t)
        if k not in seen and k not in weights:
            seen.add(k)
            # held (fake: no memory), so that no later storage can reuse its address as key
            alive.append(t)
            if is_weight_cast(t):
                casts[0] += t.untyped_storage().nbytes()
            elif where[0] is None:  # outside every block: kept either way
                kept.append((False, t.untyped_storage().nbytes()))
            else:
                inside[where[0]] = inside.get(where[0], 0) + t.untyped_storage().nbytes()
        return t

    hooks = [h for i, b in enumerate(blocks(net)) for h in (
        b.register_forward_pre_hook(lambda m, args, i=i: enter(i, args)),
        b.register_forward_hook(lambda m, args, out: where.__setitem__(0, None)))]
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), CudaAutocastRules():
            loss = step()
        with mode:
            loss.backward()  # the graph is whole: every saved tensor is used
    finally:
        for h in hooks:
            h.remove()
    if not checkpointing:  # everything saved (a block's inputs are among what its first operations save)
        return sum(b for is_input, b in kept if not is_input) + sum(inside.values()), casts[0]
    # block i recomputes in the backward once everything kept after its start is freed
    total = lambda events: sum(b for _, b in events)
    return max([total(kept), *(total(kept[:n]) + inside.get(i, 0) for i, n in entered.items())]), casts[0]


def memory_plan(mode, net, step, world, fsdp, checkpointing, precision, micro, others=()):
    """Per-process bytes of training `net` (fake, from fake_modules, with its mode) over `world` processes:
    {what: bytes}, with "total". step(): the forward of one micro-batch (`micro` images or sequences) under
    the run's autocast, returning its loss. others: (name, parameter count, trained) for the networks beside
    it (a discriminator trained unsharded: weights, gradients, AdamW; a frozen helper: weights only)."""
    params = count(net)
    shards = world if fsdp and world > 1 else 1  # DDP (and one process): every process holds everything
    activations, casts = saved_for_backward(net, step, mode, checkpointing)
    low = precision in ("bf16", "fp16")
    # the master weights stay fp32 under autocast; AdamW keeps two moments (exp_avg, exp_avg_sq) per weight
    plan = {"parameters (fp32)": 4 * params / shards, "gradients (fp32)": 4 * params / shards,
            "AdamW moments (fp32)": 8 * params / shards,
            "buffers": sum(b.numel() * b.element_size() for b in net.buffers())}
    # FSDP: the gathered weights of the root unit, and of two blocks at a time (prefetch), with the unsharded
    # gradients of one
    if shards > 1:
        units = [count(b) for b in blocks(net)]
        plan["gathered weights (FSDP)"] = ((params - sum(units) + 2 * max(units)) * (2 if low else 4)
                                           + 4 * max(units))
    elif low:  # autocast's bf16 copies of the weights live from the forward to the backward
        # (under FSDP the gathered weights are bf16 already, and freed after each unit's forward)
        plan["bf16 weight copies (autocast)"] = casts
    for name, n, trained in others:
        plan[name] = n * (16 if trained else 4)  # trained: weights, gradients, AdamW (fp32); frozen: weights
    plan[f"activations ({micro} per micro-batch{', checkpointed' if checkpointing else ''})"] = activations
    # not counted: the backward's transient gradients of activations (one layer's at a time), the optimizer
    # step's temporaries (when the activations are gone), the CUDA context and the allocator's fragmentation
    plan["total"] = sum(plan.values())
    return plan


def measured_peak(device):
    """CUDA: the line a run prints after its first step, beside its plan: the allocator's peak so far (what
    the plan counts, and what it leaves out but for the CUDA context: cuDNN's workspaces, NCCL's buffers, the
    backward's transients) and what the allocator holds (its slack too). None elsewhere."""
    if device.type != "cuda":
        return None
    peak, held = torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB
    return f"measured after the first step: peak {peak:.2f} GiB allocated, {held:.2f} GiB reserved"


def plan_only(cfg, plan):
    """--plan true: print plan(world, precision) once (rank 0 under torchrun) and allocate nothing. world is
    --plan-world (0: this launch's); the device is --device or else CUDA, so that "auto" plans bf16: a plan is
    made on a laptop, for the GPUs of a cluster."""
    world = cfg.plan_world or int(os.environ.get("WORLD_SIZE", 1))
    if int(os.environ.get("RANK", 0)) == 0:
        print(plan(world, precision_for(cfg.precision, torch.device(cfg.device or "cuda"))))
    return dict(plan=True)


def describe_plan(plan, world, fsdp, precision):
    """The plan as the line a run starts with: one figure per kind of memory, in GiB (MiB for a plan under
    1 GiB)."""
    mode = (f"FSDP over {world}" if fsdp and world > 1
            else (f"DDP over {world}" if world > 1 else "one process"))
    unit, name = (GiB, "GiB") if plan["total"] >= GiB else (2 ** 20, "MiB")  # a toy's plan in MiB
    return (f"memory plan per process ({mode}, {precision}; {name}): "
            + ", ".join(f"{k} {v / unit:.2f}" for k, v in plan.items() if k != "total")
            + f"; total {plan['total'] / unit:.2f} {name}"
              " (before the allocator's slack and the CUDA context)")
