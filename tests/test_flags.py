from dataclasses import dataclass
from typing import Literal

import pytest

from vroll.flags import Nested, check, check_field, field, parse_bool, parse_config
from vroll.server.config import ServeConfig


@dataclass
class Toy:
    model_name: str = field("m", help="a name")
    steps: int = field(3, help="steps")
    lr: float = field(1e-3, help="learning rate")
    use_thing: bool = field(False, help="a flag")
    mode: Literal["a", "b"] = field("a", help="a choice")
    funcs: list[str] = field(default_factory=list, help="many")
    max_len: int | None = field(None, help="optional")

    def __post_init__(self) -> None:
        check(self.steps > 0, f"steps must be positive, got {self.steps}")


def test_dash_and_underscore_spellings_are_the_same_flag():
    a = parse_config(Toy, ["--model-name", "x", "--use-thing", "true"], "t", "")
    b = parse_config(Toy, ["--model_name", "x", "--use_thing", "true"], "t", "")
    assert a == b and a.model_name == "x" and a.use_thing is True


def test_types_lists_optionals_and_bare_bool():
    cfg = parse_config(Toy, ["--steps", "7", "--lr", "0.5", "--use-thing", "--funcs", "f", "g",
                             "--max_len", "12", "--mode", "b"], "t", "")
    assert (cfg.steps, cfg.lr, cfg.use_thing, cfg.funcs, cfg.max_len, cfg.mode) == \
        (7, 0.5, True, ["f", "g"], 12, "b")


def test_yaml_sits_between_defaults_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 9\nmodel-name: from_yaml\n")
    cfg = parse_config(Toy, ["--config", str(path), "--steps", "4"], "t", "")
    assert cfg.steps == 4 and cfg.model_name == "from_yaml"


def test_unknown_yaml_field_and_bad_value_exit_with_a_message(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("stepz: 9\n")
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--config", str(path)], "t", "")
    assert "stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--steps", "0"], "t", "")
    assert "steps must be positive, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--mode", "c"], "t", "")


def test_parse_bool():
    assert parse_bool("Yes") and parse_bool("1") and not parse_bool("false")
    with pytest.raises(Exception, match="boolean"):
        parse_bool("maybe")


def test_serve_config_accepts_trl_spellings_and_validates():
    cfg = parse_config(ServeConfig, ["--tensor_parallel_size", "2", "--data-parallel-size", "3",
                                     "--gpu_memory_utilization", "0.5"], "vroll serve", "")
    assert (cfg.tensor_parallel_size, cfg.data_parallel_size, cfg.gpu_memory_utilization) == (2, 3, 0.5)
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.model == "smollm2-135m"
    with pytest.raises(ValueError, match="tensor-parallel-size must be >= 1"):
        ServeConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        ServeConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="--dtype"):
        ServeConfig(dtype="int3")


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("VROLL_API_KEY", "k")
    assert ServeConfig().api_key == "k"


def test_api_key_from_a_file_and_request_caps_are_validated(tmp_path, monkeypatch):
    monkeypatch.delenv("VROLL_API_KEY", raising=False)
    (tmp_path / "key").write_text("s3cret\n")
    cfg = parse_config(ServeConfig, ["--api-key-file", str(tmp_path / "key"), "--max-request-tokens", "1000",
                                     "--max_prompts_per_request", "8"], "vroll serve", "")
    assert (cfg.api_key, cfg.max_request_tokens, cfg.max_prompts_per_request) == ("s3cret", 1000, 8)
    with pytest.raises(ValueError, match="give the API key once"):
        ServeConfig(api_key="a", api_key_file=str(tmp_path / "key"))
    with pytest.raises(ValueError, match="no-such-file: No such file"):
        ServeConfig(api_key_file=str(tmp_path / "no-such-file"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        ServeConfig(api_key_file=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--max-request-tokens must be >= 1"):
        ServeConfig(max_request_tokens=0)
    with pytest.raises(ValueError, match="--max-prompts-per-request must be >= 1"):
        ServeConfig(max_prompts_per_request=0)


@dataclass(frozen=True)
class Part:
    size: int = field(1, help="the part's size")
    ratio: float = field(0.9, help="a ratio")

    def __post_init__(self) -> None:
        check_field(self.ratio <= 1, "ratio", f"must be <= 1, got {self.ratio}")


@dataclass
class Owner:
    name: str = field("o", help="a name")
    part = Nested(Part, "part_", defaults={"ratio": 0.3}, help={"size": "the owner's part size"})

    def __post_init__(self) -> None:
        self.part  # noqa: B018 - validates


def test_a_nested_config_is_flat_prefixed_fields_and_one_object():
    """A component's config written once, nested in an owner: its fields are the owner's (prefixed) in Python,
    on the command line, in YAML and in asdict; ``owner.part`` is the component's config they make."""
    import dataclasses

    assert Owner().part == Part(size=1, ratio=0.3)  # the owner's own default
    cfg = Owner(part_size=4)
    assert cfg.part_size == 4 and cfg.part == Part(4, 0.3)
    cfg.part_ratio = 0.5
    assert cfg.part.ratio == 0.5  # the view follows the fields
    assert dataclasses.asdict(cfg) == {"name": "o", "part_size": 4, "part_ratio": 0.5}
    assert parse_config(Owner, ["--part_size", "5", "--part-ratio", "0.25"], "t", "").part == Part(5, 0.25)
    with pytest.raises(ValueError, match=r"^part_ratio must be <= 1, got 2"):  # the owner's name for it
        Owner(part_ratio=2)
    with pytest.raises(ValueError, match=r"^--ratio must be <= 1, got 2"):  # alone: a flag of its own
        Part(ratio=2)


def test_engine_options_are_written_once_for_serve_train_and_the_spare_server():
    """One EngineConfig field is a ``vroll serve`` flag, a trainer ``vllm_*`` flag (TRL's spelling: keyword,
    flag and attribute) and reaches the server the trainer starts."""
    import dataclasses

    from vroll.engine.config import EngineConfig, serve_flags
    from vroll.trainer.config import GRPOConfig

    serve = ServeConfig(gpu_memory_utilization=0.5, enforce_eager=True)
    assert serve.engine == EngineConfig(gpu_memory_utilization=0.5, enforce_eager=True)
    train = GRPOConfig(vllm_gpu_memory_utilization=0.7, vllm_kv_cache_memory_gib=1.5)
    assert train.vllm_gpu_memory_utilization == 0.7 and train.vllm.kv_cache_memory_gib == 1.5
    assert GRPOConfig().vllm.gpu_memory_utilization == 0.3  # the trainer's default share
    parsed = parse_config(GRPOConfig, ["--vllm_enable_prefix_caching", "true"], "t", "")
    assert parsed.vllm.enable_prefix_caching is True
    trainer_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    serve_fields = {f.name for f in dataclasses.fields(ServeConfig)}
    for f in dataclasses.fields(EngineConfig):
        assert f"vllm_{f.name}" in trainer_fields
        assert f.name in serve_fields or f.name == "enable_sleep_mode"  # a server never sleeps
    flags = serve_flags(EngineConfig(dtype="bfloat16", enforce_eager=True, kv_cache_memory_gib=1.0))
    assert flags == ["--dtype", "bfloat16", "--enforce-eager", "--kv-cache-memory-gib", "1.0"]
    assert parse_config(ServeConfig, flags, "vroll serve", "").engine.kv_cache_memory_gib == 1.0
    with pytest.raises(ValueError, match="^vllm_gpu_memory_utilization must be in"):
        GRPOConfig(vllm_gpu_memory_utilization=2.0)
