"""The vLLM engine every stage serves its model with: ``Engine``, built from a model and an
``EngineConfig``.

``generate`` (teacher rationales), ``filter`` (the LLM judge) and ``evaluate`` (student
predictions) all use it, so ``tensor_parallel_size`` and ``data_parallel_size`` mean the same
in every stage:

    with Engine("data/models/smollm2-135m-instruct", EngineConfig(kv_cache_gib=1)) as engine:
        prompts = chat_prompts(engine.tokenizer, ["What is 2 + 3?"])
        outs = engine.generate(prompts, SamplingParams(max_tokens=64))   # list[list[Completion]]

Data parallelism. vLLM's offline ``LLM`` refuses ``data_parallel_size > 1`` in one process,
so then ``Engine`` starts ``data_parallel_size`` worker processes, each holding a full
in-process engine (itself ``tensor_parallel_size`` GPUs wide) on its own slice of the visible
GPUs, and splits every batch between them; ``generate`` and ``stream`` return the same plain
``Completion`` lists either way.

vLLM on a CPU host: ``gpu_memory_utilization`` must be <= 0.5 (it sets the KV cache's share of
RAM) and scripts need an ``if __name__ == "__main__":`` guard, because vLLM spawns workers.
``kv_cache_gib`` pins the KV cache size instead, which keeps concurrent engines small.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import uuid
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from functools import cached_property
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pipeline.config import check

if TYPE_CHECKING:  # vLLM is imported lazily: importing it is slow and it is absent on some hosts
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

log = logging.getLogger("mind.engine")

# Unless told otherwise, vLLM on CPU reserves one core for itself; on a 2-core host that
# halves throughput. Harmless on GPU hosts. The one place it is set: every engine is made in
# this module, vLLM reads the variable when an engine starts, and the replicas' worker
# processes inherit it. A value in the environment still wins.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@dataclass
class EngineConfig:
    """vLLM engine settings (one engine per data-parallel replica)."""

    # "auto" (``resolve_dtype``): bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or
    # AMX), float32 on other CPUs, where bf16 is emulated and several times slower.
    dtype: str = "auto"
    max_model_len: int = 2048  # prompt + completion tokens per sequence
    gpu_memory_utilization: float = 0.5  # share of GPU memory (on CPU: of RAM, <= 0.5)
    enforce_eager: bool = True  # skip graph capture / compilation: ~30 s faster start-up on CPU
    tensor_parallel_size: int = 1  # GPUs per engine (shards the weights)
    data_parallel_size: int = 1  # engine replicas (worker processes), each on its own GPUs
    seed: int = 0  # engine seed (per-request seeds in SamplingParams take precedence)
    enable_lora: bool = False  # allow LoRARequest adapters (evaluate's PEFT students)
    max_lora_rank: int = 16
    kv_cache_gib: float | None = None  # fixed KV cache size in GiB; None: from gpu_memory_utilization
    max_num_seqs: int = 256  # sequences scheduled together
    # KV cache block size in tokens; None: vLLM's default (128 on CPU, 16 on GPUs; the CPU backend
    # takes multiples of 32). Prefix caching reuses whole blocks only, so it decides how much of a
    # shared prompt prefix (a question's n samples, a perspective's template head) is computed once.
    block_size: int | None = None
    # None: vLLM's default on GPUs, off on CPU hosts. vLLM 0.32's CPU runner crashes ("CPU Generator
    # does not use offset") when a request with its own sampling seed is prefilled in chunks.
    enable_chunked_prefill: bool | None = None

    def __post_init__(self) -> None:
        check(self.dtype in ("auto", "bfloat16", "float16", "float32", "half", "float"),
              f"engine.dtype: {self.dtype!r} is not one of auto, bfloat16, float16, float32")
        check(self.max_model_len > 0, "engine.max_model_len must be positive")
        check(0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization must be in (0, 1]")
        check(self.tensor_parallel_size >= 1, "engine.tensor_parallel_size must be >= 1")
        check(self.data_parallel_size >= 1, "engine.data_parallel_size must be >= 1")
        check(self.max_lora_rank >= 1, "engine.max_lora_rank must be >= 1")
        check(self.kv_cache_gib is None or self.kv_cache_gib > 0, "engine.kv_cache_gib must be positive")
        check(self.max_num_seqs >= 1, "engine.max_num_seqs must be >= 1")
        check(self.block_size is None or (self.block_size >= 1 and self.block_size % 16 == 0),
              "engine.block_size must be a positive multiple of 16")


@dataclass
class Completion:
    """One sampled completion: what the stages keep from a vLLM ``CompletionOutput``."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (EOS / stop string) or "length" (hit max_tokens)


@dataclass
class _Replica:
    """One data-parallel worker process and this process's end of its pipe."""

    rank: int
    conn: Connection
    proc: BaseProcess


class Engine:
    """One model served by vLLM: in this process when ``data_parallel_size`` is 1, else by
    ``data_parallel_size`` replica processes that split every batch. The model loads at
    construction; ``close()``, or leaving a ``with`` block, frees it.

    Replica r sees GPUs ``[r*tp, (r+1)*tp)`` of the visible ones; on a CPU host it gets its own
    share of the cores instead.
    """

    def __init__(self, model: str | Path, cfg: EngineConfig) -> None:
        self.model = str(model)
        self.cfg = cfg
        # Exactly one is in use: the in-process vLLM engine, or the replica processes.
        self.llm: LLM | None = None
        self._replicas: list[_Replica] = []
        if cfg.data_parallel_size == 1:
            self.llm = _load_llm(self.model, cfg)
        else:
            self._start_replicas()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    @cached_property
    def tokenizer(self) -> Any:
        """The served model's HF tokenizer (with its chat template), loaded on first use."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model)

    def generate(
        self,
        prompts: list[str],
        params: SamplingParams | list[SamplingParams],
        lora_request: LoRARequest | None = None,
    ) -> list[list[Completion]]:
        """Per prompt, its ``n`` completions in sample order. In this process the whole batch is
        one ``LLM.generate`` call (vLLM schedules it); replicas get it through ``stream``."""
        if not prompts:
            return []
        if self.llm is not None:
            outs = self.llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
            return [_completions(out) for out in outs]
        per = params if isinstance(params, list) else [params] * len(prompts)
        out: list[list[Completion]] = [[] for _ in prompts]
        for i, completions in self.stream(prompts, per, lora_request=lora_request):
            out[i] = completions
        return out

    def stream(
        self,
        prompts: list[str],
        params: list[SamplingParams],
        window: int | None = None,
        lora_request: LoRARequest | None = None,
    ) -> Generator[tuple[int, list[Completion]], None, None]:
        """``(prompt index, its completions)`` as each request finishes, in finishing order.

        Each engine holds at most ``window`` requests and is topped up as they finish, so its
        scheduler always has waiting work (``LLM.generate`` per chunk drains the batch at the end
        of every call) while a caller can act on finished work, e.g. write a shard, long before
        the end. The default window is ``max_num_seqs`` running and as many again waiting, so a
        finished sequence is replaced at the next scheduler step. With replicas, prompt i goes
        to replica i mod size, so every replica works through the batch in the same order (a
        caller writing shards in order gets them from all replicas at once).
        """
        size = 2 * self.cfg.max_num_seqs if window is None else window
        if self.llm is not None:
            return _stream_in_process(self.llm, prompts, params, size, lora_request)
        return self._stream_replicas(prompts, params, size, lora_request)

    def close(self) -> None:
        """Unload the in-process engine, or stop every replica (each unloads its own first)."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            _unload_llm(llm)
        for r in self._replicas:
            if r.proc.is_alive():
                try:
                    r.conn.send(None)
                    if r.conn.poll(120):
                        r.conn.recv()
                except (BrokenPipeError, EOFError, OSError):
                    pass
            r.proc.join(timeout=60)
            if r.proc.is_alive():
                r.proc.terminate()
        self._replicas = []

    # ------------------------------------------------------------ data-parallel replicas

    def _start_replicas(self) -> None:
        size, tp = self.cfg.data_parallel_size, self.cfg.tensor_parallel_size
        gpus = _visible_gpus()
        if gpus and len(gpus) < tp * size:
            raise ValueError(f"data_parallel_size {size} x tensor_parallel_size {tp} needs {tp * size} GPUs, "
                             f"{len(gpus)} visible")
        if gpus:
            envs = [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[r * tp:(r + 1) * tp])} for r in range(size)]
        elif os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
            envs = [{"VLLM_CPU_OMP_THREADS_BIND": b} for b in _cpu_binds(size, tp)]
        else:  # the user's own binding wins
            envs = [{} for _ in range(size)]
        ctx = mp.get_context("spawn")  # vLLM and CUDA do not survive fork
        for rank in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(envs[rank], self.model, self.cfg, child), daemon=False)
            proc.start()
            self._replicas.append(_Replica(rank, parent, proc))
        for r in self._replicas:
            self._expect(r, ("ready",))

    def _expect(self, r: _Replica, kinds: tuple[str, ...]) -> tuple[str, Any]:
        try:
            status, payload = r.conn.recv()
        except EOFError:
            self.close()
            raise RuntimeError(f"data-parallel engine {r.rank} died (see its log above)") from None
        if status == "error":
            self.close()
            raise RuntimeError(f"data-parallel engine {r.rank}: {payload}")
        if status not in kinds:
            raise RuntimeError(f"data-parallel engine {r.rank}: expected {' or '.join(kinds)}, got {status}")
        return status, payload

    def _stream_replicas(
        self, prompts: list[str], params: list[SamplingParams], window: int, lora_request: LoRARequest | None
    ) -> Generator[tuple[int, list[Completion]], None, None]:
        size = len(self._replicas)
        busy: dict[object, tuple[_Replica, list[int]]] = {}  # by connection: what ``wait`` returns
        for r in self._replicas:
            mine = list(range(r.rank, len(prompts), size))
            if mine:
                r.conn.send(([prompts[i] for i in mine], [params[i] for i in mine], window, lora_request))
                busy[r.conn] = (r, mine)
        while busy:
            for conn in wait(list(busy)):
                r, mine = busy[conn]
                kind, payload = self._expect(r, ("item", "done"))
                if kind == "done":
                    del busy[conn]
                else:
                    local, completions = payload
                    yield mine[local], completions


def _completions(out: Any) -> list[Completion]:
    return [Completion(o.text, len(o.token_ids), str(o.finish_reason)) for o in out.outputs]


def _stream_in_process(
    llm: LLM, prompts: list[str], params: list[SamplingParams], window: int, lora_request: LoRARequest | None
) -> Generator[tuple[int, list[Completion]], None, None]:
    """``Engine.stream`` on an in-process engine: a rolling window of requests on its scheduler."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    tag = uuid.uuid4().hex[:8]  # request ids stay unique on an engine that serves several calls
    added = 0
    live: dict[str, int] = {}  # request id -> prompt index, for the requests in the engine

    def top_up() -> None:
        nonlocal added
        while added < len(prompts) and len(live) < window:
            p = params[added].clone()
            p.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it is done
            rid = f"{tag}-{added}"
            engine.add_request(rid, prompts[added], p, lora_request=lora_request)
            live[rid] = added
            added += 1

    try:
        top_up()
        while live:
            for out in engine.step():
                if out.finished:
                    yield live.pop(out.request_id), _completions(out)
            top_up()
    finally:
        if live:  # interrupted (an exception, a closed generator): leave the engine empty
            engine.abort_request(list(live))


def _load_llm(model: str, cfg: EngineConfig) -> LLM:
    """One in-process vLLM engine on ``model`` (a local HF dir or a Hub id): one replica, so
    ``cfg.data_parallel_size`` is not read here (``Engine`` starts the replicas)."""
    from vllm import LLM

    # A Hub id is "org/name"; anything deeper, or starting with "/" or ".", is a local folder.
    looks_local = model.startswith(("/", ".")) or model.count("/") > 1
    if looks_local and not Path(model).is_dir():
        raise FileNotFoundError(f"model directory {model} does not exist (run `mind models`)")
    kwargs: dict[str, Any] = {}
    if cfg.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * (1 << 30))
    if cfg.block_size is not None:
        kwargs["block_size"] = cfg.block_size
    if cfg.enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank)  # one adapter at a time: vLLM's max_loras=1
    on_cpu = _on_cpu()
    chunked = cfg.enable_chunked_prefill
    if chunked is None and on_cpu:
        chunked = False
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    if chunked is False:
        # Without chunking, a whole prompt must fit in one scheduler step.
        kwargs["max_num_batched_tokens"] = max(4096, cfg.max_model_len)
    if on_cpu:
        # On CPU, run the whole engine in this process: vLLM's separate engine-core and worker
        # processes cost start-up (measured on 2 cores: 35 s -> 8-9 s) and IPC. Tensor
        # parallelism still needs one worker process per rank. GPUs keep vLLM's default.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs["distributed_executor_backend"] = "uni" if cfg.tensor_parallel_size == 1 else "mp"
        # EngineCore.shutdown calls the name it imported from vllm.distributed; replace it there.
        import vllm.v1.engine.core as engine_core

        engine_core.cleanup_dist_env_and_memory = _teardown_when_last
    dtype = resolve_dtype(cfg.dtype)
    log.info("loading vLLM engine on %s (dtype %s, tp %d, max_model_len %d, eager %s)",
             model, dtype, cfg.tensor_parallel_size, cfg.max_model_len, cfg.enforce_eager)
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        enforce_eager=cfg.enforce_eager,
        tensor_parallel_size=cfg.tensor_parallel_size,
        seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs,
        **kwargs,
    )
    if on_cpu:
        _live_engines.add(llm)
    return llm


# In-process engines alive in this process. vLLM keeps its distributed groups in per-process
# globals, shared by every in-process engine, and an engine's shutdown tears them down: without
# this, unloading one engine breaks every other one still alive in the process (tests share one
# engine for the whole session; a notebook may hold two). A weak set, so an engine that is
# garbage-collected instead of unloaded leaves it too.
_live_engines: weakref.WeakSet[LLM] = weakref.WeakSet()


def _teardown_when_last(shutdown_ray: bool = False) -> None:
    """vLLM's per-process distributed teardown, run only once no in-process engine is left."""
    from vllm.distributed import cleanup_dist_env_and_memory

    if _live_engines:
        gc.collect()
    else:
        cleanup_dist_env_and_memory(shutdown_ray)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists a native bf16 instruction set (AVX512-BF16 or AMX).

    Measured on 2-core AMD EPYCs: with AVX512-BF16, vLLM decodes the 135M model at 339 tok/s in
    bf16 against 186 in float32; with AVX2 only, bf16 is emulated and slower than float32."""
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_dtype(dtype: str) -> str:
    """The dtype to compute in: ``auto`` becomes bfloat16 on a CUDA GPU or a CPU with native bf16,
    float32 on other CPUs (logged with the reason); any other value is returned as it is."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        chosen, why = "bfloat16", "CUDA GPU"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        native = cpu_has_native_bf16(cpuinfo.read_text()) if cpuinfo.exists() else False
        chosen, why = ("bfloat16", "CPU with AVX512-BF16/AMX") if native else ("float32", "CPU without native bf16")
    log.info("dtype auto -> %s (%s)", chosen, why)
    return chosen


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _unload_llm(llm: LLM) -> None:
    """Shut the engine's worker processes down and free its memory before the next model loads."""
    _live_engines.discard(llm)  # before shutdown: the teardown checks who is still alive
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def chat_prompts(tokenizer: Any, messages: list[str]) -> list[str]:
    """Each user message wrapped in the tokenizer's chat template, ready for generation.

    Raises ValueError when the tokenizer has no chat template: a raw prompt would silently
    change what the model sees.
    """
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    out = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True) for text in messages]
    # Templates such as Llama 3's start with the BOS token, and vLLM (like a plain tokenizer call)
    # adds one again when it tokenizes the text: drop the template's copy so there is exactly one.
    bos = tokenizer.bos_token
    if bos and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        out = [p[len(bos):] if p.startswith(bos) else p for p in out]
    return out


# ---------------------------------------------------------------- data parallelism


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _cpu_binds(replicas: int, tp: int) -> list[str]:
    """VLLM_CPU_OMP_THREADS_BIND per replica on a CPU host: disjoint core sets, so replicas do
    not pin their OpenMP threads to the same cores ("0-3|4-7" = two TP ranks of 4 cores)."""
    cores = sorted(os.sched_getaffinity(0))
    ranks = replicas * tp
    if len(cores) < ranks:
        raise ValueError(f"data_parallel_size x tensor_parallel_size = {ranks} CPU ranks, only {len(cores)} cores")
    per = len(cores) // ranks
    groups = [cores[i * per:(i + 1) * per] for i in range(ranks)]
    text = [",".join(map(str, g)) for g in groups]
    return ["|".join(text[r * tp:(r + 1) * tp]) for r in range(replicas)]


def _worker(env: dict[str, str], model: str, cfg: EngineConfig, conn: Connection) -> None:
    """One data-parallel replica: an in-process ``Engine``, loaded once, that streams (prompts,
    params, window, lora) batches back, one ("item", (index, completions)) per finished request
    and ("done", None), until None."""
    os.environ.update(env)
    try:
        engine = Engine(model, dataclasses.replace(cfg, data_parallel_size=1))
    except Exception as e:  # reported to the parent, which raises it with the rank
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        prompts, params, window, lora = msg
        try:
            for item in engine.stream(prompts, params, window, lora):
                conn.send(("item", item))
            conn.send(("done", None))
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    engine.close()
    conn.send(("closed", None))
