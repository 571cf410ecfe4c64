"""Checkpoints as versioned plain state: what a run has pending is written as tensors, numbers and strings,
read back with ``torch.load(weights_only=True)``; checkpoints of format 1 (pickled trainer objects, before
2026-12-07) load where they hold no pickled batches, and are refused naming their format where they do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

from vroll.environments import EpisodeInfo
from vroll.generation.async_generation import AsyncState, Generated
from vroll.generation.planning import Planned
from vroll.generation.rollout import Rollout
from vroll.protocol import ChatMessage, PromptInput, SamplingSpec
from vroll.trainer.base import GenerationBatch
from vroll.trainer.bookkeeping.checkpoint import FORMAT, TrainerState, load_checkpoint, save_checkpoint
from vroll.trainer.bookkeeping.state import from_state, to_state, type_table
from vroll.trainer.grpo import GRPOMicroBatch, GRPOTrainer
from vroll.trainer.logps import pad_batch

FORMAT1 = Path(__file__).parent / "data" / "format1"
TYPES = type_table(GRPOTrainer.state_types)


def _tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """The model, optimizer and scheduler of ``data/format1/make_format1.py``, before any step."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)


def _pending() -> tuple[GenerationBatch, AsyncState]:
    """A generation batch cut by a save, and async batches generated ahead (an image, an episode, a seed)."""
    batch = pad_batch([[1, 2], [3]], [[4, 5], [6]], 0, [[1, 0], [1]])
    mb = GRPOMicroBatch(batch, torch.tensor([0.5, -0.5]), None, torch.zeros(2, 2), torch.ones(2, 2), 3.0, 2, 3.0)
    image = Image.new("RGB", (4, 3), (10, 20, 30))
    prompt = PromptInput([1, 9, 2], (image,))
    episode = EpisodeInfo((ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="4")), 1,
                          1.0, None, (1, 0))
    rollout = Rollout([[1, 9, 9, 2]], [[5]], [[1]], ["4"], [[-0.25]], [False], [3], 1.5, [prompt], [episode])
    sampling = SamplingSpec(n=1, temperature=0.7, max_tokens=8, stop=("\n",), seed=12)
    planned = Planned(4, [7], [prompt], sampling, {"epoch": 0, "index": 3})
    return (GenerationBatch([mb], {"reward/mean": 0.5}),
            AsyncState(3, 5, [Generated(planned, rollout, [3])], {"epoch": 1, "index": 0}, dropped_total=2))


def test_pending_batches_are_plain_state_and_come_back_equal(tmp_path):
    generation_batch, ahead = _pending()
    file = tmp_path / "rng.pt"
    torch.save({"generation_batch": to_state(generation_batch, TYPES), "async": to_state(ahead, TYPES)}, file)
    saved = torch.load(file, weights_only=True)  # no class in the file: nothing to unpickle but data
    batch = from_state(saved["generation_batch"], TYPES)
    [mb], [want] = batch.micro_batches, generation_batch.micro_batches
    assert batch.metrics == {"reward/mean": 0.5} and mb.num_items == 3.0 and mb.old_logps is None
    assert torch.equal(mb.batch.input_ids, want.batch.input_ids) and torch.equal(mb.advantages, want.advantages)
    assert torch.equal(mb.batch.completion_mask, want.batch.completion_mask)
    back = from_state(saved["async"], TYPES)
    [gen], [orig] = back.batches, ahead.batches
    assert (back.pushes, back.next_index, back.dropped_total, back.sampler) == (3, 5, 2, {"epoch": 1, "index": 0})
    assert gen.plan.sampling == orig.plan.sampling and gen.plan.rows == [7] and gen.versions == [3]
    assert gen.rollout.episodes == orig.rollout.episodes and gen.rollout.completion_mask == [[1]]
    assert gen.rollout.prompts[0].images[0].tobytes() == orig.rollout.prompts[0].images[0].tobytes()  # lossless


def test_an_unlisted_type_is_refused_when_saving_not_when_resuming():
    class Mine:
        pass

    with pytest.raises(TypeError, match="cannot store a Mine"):
        to_state({"x": Mine()}, TYPES)
    with pytest.raises(TypeError, match="GRPOMicroBatch is not among the trainer's state types"):
        to_state(_pending()[0], type_table(GRPOTrainer.__mro__[1].state_types))  # the base trainer's: no GRPO
    with pytest.raises(ValueError, match="holds a Renamed, which this trainer does not know"):
        from_state({"__type__": "Renamed"}, TYPES)


def test_a_checkpoint_names_its_format_and_loads_with_weights_only(tmp_path):
    acc = Accelerator(cpu=True)
    model, optimizer, scheduler = _tiny()
    torch.manual_seed(7)
    extra = {"generation_batch": to_state(_pending()[0], TYPES)}
    save_checkpoint(tmp_path / "c", acc, model, _NoTokenizer(), optimizer, scheduler, TrainerState(global_step=2),
                    False, extra=extra)
    after_save = torch.rand(1)
    assert json.loads((tmp_path / "c" / "trainer_state.json").read_text())["checkpoint_format"] == FORMAT == 2
    state, saved = load_checkpoint(tmp_path / "c", acc, optimizer, scheduler)
    assert state.global_step == 2 and torch.equal(torch.rand(1), after_save)  # the RNG is where it was
    assert from_state(saved["generation_batch"], TYPES).metrics == {"reward/mean": 0.5}


def test_a_format_1_checkpoint_at_a_step_boundary_still_loads():
    acc = Accelerator(cpu=True)
    _, optimizer, scheduler = _tiny()
    state, extra = load_checkpoint(FORMAT1 / "boundary", acc, optimizer, scheduler)
    assert (state.global_step, state.generation, state.sampler) == (1, 1, {"epoch": 0, "index": 4})
    assert extra == {"generation_batch": None} and scheduler.last_epoch == 1 and optimizer.state
    assert torch.rand(1).item() == pytest.approx(0.028979241847991943)  # what format 1's writer drew next


def test_a_format_1_checkpoint_with_pickled_batches_is_refused_naming_its_format(tmp_path):
    acc = Accelerator(cpu=True)
    _, optimizer, scheduler = _tiny()
    with pytest.raises(ValueError, match=r"checkpoint of format 1 .*GenerationBatch.*--model_name_or_path"):
        load_checkpoint(FORMAT1 / "mid_batch", acc, optimizer, scheduler)
    future = tmp_path / "future"
    shutil.copytree(FORMAT1 / "boundary", future)
    (future / "trainer_state.json").write_text(json.dumps({"checkpoint_format": 9, "global_step": 1}))
    with pytest.raises(ValueError, match="is a checkpoint of format 9; this vroll reads formats 1 and 2"):
        load_checkpoint(future, acc, optimizer, scheduler)


class _NoTokenizer:
    def save_pretrained(self, path: object) -> None:  # the state files are what these tests read
        pass
