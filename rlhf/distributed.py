"""The DeepSpeed glue, in one place: rank helpers and collectives, the one function that derives
DeepSpeed JSON from the pipeline config, the engines built from it (trainable and frozen), and
the ZeRO-3 gathers for generation and saving."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from rlhf.config import read_deepspeed_json


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init_distributed() -> None:
    """Start the process group (gloo on CPU, nccl on GPU) once; a single process gets a world of 1."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not torch.cuda.is_available():
        skip_cpu_comm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        share_cpu_threads()
        _accelerate_state_for_cpu_deepspeed()


# DeepSpeed's shared-memory all-reduce for CPU ranks (deepspeed/comm/torch.py: build_shm_op)
CPU_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op when it starts on CPU. Only
    its `inference_all_reduce` (tensor-parallel inference, which this pipeline never runs) uses the
    op; training's collectives go through torch.distributed (gloo) either way. Building it needs a
    C++ compiler and ninja, and costs ~30 s on a machine's first launch; marked unavailable,
    DeepSpeed starts without it, as it does on machines where the op is not supported."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[CPU_COMM_OP] = False


def share_cpu_threads() -> int:
    """CPU ranks on one machine split its cores: torch's threads per rank = cores // ranks on this
    node, unless OMP_NUM_THREADS says otherwise. By default every rank would start one thread per
    core, and 2 ranks on 2 cores (4 spinning OpenMP threads) ran the demo's PPO 3.5x slower."""
    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()


def _accelerate_state_for_cpu_deepspeed() -> None:
    """Make accelerate (under the HF Trainer) see every DeepSpeed rank on a CPU-only machine.

    Without a GPU, accelerate's PartialState picks no backend when DeepSpeed is requested and
    reports a world of 1 process, so each rank would train on the whole data set and the
    DeepSpeed batch check fails. The state is a shared singleton: initialise it once here for
    DeepSpeed and correct the process counts from the real process group; the Trainer's own
    PartialState() then reuses it.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState()
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    state.num_processes = torch.distributed.get_world_size()
    state.process_index = torch.distributed.get_rank()
    state.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
    state.distributed_type = DistributedType.DEEPSPEED
    state.backend = "gloo"
    state.device = torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and every GPU), as transformers.set_seed
    does, without importing transformers' trainer utilities (and peft with them: ~2 s)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]



def _several() -> bool:
    """A process group of more than one process is up: collectives have someone to talk to."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all processes (a float32 copy; `t` itself is untouched)."""
    t = t.detach().float().clone()
    if _several():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def all_max(t: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `t` over all processes (a float32 copy)."""
    t = t.detach().float().clone()
    if _several():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list:
    """Every process's `obj`, in rank order."""
    if not _several():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_agree(flag: bool) -> bool:
    """True only if every process says True: ranks that must take the same path (ZeRO-3 forwards
    are collective) decide together."""
    if _several():
        t = torch.tensor([int(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())
    return flag


def distinct_count(items: list) -> int:
    """How many distinct items all processes hold together (collective)."""
    return len(set().union(*all_gather_objects(sorted(set(items)))))

def describe_devices() -> str:
    """What the ranks run on, for a stage's first line: 'CPU' or 'GPU (NVIDIA H100 ...)' and how many
    nodes (from the launcher's LOCAL_WORLD_SIZE / WORLD_SIZE)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()) or 1)
    nodes = max(1, world_size() // max(local, 1))
    kind = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU"
    return f"{kind}{f', {nodes} nodes' if nodes > 1 else ''}"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def deepspeed_config(ds: Any, dtype: str, micro_batch: int | str = "auto", grad_accum: int | str = "auto",
                     grad_clip: float | str = "auto", train_batch: int | str = "auto") -> dict:
    """DeepSpeed JSON for `ds` (config.DeepSpeedConfig). With the "auto" defaults it suits the
    HF Trainer (which fills those values in); the PPO engines pass explicit numbers."""
    base: dict = read_deepspeed_json(ds.config_file) if ds.config_file else {}
    zero: dict = dict(base.get("zero_optimization", {}))
    zero["stage"] = ds.zero_stage
    if ds.zero_stage == 3:
        # consolidated safetensors on save; without it ZeRO-3 writes no model weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if ds.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        **base,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # the optimizer is torch's AdamW (or DeepSpeed's CPU Adam under offload), created by the caller
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train_batch != "auto" or micro_batch == "auto":
        cfg["train_batch_size"] = train_batch
    cfg["bf16"] = {"enabled": dtype == "bfloat16"}
    cfg["fp16"] = {"enabled": dtype == "float16"}
    return cfg



def inference_config(ds: Any, dtype: str) -> dict:
    """DeepSpeed JSON for a frozen model's ZeRO-3 inference engine: the pipeline's (its config_file,
    parameter offload) without what only training uses (an optimizer to offload, a scheduler)."""
    cfg = deepspeed_config(ds, dtype, micro_batch=1, grad_accum=1, grad_clip=0.0, train_batch=world_size())
    cfg["zero_optimization"].pop("offload_optimizer", None)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    return cfg


def make_inference(model: Any, zero_stage: int, ds_json: dict) -> Any:
    """A frozen model: sharded by a ZeRO-3 inference engine (`ds_json`: inference_config) under
    ZeRO-3, else moved to the device."""
    model.eval()
    model.requires_grad_(False)
    if zero_stage != 3:
        return model.to(device())
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_json)
    engine.eval()
    return engine


def make_trainable(model: Any, lr: float, ds_json: dict, total_steps: int) -> Any:
    """A trainable DeepSpeed engine (`ds_json`: deepspeed_config with explicit batch sizes) with
    AdamW (DeepSpeed's CPU Adam under optimizer offload) and a linear decay of the learning rate
    to 0 over `total_steps` optimizer steps."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if ds_json["zero_optimization"].get("offload_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(params, lr=lr, betas=(0.9, 0.95), eps=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-5, fused=True)  # one kernel, CPU or GPU
    total = max(1, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_json)
    return engine

@contextmanager
def gathered_params(model: Any, zero_stage: int) -> Iterator[Any]:
    """`model` (a DeepSpeed engine or a plain module) with all its parameters materialised for
    the duration of the block, e.g. one whole generate() call; yields the plain module.

    Under ZeRO-3 gathering alone is not enough for an engine: its per-module hooks release each
    module's parameters after its forward and fetch them again on the next, so every decode step
    would all-gather the whole model once more. The hooks are taken off for the block (as TRL's
    unwrap_model_for_generation does) and put back after it, so the weights are fetched once per
    call. A module partitioned by zero.Init without an engine has no such hooks."""
    module = getattr(model, "module", model)
    if zero_stage != 3:
        yield module
        return
    import deepspeed

    offload = _zero3_offload(model)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if offload is not None:
            for p in module.parameters():
                p.ds_active_sub_modules.clear()
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield module
        finally:
            if offload is not None:
                offload._register_deepspeed_module(offload.module)


@contextmanager
def for_generation(model: Any, zero_stage: int, gather: bool = True) -> Iterator[tuple[Any, bool]]:
    """(module, synced_gpus) to call generate() with. Under ZeRO-3 with `gather` (the default,
    deepspeed.zero3_gather_for_generation) the whole model is gathered once for the block
    (gathered_params); without it the weights stay sharded and ZeRO-3's hooks fetch each layer
    as it runs, every decode step, with the ranks kept in lock-step (synced_gpus) — slower, but it
    never holds more than one layer's full weights: the switch for policies too big for one device."""
    if zero_stage == 3 and not gather:
        yield getattr(model, "module", model), world_size() > 1
        return
    with gathered_params(model, zero_stage) as module:
        yield module, False


def _zero3_offload(engine: Any) -> Any:
    """The object holding a ZeRO-3 engine's module hooks (DeepSpeedZeRoOffload), or None."""
    opt = getattr(engine, "optimizer", None)
    if opt is None:
        return None
    offload = getattr(opt, "parameter_offload", opt)
    return offload if hasattr(offload, "forward_hooks") and hasattr(offload, "_register_deepspeed_module") else None


def full_state_dict(model: Any, zero_stage: int) -> dict | None:
    """Every parameter of `model` (a DeepSpeed engine or a plain module) as CPU tensors on rank 0,
    None on the other ranks. Collective under ZeRO-3: every rank must call it."""
    if zero_stage == 3 and hasattr(model, "_zero3_consolidated_16bit_state_dict"):
        return model._zero3_consolidated_16bit_state_dict()
    module = getattr(model, "module", model)
    return {k: v.detach().cpu() for k, v in module.state_dict().items()} if is_main() else None
