"""A TRL user's script runs unchanged (issue 23): seed 000's ``train.py`` with only the import, the model and
the dataset changed (``seed_train.py`` beside this file), in both of its flows, and the rest of the
``GRPOTrainer`` surface that scripts use (conversational rewards, ``callbacks=``, ``peft_config=``,
``save_model``, ``train(resume_from_checkpoint=...)``).

The script names no server address, so it finds its server at the default one, 127.0.0.1:8000: this
module needs that port. One server runs on it for the module (the user's ``vroll vllm-serve``); the
no-server flow runs first, before that server starts.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import SERVER_FLAGS, SERVER_START_TIMEOUT_S, read_metrics
from vroll.launch import ServerProcess
from vroll.tasks.addition import addition_splits
from vroll.trainer.config import DEFAULT_SERVER_HOST, DEFAULT_SERVER_PORT, GRPOConfig
from vroll.trainer.grpo import GRPOTrainer

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("seed_train.py")
DEFAULT_URL = f"http://{DEFAULT_SERVER_HOST}:{DEFAULT_SERVER_PORT}"
POST = "SUBREDDIT: r/cats\n\nTITLE: My cat sleeps all day\n\nPOST: She sleeps twenty hours a day. Is that normal?"


def tldr_rows() -> list[dict[str, str]]:
    """trl-lib/tldr's layout (text ``prompt``, ``completion``), one row: the script's defaults make it one step.
    The prompt is the chat template's text of a request for a summary, so the model answers briefly and ends
    (a bare "TL;DR:" runs to the 64-token limit: a bf16 train phase on this AVX2 CPU took minutes a step)."""
    from transformers import AutoTokenizer

    from vroll.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    ask = [{"role": "user", "content": f"Summarize this post in one short line.\n\n{POST}"}]
    prompt = tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)
    return [{"prompt": prompt, "completion": "My cat sleeps 20 hours a day: is that normal?"}]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((DEFAULT_SERVER_HOST, port)) == 0


def require_free_default_port() -> None:
    if port_in_use(DEFAULT_SERVER_PORT):
        pytest.fail(f"port {DEFAULT_SERVER_PORT} is taken by another process: this module runs seed 000's script, "
                    f"which finds its server at the default address {DEFAULT_URL}; free the port and rerun")


def run_seed_script(cwd: Path) -> subprocess.CompletedProcess:
    """``python seed_train.py`` in ``cwd`` with the local dataset beside it, as a user runs it."""
    (cwd / "train.py").write_text(SCRIPT.read_text())
    (cwd / "tldr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tldr_rows()))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
                        "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "train.py"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SERVER_START_TIMEOUT_S)


@pytest.mark.slow
def test_the_seed_script_starts_a_server_when_none_answers_and_stops_it(tmp_path):
    """Seed 002's layout through seed 000's script: nothing at the default address, so the trainer starts
    ``vroll serve`` (CPU here), trains against it, saves, and stops it."""
    require_free_default_port()
    out = run_seed_script(tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    started = re.search(rf"no server at {DEFAULT_URL} \(\w+\): started vroll serve on CPU at (http://\S+)", log)
    assert started, log[-4000:]
    assert [r["step"] for r in read_metrics(tmp_path / "my_test")] == [1]  # logging_steps=10: the last step
    assert (tmp_path / "my_test/final/model.safetensors").exists()
    with pytest.raises(httpx.TransportError):  # the server it started is gone with it
        httpx.get(f"{started[1]}/health", timeout=2)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The user's first command, ``vroll vllm-serve`` on the default port (small CPU settings)."""
    require_free_default_port()
    log = tmp_path_factory.mktemp("default-server") / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "vroll", "vllm-serve", "--port", str(DEFAULT_SERVER_PORT),
                             *SERVER_FLAGS], stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = ServerProcess(DEFAULT_URL, proc, log)
    try:
        server.wait_ready(SERVER_START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_the_seed_script_trains_against_the_server_on_the_default_port(default_server, tmp_path):
    """Seed 000's two commands: the server is up first, the script finds it, trains against it and syncs it
    (vroll used to start a second server and leave this one at weight version 0)."""
    before = default_server.client().info().weight_version
    out = run_seed_script(tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"found a generation server at {DEFAULT_URL}: training against it" in log, log[-4000:]
    assert "started vroll serve" not in log
    # pushed before the first generation, and at the end
    assert default_server.client().info().weight_version == before + 2
    assert (tmp_path / "my_test/final/model.safetensors").exists()


def config(out: Path, **kw) -> GRPOConfig:
    """No server address: the trainer finds the module's server at the default one."""
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, seed=3, logging_steps=1, save_only_model=True, save_final_model=False)
    return GRPOConfig(**(base | kw))


@pytest.mark.slow
def test_a_trl_reward_for_conversational_data_trains(default_server, tmp_path):
    """TRL's reward functions index chat completions as messages and read trainer_state and completion_ids."""
    seen = {}

    def reply_length(completions, completion_ids, trainer_state, answer, **kwargs):
        seen.update(first=completions[0], step=trainer_state.global_step, ids=completion_ids[0], answer=answer[0])
        return [float(len(completion[0]["content"])) for completion in completions]

    rows = addition_splits(seed=1, train_size=8, test_size=0)[0]  # chat prompts
    GRPOTrainer(model="smollm2-135m", reward_funcs=reply_length, args=config(tmp_path), train_dataset=rows).train()
    [row] = read_metrics(tmp_path)
    assert row["reward/reply_length/mean"] > 0
    assert seen["first"][0]["role"] == "assistant" and isinstance(seen["first"][0]["content"], str)
    assert seen["step"] == 0 and all(isinstance(i, int) for i in seen["ids"]) and seen["answer"].isdigit()


@pytest.mark.slow
def test_callbacks_peft_config_save_model_and_resume(default_server, tmp_path):
    """TRL's surface: a TrainerCallback gets its events and stops the run early, a vroll callable runs beside
    it, a peft LoraConfig trains adapters, save_model writes them, and train(resume_from_checkpoint=True)
    continues from the latest checkpoint."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    events: list[str] = []
    lora_b: list[float] = []

    def lora_b_sum(model) -> float:  # fresh adapters start with B = 0
        return sum(float(p.detach().abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)

    class StopAfterTwo(TrainerCallback):
        def __getattribute__(self, name):  # records every event the trainer calls
            if name.startswith("on_"):
                events.append(name)
            return super().__getattribute__(name)

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2
            return control

    class LoraB(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            lora_b.append(lora_b_sum(model))

    rows = addition_splits(seed=1, train_size=16, test_size=0)[0]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    steps: list[int] = []
    args = config(tmp_path, max_steps=3, save_only_model=False, learning_rate=1e-3)
    # vowel_share tells almost any two replies apart: every step has a gradient (8-token additions all score 0)
    trainer = GRPOTrainer(model="smollm2-135m", reward_funcs="vowel_share", args=args, train_dataset=rows,
                          peft_config=lora, callbacks=[StopAfterTwo, lambda t, m: steps.append(t.state.global_step)])
    trainer.train()
    trained_b = lora_b_sum(trainer.accelerator.unwrap_model(trainer.model))
    assert trained_b > 0
    assert steps == [1, 2] and trainer.state.global_step == 2  # stopped by the callback, before max_steps
    assert [e for e in events if e in ("on_init_end", "on_train_begin", "on_train_end")] == [
        "on_init_end", "on_train_begin", "on_train_end"]
    assert events.count("on_step_end") == 2 and events.count("on_log") == 2 and events.count("on_save") == 1
    assert json.loads((tmp_path / "config.json").read_text())["lora_r"] == 4  # the peft_config, as trained
    trainer.save_model(str(tmp_path / "saved"))
    trainer.save_model()
    for folder in (tmp_path / "saved", tmp_path):
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(TypeError, match="trainer.add_callback"):
        trainer.add_callback(42)

    resumed = GRPOTrainer(model="smollm2-135m", reward_funcs="vowel_share", args=config(
        tmp_path, max_steps=3, save_only_model=False, learning_rate=1e-3), train_dataset=rows, peft_config=lora,
        callbacks=[LoraB()])
    resumed.train(resume_from_checkpoint=True)  # checkpoint-2, the latest
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert lora_b[0] == pytest.approx(trained_b, rel=1e-5)  # the checkpoint's adapters, not fresh ones (B = 0)
