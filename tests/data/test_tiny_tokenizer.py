from transformers import AutoTokenizer

from data.tiny_tokenizer import build_tokenizer


def test_special_tokens(tok_bos):
    assert tok_bos.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tok_bos.pad_token_id != tok_bos.eos_token_id
    assert 500 <= len(tok_bos) <= 2000


def test_bos_from_post_processor_or_template(tok_bos, tok_template_bos):
    prompt = "Sort the letters: c a b"
    assert tok_bos(prompt).input_ids[0] == tok_bos.bos_token_id
    assert tok_template_bos(prompt).input_ids[0] != tok_template_bos.bos_token_id
    messages = [{"role": "user", "content": prompt}]
    text_a = tok_bos.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text_b = tok_template_bos.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text_a == "<|user|>\nSort the letters: c a b</s>\n<|assistant|>\n"
    assert text_b == "<s>" + text_a


def test_deterministic_and_saved(tmp_path, tok_bos):
    again = build_tokenizer(tmp_path, add_bos=True, chat_template=True)
    assert again.get_vocab() == tok_bos.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Sort the letters: q e b m\nb e m q"
    assert loaded(text).input_ids == tok_bos(text).input_ids
    assert loaded.chat_template == tok_bos.chat_template
    assert loaded.pad_token == "<pad>"


def test_task_text_is_short(tok_bos):
    ids = tok_bos("Sort the letters: q e b m x z").input_ids
    assert len(ids) < 15
