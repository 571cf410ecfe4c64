"""Trainer configs: Hugging Face-style field names users already type (TRL's)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from vroll.batching import context_length
from vroll.engine.config import EngineConfig, EngineSpec, lora_rank_for
from vroll.flags import Nested, check, field
from vroll.rl import AdvantageScale, DPOLossType, ImportanceSamplingLevel, LossType, PolicyLossConfig
from vroll.rl.importance import FLAG_PREFIX, SamplingCorrection
from vroll.weightsync.sender import WeightSyncConfig

SECRET_FIELDS = ("vllm_api_key",)  # never written to config.json or trackers
DEFAULT_SERVER_HOST, DEFAULT_SERVER_PORT = "127.0.0.1", 8000
# the address a run with none given looks at first: a user's (or a test's) shell may move it off port 8000
SERVER_URL_ENV = "VROLL_SERVER_URL"
WILDCARD_HOSTS = ("0.0.0.0", "::")  # a server's "every interface" (TRL's client default host): this machine

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Fields shared by every online trainer."""

    model_name_or_path: str = field("smollm2-135m", help="policy: 'smollm2-135m' (embedded), an HF id or a folder")
    dataset_name: str = field("addition", help="'addition' (built-in), an HF datasets name, or a .json/.jsonl/.parquet")
    dataset_config: str | None = field(None, help="HF datasets config name")
    dataset_split: str = field("train", help="dataset split")
    dataset_size: int = field(2000, help="rows of the built-in addition task")
    output_dir: str = field("runs/grpo", help="where metrics, samples, plots and checkpoints go")
    per_device_train_batch_size: int = field(8, help="completions per device per micro-step")
    gradient_accumulation_steps: int = field(1, help="micro-steps per optimizer step")
    learning_rate: float = field(1e-5, help="peak learning rate (AdamW)")
    weight_decay: float = field(0.0, help="AdamW weight decay")
    max_grad_norm: float = field(1.0, help="gradient clipping norm (0 disables)")
    lr_scheduler_type: Literal["constant", "linear", "cosine", "constant_with_warmup"] = field(
        "constant", help="learning-rate schedule")
    warmup_ratio: float = field(0.0, help="fraction of steps to warm up over")
    max_steps: int = field(-1, help="optimizer steps; -1: from num_train_epochs")
    num_train_epochs: float = field(1.0, help="passes over the prompts when max_steps is -1")
    logging_steps: int = field(1, help="log every N optimizer steps")
    save_steps: int = field(0, help="checkpoint every N steps (0: only at the end)")
    save_only_model: bool = field(False, help="checkpoints without optimizer/scheduler/RNG (no exact resume)")
    eval_steps: int = field(0, help="strict greedy accuracy on --eval_task's held-out split every N steps (0: off)")
    eval_task: str = field("addition", help="built-in task for --eval_steps (vroll eval --task)")
    eval_n: int = field(100, help="held-out problems per --eval_steps evaluation")
    save_final_model: bool = field(True, help="save the final model to <output_dir>/final")
    resume_from_checkpoint: str | None = field(None, help="a checkpoint folder, or 'latest' in output_dir")
    bf16: bool = field(True, help="bf16 autocast for training (fp32 master weights)")
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = field("float32", help="policy load dtype")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward (less memory)")
    disable_dropout: bool = field(False, help="set the policy's dropout probabilities to 0 (TRL's flag; the policy "
                                              "trains in train mode, so a model with dropout uses it otherwise)")
    attn_implementation: str | None = field(None, help="transformers attention backend (sdpa, eager, ...; default: "
                                                      "vroll_varlen on a GPU with --padding_free, else transformers')")
    # --- training at long, uneven completions (issue 29; docs/design/user_scale_training.md) ---
    padding_free: bool = field(True, help="pack each micro-batch's rows into one sequence, positions restarting per "
                                          "row, so no compute goes to padding (text models on transformers' attention "
                                          "interface; a vision-language policy's rows stay padded)")
    logps_chunk_tokens: int = field(1024, help="log-probabilities from the lm_head over this many tokens at a time, "
                                               "so the (rows, tokens, vocabulary) fp32 logits never exist (0: all at "
                                               "once; models whose logits are transformed after the lm_head: 0)")
    seed: int = field(42, help="seed for model init, sampling and the trainer")
    data_seed: int | None = field(None, help="seed for data order (default: seed)")
    report_to: list[str] = field(default_factory=lambda: ["none"], help="none, tensorboard, wandb")
    run_name: str | None = field(None, help="run name for trackers")
    max_prompt_length: int | None = field(256, help="left-truncate prompts to this many tokens")
    max_completion_length: int = field(64, help="completion tokens at most")
    temperature: float = field(1.0, help="sampling temperature")
    top_p: float = field(1.0, help="nucleus sampling")
    top_k: int = field(-1, help="top-k sampling (-1 off)")
    reward_funcs: list[str] | None = field(
        None, help="built-in names, 'module:function' or 'rm:<model>'; default: the data's own task rewards "
                   "(addition: addition_correct addition_format; REC rows, image + box solution: rec_iou rec_format)")
    reward_weights: list[float] | None = field(None, help="one weight per reward function")
    use_vllm: bool = field(True, help="generate with vLLM (false: generate() on the policy)")
    vllm_mode: Literal["server", "colocate"] = field("server", help="a separate vroll server, or in-process")
    vllm_server_base_url: str | list[str] | None = field(
        None, help="e.g. http://127.0.0.1:8000 (overrides host/port); several URLs: a pool of servers, each batch "
                   "split across them. None given: $VROLL_SERVER_URL, else 127.0.0.1:8000, if a server answers")
    vllm_server_host: str | None = field(None, help="vroll server host (default 127.0.0.1; 0.0.0.0, TRL's default, "
                                                    "means this machine too)")
    vllm_server_port: int | None = field(None, help="vroll server port (default 8000)")
    vllm_server_timeout: float = field(240.0, help="seconds to wait for the server to be ready")
    vllm_server_kind: Literal["auto", "vroll", "stock"] = field(
        "auto", help="the server at --vllm_server_base_url: vroll (vroll serve), stock (vllm serve with "
                     "VLLM_SERVER_DEV_MODE=1 --enable-scale-out --weight-transfer-config), auto: asked "
                     "(/info, /v1/models)")
    vllm_api_key: str | None = field(None, help="server API key (env VROLL_API_KEY)")
    vllm_seed_per_prompt: bool = field(
        False, help="colocate: seed each prompt (seed + index) as a server does, so the run samples what a server "
                    "run samples however the batch is split; slower (vLLM draws each seeded request's noise in "
                    "its own loop). Default: one seed per generation batch")
    weight_sync_bucket_mb: float = field(512.0, help="weight-sync bucket size in MiB")
    weight_sync_host: str = field("127.0.0.1", help="address the server's workers use to reach this trainer")
    num_samples_logged: int = field(4, help="completions written to samples.jsonl per generation")
    # --- environments (vroll.environments): multi-turn episodes, environment tokens not trained ---
    environment: str | None = field(None, help="multi-turn episodes: 'package.module:factory' (a callable taking a "
                                               "dataset row, returning an Environment) or a built-in: calculator")
    max_turns: int = field(4, help="--environment / --tools: replies of the model per episode at most")
    tools: list[str] | None = field(None, help="functions the model may call ('package.module:function', type hints "
                                               "and an Args: docstring), run as a built-in environment")
    tool_timeout: float = field(10.0, help="--tools: seconds a call may take (then an error message answers it)")
    # --- multimodal (vision-language models) ---
    image_root: str | None = field(None, help="folder that relative image paths of the dataset are resolved against")
    freeze_vision_tower: bool = field(True, help="vision-language models: no gradients into the vision encoder")
    # --- async generation (issue 15; vroll.generation.async_generation) ---
    async_generation: bool = field(False, help="server mode: generate the next batches while training on this one")
    max_staleness: int = field(1, help="async: weight versions a sample may lag the policy it trains (older: dropped)")
    # --- dynamic sampling (DAPO; verl's filter_groups) ---
    dynamic_sampling: bool = field(False, help="generate again until the batch holds only prompts whose completions' "
                                               "rewards differ (a group scored alike has no advantage, so no signal)")
    max_generation_batches: int = field(4, help="dynamic_sampling: generations per batch at most; short of such "
                                                "prompts then, the batch is filled with others (they train nothing)")
    # --- training stack (issue 16): DeepSpeed, LoRA (TRL's flag names), the guide's flags ---
    deepspeed: str | None = field(None, help="DeepSpeed config JSON (HF style; 'auto' values filled from these "
                                             "flags): ZeRO-2/3 through accelerate (FSDP2: accelerate launch "
                                             "--config_file configs/fsdp2.yaml)")
    use_peft: bool = field(False, help="train LoRA adapters (synced merged or alone: --vllm_lora_sync)")
    lora_r: int = field(16, help="LoRA rank")
    lora_alpha: int = field(32, help="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = field(0.05, help="LoRA dropout")
    lora_target_modules: list[str] | None = field(None, help="modules to adapt (names, or all-linear); default: "
                                                             "PEFT's choice for the architecture")
    lora_modules_to_save: list[str] | None = field(None, help="modules trained in full beside the adapters")
    lora_task_type: str = field("CAUSAL_LM", help="PEFT task type")
    vllm_lora_sync: Literal["merged", "adapter"] = field(
        "merged", help="LoRA: push every weight with the adapters merged in, or only the adapter (vLLM serves it "
                       "with its LoRA kernels over the base checkpoint; colocate mode for now)")
    local_rank: int = field(-1, help="set by the deepspeed / torch.distributed.launch launchers (LOCAL_RANK wins)")
    # the vLLM engine (vroll.engine.config.EngineConfig) of colocate mode and of the server the trainer starts on
    # the spare GPU, as TRL spells its flags: --vllm_gpu_memory_utilization, --vllm_dtype, ...; args.vllm is it
    vllm = Nested(EngineConfig, "vllm_", defaults={"gpu_memory_utilization": 0.3}, help={
        "tensor_parallel_size": "colocate: processes per tensor-parallel engine",
        "gpu_memory_utilization": "fraction of its GPU vLLM takes (colocate, or the server the trainer starts on "
                                  "the spare GPU)",
        "dtype": "dtype vLLM serves in (colocate, or the server the trainer starts)",
        "max_model_len": "engine context (default: prompt + completion)",
        "enable_sleep_mode": "colocate: engine frees its GPU memory during training",
        "kv_cache_memory_gib": "KV cache size in GiB (CPU engines)"})

    def check_reward_weights(self) -> None:
        """One weight per reward function, once the functions are known (the trainer fills in a default)."""
        if self.reward_weights is None or self.reward_funcs is None:
            return
        check(len(self.reward_weights) == len(self.reward_funcs),
              f"reward_weights has {len(self.reward_weights)} entries for {len(self.reward_funcs)} reward_funcs "
              f"({' '.join(self.reward_funcs)})")

    def check_environment(self) -> None:
        """``--environment``: a spec that can name a factory, and a mode whose generation the episodes can drive."""
        check(self.max_turns >= 1, f"max_turns must be >= 1, got {self.max_turns}")
        check(self.tool_timeout > 0, f"tool_timeout must be > 0 seconds, got {self.tool_timeout}")
        check(not (self.tools and self.environment), "--tools is a built-in environment: give --tools or "
                                                     "--environment, not both (an environment can call tools itself)")
        check(self.tools is None or all(":" in t for t in self.tools),
              f"--tools takes 'package.module:function' specs, got {self.tools}")
        if self.tools:
            self.environment_mode_checks()
        if self.environment is None:
            return
        from vroll.tasks import builtin_environments

        check(self.environment in builtin_environments() or ":" in self.environment,
              f"environment {self.environment!r}: give 'package.module:factory' or a built-in "
              f"({', '.join(sorted(builtin_environments()))})")
        self.environment_mode_checks()

    def environment_mode_checks(self) -> None:
        """Modes whose generation the episode driver cannot run yet."""
        check(not (self.use_vllm and self.vllm_mode == "colocate" and self.vllm_tensor_parallel_size > 1),
              "--environment/--tools with a tensor-parallel colocated engine is not supported yet (the processes of "
              "a TP group would run different numbers of turns); use vllm_tensor_parallel_size 1 or server mode")

    def __post_init__(self) -> None:
        check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        check(self.learning_rate >= 0, f"learning_rate must be >= 0, got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_steps == -1 or self.max_steps > 0, f"max_steps must be > 0 or -1, got {self.max_steps}")
        check(self.max_completion_length >= 1, "max_completion_length must be >= 1")
        check(self.logps_chunk_tokens >= 0, f"logps_chunk_tokens must be >= 0 (0: no chunks), got "
                                            f"{self.logps_chunk_tokens}")
        check(self.temperature > 0, f"temperature must be > 0 for on-policy sampling, got {self.temperature}")
        check(self.reward_funcs is None or bool(self.reward_funcs), "reward_funcs must name at least one function")
        check(self.eval_steps >= 0 and self.eval_n >= 1, "eval_steps must be >= 0 (0: off) and eval_n >= 1")
        self.check_reward_weights()
        self.vllm  # noqa: B018 - builds the EngineConfig: validates the vllm_* engine flags
        self._check_server_urls()
        bad = set(self.report_to) - {"none", "tensorboard", "wandb"}
        check(not bad, f"report_to: unknown tracker(s) {sorted(bad)}; use none, tensorboard or wandb")
        check(self.lora_r >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1,
              f"LoRA needs lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1 (got {self.lora_r}, "
              f"{self.lora_alpha}, {self.lora_dropout})")
        if self.deepspeed is not None:
            self.deepspeed_config()  # fail at parse time on a missing or malformed file
        if self.data_seed is None:
            self.data_seed = self.seed
        # --- async generation ---
        check(self.max_staleness >= 1, f"max_staleness must be >= 1 (weight versions a sample may lag the policy "
                                       f"it trains), got {self.max_staleness}")
        check(self.max_generation_batches >= 1,
              f"max_generation_batches must be >= 1, got {self.max_generation_batches}")
        check(not (self.dynamic_sampling and self.async_generation),
              "dynamic_sampling decides after scoring whether to generate again, which async_generation's batches "
              "planned ahead cannot wait for: use one of them")
        self.check_environment()
        check(not self.async_generation or self.use_vllm,
              "async_generation overlaps a vroll server's generation with training; with use_vllm false the "
              "policy generates itself, so nothing can overlap: use --use_vllm true (server mode) or drop it")

    def _check_server_urls(self) -> None:
        """Several URLs stay a list; one (a flag parses it as a list of one) is a plain string, as it always was."""
        urls = self.vllm_server_base_url
        if not isinstance(urls, list):
            return
        check(bool(urls), "vllm_server_base_url: give at least one URL")
        check(len(set(urls)) == len(urls), f"vllm_server_base_url names a server twice: {urls}")
        self.vllm_server_base_url = urls[0] if len(urls) == 1 else list(urls)

    @property
    def server_urls(self) -> list[str]:
        """Every server of the run (one, unless ``vllm_server_base_url`` lists several)."""
        urls = self.vllm_server_base_url
        return list(urls) if isinstance(urls, list) else [self.server_url]

    @property
    def server_url(self) -> str:
        """The server of a one-server run (the first of a pool's): the URL given, else host and port, else
        ``$VROLL_SERVER_URL``, else TRL's default (``http://127.0.0.1:8000``)."""
        urls = self.vllm_server_base_url
        if urls:
            return urls[0] if isinstance(urls, list) else urls
        if self.vllm_server_host is None and self.vllm_server_port is None and os.environ.get(SERVER_URL_ENV):
            return os.environ[SERVER_URL_ENV].rstrip("/")
        host = self.vllm_server_host if self.vllm_server_host not in (None, *WILDCARD_HOSTS) else DEFAULT_SERVER_HOST
        return f"http://{host}:{self.vllm_server_port or DEFAULT_SERVER_PORT}"

    @property
    def launches_server(self) -> bool:
        """Server mode and no address given: the trainer trains against the server at the default address if
        one answers, else starts ``vroll serve`` on the spare GPU (the guide; ``vroll.generation.launcher``)."""
        return (self.use_vllm and self.vllm_mode == "server" and self.vllm_server_base_url is None
                and self.vllm_server_host is None and self.vllm_server_port is None)

    def deepspeed_config(self) -> dict[str, Any]:
        """The ``--deepspeed`` JSON as a dict (``"auto"`` values still in), with clear errors."""
        path = Path(str(self.deepspeed))
        check(path.is_file(), f"--deepspeed {self.deepspeed}: no such file (e.g. configs/zero3.json)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--deepspeed {path}: not valid JSON ({exc})") from None
        check(isinstance(cfg, dict) and isinstance(cfg.get("zero_optimization"), dict),
              f"--deepspeed {path}: needs a 'zero_optimization' section (see configs/zero2.json, configs/zero3.json)")
        stage = cfg["zero_optimization"].get("stage", 0)
        check(stage in (0, 1, 2, 3), f"--deepspeed {path}: zero_optimization.stage must be 0-3, got {stage!r}")
        extra = sorted({"optimizer", "scheduler"} & set(cfg))
        check(not extra, f"--deepspeed {path}: remove its {' and '.join(extra)} section(s): vroll builds AdamW and "
                         f"the schedule from --learning_rate, --weight_decay, --lr_scheduler_type, --warmup_ratio")
        return cfg

    def attn_backend(self) -> str | None:
        """``attn_implementation`` as transformers can load it here: flash_attention_2 without flash-attn
        installed (or without CUDA) falls back to sdpa, with a one-line warning."""
        name = self.attn_implementation
        if name != "flash_attention_2":
            return name
        import torch

        missing = ("flash-attn is not installed" if importlib.util.find_spec("flash_attn") is None else
                   "no CUDA device" if not torch.cuda.is_available() else None)
        if missing is None:
            return name
        log.warning("attn_implementation flash_attention_2: %s; using sdpa (PyTorch scaled_dot_product_attention) "
                    "instead", missing)
        return "sdpa"

    def redacted(self) -> dict[str, Any]:
        """The config as a dict for config.json and trackers, secrets replaced by ``"***"``."""
        out = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if out.get(name):
                out[name] = "***"
        return out

    def weight_sync(self) -> WeightSyncConfig:
        """How server-mode syncs bucket and reach this trainer."""
        return WeightSyncConfig(bucket_mb=self.weight_sync_bucket_mb, host=self.weight_sync_host)

    def engine_context(self) -> int | None:
        """The engine's context length: ``vllm_max_model_len``, else a prompt plus a completion."""
        return self.vllm_max_model_len or context_length(self.max_prompt_length, self.max_completion_length)

    def colocate_engine_spec(self, model: str, served_name: str, num_processes: int = 1) -> EngineSpec:
        """The in-process engine of colocate mode, joining the training job's process group.

        It only ever decodes one generation batch (its TP group's share), so ``max_num_seqs`` is
        that batch's sequences, as TRL sets it: vLLM then captures CUDA graphs up to twice that
        instead of up to 512 (SmolLM2 on an H100: 2 x 51 graph sizes, ~5 s of each start).
        """
        prompts = math.ceil(self.prompts_per_generation(num_processes) / num_processes) * self.vllm_tensor_parallel_size
        config = self.with_lora(dataclasses.replace(self.vllm, max_model_len=self.engine_context()))
        return EngineSpec(model=model, served_name=served_name, seed=self.seed, config=config,
                          max_num_seqs=prompts * self.completions_per_prompt(),
                          distributed_executor_backend="external_launcher")

    def with_lora(self, config: EngineConfig) -> EngineConfig:
        """An engine this run starts (colocated, or the spare GPU's server): with ``--vllm_lora_sync adapter`` it
        serves the pushed adapter, so LoRA is on and sized for ``--lora_r``."""
        if not self.lora_adapter_sync():
            return config
        return dataclasses.replace(config, enable_lora=True,
                                   max_lora_rank=max(config.max_lora_rank, lora_rank_for(self.lora_r)))

    def lora_adapter_sync(self) -> bool:
        """Whether syncs send the LoRA adapter alone (``--vllm_lora_sync adapter``), checked against the mode."""
        if self.vllm_lora_sync != "adapter":
            return False
        check(self.use_peft, "--vllm_lora_sync adapter pushes a LoRA adapter: add --use_peft")
        check(self.use_vllm, "--vllm_lora_sync adapter pushes to vLLM: it needs --use_vllm")
        stage = self.deepspeed_config()["zero_optimization"].get("stage", 0) if self.deepspeed else 0
        check(stage < 3, "--vllm_lora_sync adapter does not gather a ZeRO-3 adapter yet: use --vllm_lora_sync merged")
        return True

    # -- batch arithmetic: each algorithm's config says how a generation batch is cut

    def validate(self, num_processes: int) -> None:
        """Checks that need the run's environment (run at trainer start, not at parse time)."""
        if "wandb" in self.report_to:
            check(importlib.util.find_spec("wandb") is not None,
                  "--report_to wandb needs the wandb package: pip install wandb (or 'vroll[wandb]'), "
                  "or use --report_to none / tensorboard")
        if self.deepspeed is not None:
            stage = self.deepspeed_config()["zero_optimization"].get("stage", 0)
            check(self.use_vllm or stage != 3 or num_processes == 1,
                  "--use_vllm false with ZeRO-3 over several processes is not supported (generate() on a partitioned "
                  "model); generate with vLLM (server or colocate), or use ZeRO-2")
            check(importlib.util.find_spec("deepspeed") is not None,
                  "--deepspeed needs the deepspeed package: DS_BUILD_OPS=0 pip install deepspeed "
                  "(or 'vroll[deepspeed]')")
        if self.use_peft:
            check(importlib.util.find_spec("peft") is not None, "--use_peft needs the peft package: pip install peft")
        self.lora_adapter_sync()  # refuses the flag without --use_peft, or outside colocate mode

    def completions_per_prompt(self) -> int:
        raise NotImplementedError

    def prompts_per_generation(self, num_processes: int) -> int:
        """Prompts sampled per generation batch, over all processes."""
        raise NotImplementedError

    def micro_steps_per_generation(self) -> int:
        """Micro-steps each generation batch feeds (a new generation starts after them)."""
        raise NotImplementedError

    def total_steps(self, num_prompts: int, num_processes: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``num_train_epochs`` passes over the prompts."""
        if self.max_steps > 0:
            return self.max_steps
        per_step = self.prompts_per_generation(num_processes) * self.gradient_accumulation_steps
        per_step /= self.micro_steps_per_generation()
        return max(1, math.ceil(self.num_train_epochs * num_prompts / per_step))


@dataclass
class GRPOConfig(TrainConfig):
    """GRPO: group-relative advantages over ``num_generations`` completions per prompt."""

    output_dir: str = field("runs/grpo", help="where metrics, samples, plots and checkpoints go")
    num_generations: int = field(8, help="completions per prompt (G)")
    num_iterations: int = field(1, help="optimizer passes over each generation batch (mu)")
    steps_per_generation: int | None = field(None, help="micro-steps per generation batch (default: grad accum)")
    beta: float = field(0.0, help="KL coefficient to the reference model (0: no reference model)")
    epsilon: float = field(0.2, help="lower clip range")
    epsilon_high: float | None = field(None, help="upper clip range (default: epsilon)")
    loss_type: LossType = field("dapo", help="grpo, bnpo, dr_grpo or dapo")
    importance_sampling_level: ImportanceSamplingLevel = field("token", help="token, or sequence (GSPO)")
    scale_rewards: AdvantageScale = field("group", help="advantage scaling")
    mask_truncated_completions: bool = field(False, help="drop completions cut at max_completion_length")
    vllm_importance_sampling_correction: bool = field(True, help="reweight by trainer/vLLM logprob ratio")
    # --vllm_importance_sampling_mode, _clip_max, _clip_min (TRL 1.16's names); args.vllm_importance_sampling is the
    # vroll.rl.importance.SamplingCorrection they make. TRL's default is sequence_mask with clip_max 3; vroll keeps
    # token_truncate at 2 (its behaviour before the modes) until a learning run measures them
    vllm_importance_sampling = Nested(SamplingCorrection, FLAG_PREFIX)
    vllm_importance_sampling_cap: float | None = field(
        None, help="the former name of --vllm_importance_sampling_clip_max (TRL < 1.6, vroll before the modes): "
                   "given, it sets that")
    max_tokens_per_micro_batch: int | None = field(
        None, help="cut each optimizer step's rows (per_device_train_batch_size x gradient_accumulation_steps per "
                   "device) into the fewest micro-batches of at most this many tokens (prompt + completion; the "
                   "padded rectangle with --padding_free false), as verl's dynamic batch size: a long completion no "
                   "longer sets a whole micro-batch's memory, short ones share one. The loss is the step's whole "
                   "batch's for every loss_type. Default: per_device_train_batch_size rows per micro-batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        self._check_token_budget()
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        check(self.loss_type in get_args(LossType),
              f"loss_type must be one of {', '.join(get_args(LossType))}, got {self.loss_type!r}")
        check(self.num_generations >= 2, f"num_generations must be >= 2 (groups), got {self.num_generations}")
        check(self.num_iterations >= 1, "num_iterations must be >= 1")
        check(self.steps_per_generation >= 1, "steps_per_generation must be >= 1")
        check(self.beta >= 0 and self.epsilon > 0, "beta must be >= 0 and epsilon > 0")
        self._alias_cap()
        self.vllm_importance_sampling  # noqa: B018  # validates the mode and bounds now, naming the flag
        check(not self.async_generation or self.vllm_importance_sampling_correction,  # async generation
              "async_generation trains on samples from older weights: it needs vllm_importance_sampling_correction")

    def policy_loss_config(self) -> PolicyLossConfig:
        """The loss's settings (``vroll.rl.losses``), one micro-batch being 1/GA of an optimizer step."""
        assert self.epsilon_high is not None  # __post_init__ fills it
        return PolicyLossConfig(self.loss_type, self.epsilon, self.epsilon_high, self.importance_sampling_level,
                                self.beta, self.max_completion_length, self.gradient_accumulation_steps)

    def _alias_cap(self) -> None:
        """``vllm_importance_sampling_cap`` is ``vllm_importance_sampling_clip_max``'s old name (TRL keeps it the
        same way): given, it sets clip_max, unless clip_max was set to another value too."""
        cap, clip_max = self.vllm_importance_sampling_cap, self.vllm_importance_sampling_clip_max
        if cap is None:
            return
        default = next(f.default for f in dataclasses.fields(self) if f.name == "vllm_importance_sampling_clip_max")
        check(clip_max in (default, cap), f"vllm_importance_sampling_cap ({cap}) is the old name of "
                                          f"vllm_importance_sampling_clip_max ({clip_max}): give one of them")
        self.vllm_importance_sampling_clip_max = cap

    def _check_token_budget(self) -> None:
        budget = self.max_tokens_per_micro_batch
        if budget is None:
            return
        assert self.steps_per_generation is not None
        longest = context_length(self.max_prompt_length, self.max_completion_length) or self.max_completion_length + 1
        check(budget >= longest, f"max_tokens_per_micro_batch {budget} is below the longest row "
                                 f"(max_prompt_length + max_completion_length = {longest}): every row must fit")
        check(self.steps_per_generation % self.gradient_accumulation_steps == 0,
              f"max_tokens_per_micro_batch re-cuts each optimizer step's rows, which must come from one generation "
              f"batch: steps_per_generation ({self.steps_per_generation}) must be a multiple of "
              f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")

    def generation_batch_size(self, num_processes: int) -> int:
        """Completions per generation, over all processes."""
        assert self.steps_per_generation is not None
        return self.per_device_train_batch_size * num_processes * self.steps_per_generation

    def completions_per_prompt(self) -> int:
        return self.num_generations

    def prompts_per_generation(self, num_processes: int) -> int:
        return self.generation_batch_size(num_processes) // self.num_generations

    def micro_steps_per_generation(self) -> int:
        assert self.steps_per_generation is not None
        return self.steps_per_generation * self.num_iterations

    def validate(self, num_processes: int) -> None:
        """The global generation batch must hold whole groups of ``num_generations``."""
        super().validate(num_processes)
        total = self.generation_batch_size(num_processes)
        check(total % self.num_generations == 0,
              f"the generation batch (per_device_train_batch_size {self.per_device_train_batch_size} x "
              f"{num_processes} processes x steps_per_generation {self.steps_per_generation} = {total}) "
              f"must be divisible by num_generations {self.num_generations}")


@dataclass
class OnlineDPOConfig(TrainConfig):
    """Online DPO: two completions per prompt, the better-scored one is chosen."""

    output_dir: str = field("runs/online-dpo", help="where metrics, samples, plots and checkpoints go")
    per_device_train_batch_size: int = field(8, help="prompts (pairs) per device per micro-step")
    learning_rate: float = field(5e-7, help="peak learning rate (AdamW)")
    beta: float = field(0.1, help="DPO inverse temperature: strength of the pull to the reference model")
    loss_type: DPOLossType = field("sigmoid", help="sigmoid (DPO) or ipo")
    missing_eos_penalty: float | None = field(None, help="subtract from the reward of completions without EOS")
    drop_tied_pairs: bool = field(True, help="pairs whose two rewards are equal carry no preference: no loss")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.loss_type in get_args(DPOLossType),
              f"loss_type must be one of {', '.join(get_args(DPOLossType))}, got {self.loss_type!r}")
        check(self.beta > 0, f"beta must be > 0 for DPO, got {self.beta}")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              "missing_eos_penalty must be >= 0")

    def completions_per_prompt(self) -> int:
        return 2

    def prompts_per_generation(self, num_processes: int) -> int:
        return self.per_device_train_batch_size * num_processes * self.gradient_accumulation_steps

    def micro_steps_per_generation(self) -> int:
        return self.gradient_accumulation_steps  # on-policy: a fresh generation every step
