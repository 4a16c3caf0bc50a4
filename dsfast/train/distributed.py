"""Process-group helpers: launcher-less single process setup, gathers with correct gradients."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# DeepSpeed's JIT-built ops, one cache per Python environment: environments with different DeepSpeed
# installs would otherwise rebuild each other's ops (minutes each) behind one lock file.
EXTENSIONS_DIR = os.path.join(sys.prefix, ".cache", "dsfast", "torch_extensions")


# Library log lines a user cannot act on: (logger, text of the message)
_NOISE = (("diffusers.models.modeling_utils", "should be kept in float32: []."),  # an empty list
          ("transformers.utils.import_utils", "requires torchvision (not installed)"),  # image processors unused
          # torchao (model.quantize), imported by transformers whenever it is installed: its CUDA kernels on a CPU
          # machine, and tensor types diffusers looks for that this torchao release no longer has
          ("torchao", "Failed to load"),
          ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
          ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
          # int8 weight-only layers of a float32 run train and sample (tests/test_train_quant.py)
          ("diffusers.quantizers.torchao.torchao_quantizer", "only bfloat16 is supported right now"),
          # train.optimizer=adamw8bit under ZeRO (tests/test_train_quant.py checks its loss curve against AdamW's)
          ("DeepSpeed", "ZeRO with an untested optimizer"))


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def accelerator_env() -> None:
    """DeepSpeed on CPU-only machines, and a cache for its JIT extensions.

    Must run before DeepSpeed is imported (it picks its accelerator at import): ``dsfast.train`` does it.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    for name, text in _NOISE:
        logging.getLogger(name).addFilter(_DropMessage(text))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)


SHM_OP = "deepspeed_shm_comm"  # what DeepSpeed compiles on CPU at its first process group


def build_cpu_comm_op() -> None:
    """Build (first run in this environment) and load the communication op DeepSpeed uses on CPU, quietly:
    rank 0 says so when it compiles, and DeepSpeed's "... built successfully" print is dropped. Processes
    that start many runs at once call it first, so that one compiles and the others find it built."""
    if torch.cuda.is_available():
        return
    from deepspeed.comm.torch import build_shm_op

    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS_DIR)) / SHM_OP / f"{SHM_OP}.so"
    if not built.is_file() and os.environ.get("RANK", "0") == "0":
        print(f"dsfast: compiling DeepSpeed's CPU communication op (once per environment, about a minute; "
              f"cached in {built.parent.parent})", file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        build_shm_op()


def device() -> torch.device:
    """This process's training device: ``LOCAL_RANK``'s GPU when CUDA is available, else the CPU (the device
    DeepSpeed's engine puts the model on)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group() -> None:
    """``deepspeed.init_distributed`` (nccl on GPUs, gloo on CPU), quietly (see :func:`build_cpu_comm_op`);
    on a GPU the process's current device is :func:`device` first (the one NCCL uses)."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    build_cpu_comm_op()
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def setup_env() -> None:
    """Make DeepSpeed work without a launcher (world size 1)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"] = "0"
        os.environ["LOCAL_RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0 (rank order), no gradient."""
    if world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherOwnGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        ctx.rank = rank()
        return all_gather_cat(x.detach())

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same loss of the whole gathered batch, so the gradient of
        # that loss w.r.t. this rank's own slice is already exact: take it, no all-reduce.
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0; the gradient flows back to this rank's own slice."""
    if world() == 1:
        return x
    return _GatherOwnGrad.apply(x)


def _numbers_device() -> torch.device:
    """Where collectives of Python numbers run: the current GPU under NCCL (it has no CPU tensors), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if world() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_numbers_device())
    dist.all_reduce(t)
    t /= world()
    return {k: float(v) for k, v in zip(keys, t)}


def any_flag(flag: bool) -> bool:
    if world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_numbers_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
