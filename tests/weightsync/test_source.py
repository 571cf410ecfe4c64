import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vroll.weightsync.source import ModelSource, checkpoint_name


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_plain_model_names_are_checkpoint_names_and_tied_weights_appear_once():
    model = tiny_llama(tie=True)
    source = ModelSource(model, torch.bfloat16)
    names = [m.name for m in source.metadata()]
    assert names == list(dict(model.named_parameters()))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert {m.dtype for m in source.metadata()} == {"bfloat16"}
    with source.gather(names[:2]) as tensors:
        assert all(t.dtype == torch.bfloat16 for t in tensors.values())
        assert torch.equal(tensors[names[0]], model.get_parameter(names[0]).detach().bfloat16())


def test_wrappers_are_unwrapped():
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = tiny_llama()
    assert [m.name for m in ModelSource(Wrapper(model), torch.float32).metadata()] == \
        [m.name for m in ModelSource(model, torch.float32).metadata()]


def test_peft_names_map_to_the_base_model():
    assert checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", True) \
        == "model.layers.0.self_attn.q_proj.weight"
    assert checkpoint_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                           True) is None
    assert checkpoint_name("base_model.model.lm_head.modules_to_save.default.weight", True) == "lm_head.weight"
    assert checkpoint_name("base_model.model.lm_head.original_module.weight", True) is None


def test_peft_sync_sends_merged_weights_and_unmerges_after():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # non-zero B: the merge must change q/v
    source = ModelSource(model, torch.float32)
    names = [m.name for m in source.metadata()]
    assert names == list(reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    with source.session(), source.gather(names) as tensors:
        lora = model.base_model.model.model.layers[0].self_attn.q_proj
        delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
        torch.testing.assert_close(tensors[q], reference[q] + delta)
        k = "model.layers.0.self_attn.k_proj.weight"
        assert torch.equal(tensors[k], reference[k])
    after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(after, reference[q])  # unmerged again


def test_peft_vlm_sync_applies_each_adapter_to_its_checkpoint_named_weight(tmp_path):
    """transformers 5 names a VLM's weights differently in memory (``model.language_model.*``) and in the
    checkpoint (``model.*``): the LoRA deltas must be keyed like the weights or they are silently lost."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    from vroll.testing import build_tiny_vlm

    base = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(tmp_path / "vlm"), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    source = ModelSource(model, torch.float32)
    q = "model.layers.0.self_attn.q_proj.weight"  # the checkpoint's name (in memory: model.language_model...)
    assert q in [m.name for m in source.metadata()]
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    with source.session(), source.gather([q]) as tensors:
        merged = tensors[q]
    expected = layer.base_layer.weight + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * 2.0
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(merged, layer.base_layer.weight, atol=1e-3)  # the adapter did reach it
