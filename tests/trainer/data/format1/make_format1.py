"""How ``boundary/`` and ``mid_batch/`` were written: vroll a231a61's own ``save_checkpoint`` (format 1).

    git worktree add /tmp/a231a61 a231a61 && PYTHONPATH=/tmp/a231a61/src python make_format1.py .

A tiny Llama (so the files stay small), one AdamW and scheduler step, and the RNG seeded with 1234
before the save; ``mid_batch`` also holds a pickled ``GenerationBatch`` of one ``GRPOMicroBatch``.
It printed 0.028979241847991943: the first ``torch.rand(1)`` after the save, which a resume reproduces.
Not a test (and not runnable against this vroll: it imports format 1's module paths).
"""
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler
from vroll.trainer.checkpoint import TrainerState, save_checkpoint
from vroll.trainer.policy import pad_batch

from vroll.trainer.base import GenerationBatch
from vroll.trainer.grpo import GRPOMicroBatch


class NoTokenizer:
    def save_pretrained(self, path):  # the state files are what matters here
        pass


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


out = Path(sys.argv[1])
acc = Accelerator(cpu=True)
model = tiny()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
opt.step()
sched.step()
opt.zero_grad()
torch.manual_seed(1234)
state = TrainerState(global_step=1, micro_step=1, generation=1, sampler={"epoch": 0, "index": 4})
save_checkpoint(out / "boundary", acc, model, NoTokenizer(), opt, sched, state, False, extra={"generation_batch": None})
batch = pad_batch([[1, 2], [3]], [[4, 5], [6]], 0)
mb = GRPOMicroBatch(batch, torch.tensor([0.5, -0.5]), None, None, None, 3.0, 2, 3.0)
save_checkpoint(out / "mid_batch", acc, model, NoTokenizer(), opt, sched, state, False,
                extra={"generation_batch": GenerationBatch([mb], {"reward/mean": 0.5})})
print(torch.rand(1).item())  # the stream after the save: what a resume must reproduce
