"""The random-weight model builders of ``vroll.testing`` (tiny VLMs; the text builder runs in the trainer tests)."""

import pytest

from vroll.testing import vlm


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vlm")
    return {fam: str(vlm.build_tiny_vlm(root / fam, family=fam)) for fam in vlm.VLM_FAMILIES}


def _image_prompt(tok) -> str:
    return tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", vlm.VLM_FAMILIES)
def test_tiny_vlm_loads_back_with_consistent_ids(tiny_vlms, family):
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    path = tiny_vlms[family]
    config, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    assert config.model_type == family and config.text_config.vocab_size == len(tok)
    ids = tok.convert_tokens_to_ids(list(vlm.VISION_TOKENS))
    assert ids == [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id,
                   config.video_token_id]
    assert len(set(ids)) == 4 and tok.unk_token_id not in ids
    text = _image_prompt(tok)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in text and text.endswith("assistant\n")
    assert tok(text).input_ids.count(config.image_token_id) == 1  # one placeholder, as the engine expects
    assert tok.eos_token_id == config.text_config.eos_token_id
    proc = AutoImageProcessor.from_pretrained(path)  # the PIL twin where torchvision is missing
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (56 * 56, 224 * 224)


def test_tiny_vlm_forward_sees_the_image(tiny_vlms):
    """The saved weights load into transformers' model class, and the image moves the logits."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = tiny_vlms["qwen2_5_vl"]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    tok, proc = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    last = []
    for color in ((255, 0, 0), (0, 0, 255)):
        px = proc(images=[Image.new("RGB", (112, 112), color)], return_tensors="pt")
        n_tokens = int(px["image_grid_thw"].prod()) // 4
        assert n_tokens == 16  # 112x112: 8x8 patches of 14 px, merged 2x2
        ids = tok(_image_prompt(tok).replace("<|image_pad|>", "<|image_pad|>" * n_tokens),
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                        mm_token_type_ids=(ids == model.config.image_token_id).long())
        last.append(out.logits[0, -1].log_softmax(-1))
    assert (last[0] - last[1]).abs().max() > 0.1  # a different image gives a different next-token distribution


def test_3b_config_is_qwen2_5_vl_3b_shaped():
    tok = vlm.vlm_tokenizer()
    cfg = vlm.vlm_config("qwen2_5_vl", "3b", tok)
    text, vision = cfg.text_config, cfg.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (2048, 36, 16, 2, 11008)
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.window_size,
            list(vision.fullatt_block_indexes)) == (32, 1280, 2048, 112, [7, 15, 23, 31])
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="family must be one of"):
        vlm.vlm_config("llava", "tiny", tok)
