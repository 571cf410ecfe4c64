"""The generation a trainer config asks for: the generator, the episodes, and the ``Rollouts`` over them.

- ``--use_vllm false``: ``generate()`` on the policy itself (``vroll.generation.plain``);
- ``--vllm_mode colocate``: a vLLM engine in each training process, built from the policy's folder
  (``vroll.generation.colocate``);
- server mode: the servers at ``--vllm_server_base_url`` (several: a pool), or the one the trainer
  starts on the spare GPU when no address is given (``vroll.generation.launcher``).

The ``vroll.generation`` room reads no trainer config; this module is where the flags meet it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vroll.engine.config import lora_rank_for
from vroll.generation.async_generation import Schedule
from vroll.generation.episodes import episode_runner
from vroll.generation.generator import Generator
from vroll.generation.launcher import SpareServer, find_server, server_flags, start_spare_server
from vroll.generation.planning import Planner, PromptSampler
from vroll.generation.rollouts import Rollouts, Scoring
from vroll.protocol import SamplingSpec
from vroll.vision import ImageCodec, is_vision_model

if TYPE_CHECKING:
    from accelerate import Accelerator

    from vroll.generation.colocate import ColocateGenerator
    from vroll.generation.stock import StockServerGenerator
    from vroll.trainer.config import TrainConfig

log = logging.getLogger(__name__)


def start_server(args: TrainConfig, accelerator: Accelerator) -> SpareServer | None:
    """Server mode with no address given: the server at the default address if one answers (seed 000's two
    commands), else the guide's layout: ``vroll serve`` on the spare GPU with the trainer's model, seed and
    ``--vllm_*`` engine flags. ``args`` then points at it (main process)."""
    if not args.launches_server:
        return None
    why = find_server(args.server_url, accelerator)
    if why is None:
        args.vllm_server_base_url = args.server_url
        return None
    server = start_spare_server(spare_server_flags(args), args.output_dir, args.vllm_server_timeout, accelerator,
                                why=why)
    if server is not None:
        args.vllm_server_base_url = server.url
    return server


def spare_server_flags(args: TrainConfig) -> list[str]:
    """The ``vroll serve`` flags of the server on the spare GPU: the trainer's model and seed, its ``--vllm_*``
    engine flags, and a context of a prompt plus a completion unless ``--vllm_max_model_len`` says otherwise."""
    engine = args.with_lora(dataclasses.replace(args.vllm, max_model_len=args.engine_context()))
    return server_flags(args.model_name_or_path, args.seed, engine, on_cpu=not torch.cuda.is_available())


def make_generator(args: TrainConfig, accelerator: Accelerator, policy: torch.nn.Module,
                   tokenizer: Any) -> Generator | None:
    """The run's generator; ``None`` on the processes that do not hold one (server mode: all but the main)."""
    if not args.use_vllm:
        from vroll.generation.plain import TransformersGenerator

        return TransformersGenerator(policy, tokenizer, autocast=accelerator.mixed_precision == "bf16",
                                     images=ImageCodec.for_model(policy))
    if args.vllm_mode == "colocate":
        return colocate_generator(args, accelerator, policy)
    return connect_servers(args, accelerator)


def connect_servers(args: TrainConfig, accelerator: Accelerator) -> Generator | None:
    """The main process's generator over ``--vllm_server_base_url`` (one server, or a pool of them); None on
    the other processes. Every process takes part in the check that no server shares a GPU with a training
    process (refused on every process, naming the server)."""
    from vroll.generation.pool import ServerPool
    from vroll.generation.server import ServerGenerator, check_server_devices

    key, urls, sync = args.vllm_api_key or os.environ.get("VROLL_API_KEY"), args.server_urls, args.weight_sync()
    generator: ServerGenerator | ServerPool | StockServerGenerator | None = None
    if accelerator.is_main_process:
        if server_kinds(args, key) == "stock":
            generator = stock_generator(args, key)
        else:
            generator = (ServerGenerator(urls[0], key, args.vllm_server_timeout, sync) if len(urls) == 1
                         else ServerPool(urls, key, args.vllm_server_timeout, sync))
    try:
        if generator is not None and args.lora_adapter_sync():
            check_adapter_servers(generator.servers, args.lora_r)
            generator.lora_sync = "adapter"  # type: ignore[union-attr]
        check_server_devices(generator.servers if generator is not None else [], accelerator)
    except ValueError:
        if generator is not None:
            generator.close()
        raise
    return generator


def check_adapter_servers(servers: list, rank: int) -> None:
    """``--vllm_lora_sync adapter``: every server takes adapters of rank ``rank`` (checked at start, before a push)."""
    for server in servers:
        most = getattr(getattr(server, "info", None), "max_lora_rank", None)  # vroll serve's /info says it
        if most is None or not hasattr(server, "lora_sync"):
            raise ValueError("--vllm_lora_sync adapter needs vroll serve (a stock vllm serve gets the merged weights: "
                             "--vllm_lora_sync merged)")
        if rank > most:
            fix = "--max-lora-rank" if most else "start it with --enable-lora --max-lora-rank"
            raise ValueError(f"--lora_r {rank} is above the max LoRA rank {most} of the server at "
                             f"{server.client.base_url} ({fix} {lora_rank_for(rank)} or more, or lower --lora_r)")


def server_kinds(args: TrainConfig, key: str | None) -> str:
    """``"vroll"`` or ``"stock"``: ``--vllm_server_kind``, or what every server says it is (auto). A mix of both
    kinds in one pool is refused."""
    if args.vllm_server_kind != "auto":
        return args.vllm_server_kind
    from vroll.generation.stock import server_kind

    kinds = {url: server_kind(url, key, args.vllm_server_timeout) for url in args.server_urls}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"--vllm_server_base_url mixes vroll and stock vllm servers ({kinds}): use one kind")
    return next(iter(kinds.values()))


def stock_generator(args: TrainConfig, key: str | None) -> StockServerGenerator:
    """A stock ``vllm serve`` (one: a pool of them is not built yet)."""
    from vroll.generation.stock import StockServerGenerator
    from vroll.models import resolve_model

    if len(args.server_urls) > 1:
        raise ValueError(f"a pool of several stock vllm serve servers ({args.server_urls}) is not supported yet: "
                         "give one stock server, or start vroll serve (several replicas: --data-parallel-size)")
    return StockServerGenerator(args.server_urls[0], key, args.vllm_server_timeout, args.weight_sync(),
                                resolve_model(args.model_name_or_path))


def colocate_generator(args: TrainConfig, accelerator: Accelerator, policy: torch.nn.Module) -> ColocateGenerator:
    """A colocated engine for this process, built from the policy's folder or Hub name."""
    from vroll.generation.colocate import ColocateGenerator
    from vroll.generation.devices import check_colocate_memory
    from vroll.models import resolve_model

    source = getattr(getattr(policy, "config", None), "_name_or_path", "") or ""
    if not source:
        raise ValueError("vllm_mode='colocate' builds its engine from the model's folder or Hub name; "
                         "pass the model by name (or save it and pass the folder)")
    check_colocate_memory(accelerator.device, args.vllm_gpu_memory_utilization, args.vllm_enable_sleep_mode)
    spec = args.colocate_engine_spec(str(resolve_model(source)), source, accelerator.num_processes)
    if is_vision_model(policy) and args.vllm_max_model_len is None:
        # max_prompt_length counts one token per image; the engine runs the expanded prompt
        spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, max_model_len=None))
        log.info("vision-language model: the engine's context is the model's (set --vllm_max_model_len to cap it)")
    return ColocateGenerator(spec, args.weight_sync_bucket_mb, args.vllm_seed_per_prompt,
                             "adapter" if args.lora_adapter_sync() else "merged")


def async_schedule(args: TrainConfig, total_steps: int) -> Schedule | None:
    """Async generation's schedule (None: the run generates synchronously): asked for, and in server mode.

    Colocate mode generates and trains in one process on one device. Generating the next batch
    on a producer thread and a side CUDA stream while the main thread trains was built and
    measured (H100, 512 completion tokens, commit 33e43a4): 2.07 s/step against 2.11
    synchronously, while the samples were one step off-policy. The in-process engine's
    per-step CPU loop and the trainer's kernel launches share one interpreter lock, so the
    generate phase slowed by about what the training took (1.81 -> 2.16 s). Not worth the
    staleness: one warning, and the run is synchronous.
    """
    if not args.async_generation:
        return None
    if args.vllm_mode == "colocate":
        log.warning("async_generation: colocate mode generates and trains in one process on the same device, where "
                    "overlapping them measured no faster; running synchronously (async generation needs a vroll "
                    "server: --vllm_mode server)")
        return None
    return Schedule.for_run(args.max_staleness, args.micro_steps_per_generation(), args.gradient_accumulation_steps,
                            total_steps)


@dataclasses.dataclass
class RolloutsInputs:
    """What the trainer hands over to build its ``Rollouts`` (besides the config)."""

    accelerator: Accelerator
    generator: Generator | None
    rows: list[dict[str, Any]]
    tokenizer: Any
    reward_funcs: list[tuple[str, Callable[..., Any]]]
    policy: Callable[[], torch.nn.Module]  # the model to push, unwrapped (no reference to the trainer: see Rollouts)
    return_logprobs: bool  # whether the loss reads the generator's logprobs
    total_steps: int
    trainer_state: Callable[[], Any] | None = None  # what reward functions get as trainer_state (TRL's)


def make_rollouts(args: TrainConfig, given: RolloutsInputs) -> Rollouts:
    """The trainer's ``Rollouts``: its batches' prompts and sampling, scoring, episodes, async schedule."""
    n = args.completions_per_prompt()
    sampling = SamplingSpec(n=n, max_tokens=args.max_completion_length, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, return_logprobs=given.return_logprobs)
    planner = Planner(given.rows, PromptSampler(len(given.rows), args.data_seed or 0), given.tokenizer,
                      args.prompts_per_generation(given.accelerator.num_processes), args.max_prompt_length, sampling,
                      args.seed)
    scoring = Scoring(given.reward_funcs, args.reward_weights, n, args.num_samples_logged,
                      args.max_generation_batches if args.dynamic_sampling else None, given.trainer_state)
    episodes = episode_runner(given.tokenizer, environment=args.environment, tools=args.tools,
                              tool_timeout=args.tool_timeout, max_turns=args.max_turns,
                              max_prompt_length=args.max_prompt_length,
                              max_completion_length=args.max_completion_length)
    return Rollouts(given.generator, planner, given.accelerator, scoring, given.policy, episodes=episodes,
                    schedule=async_schedule(args, given.total_steps), max_staleness=args.max_staleness)
