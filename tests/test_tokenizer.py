import json
import os

import pytest

from indexcache.tokenizer import ByteTokenizer, HFTokenizer, find_tokenizer, load_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "stdlib-dsa-tiny")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] | trim }}\n{% else %}<|assistant|>{{ m['content'] }}"
    "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}")


def _write_hf_tokenizer(folder, chat_template=CHAT_TEMPLATE, generation_eos=None):
    """A small BPE tokenizer.json trained here, with special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"] * 20 +
                            ["hello world, héllo wörld ✓"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}, "unk_token": "<unk>"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    if generation_eos is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": generation_eos}, f)
    return str(folder)


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer(FIXTURE)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (260, 256, 257, [257])
    text = "def fib(n):\n    return 'é✓'\n"
    ids = tok.encode(text)
    assert ids[0] == 256 and ids[1:] == list(text.encode("utf-8"))
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [257], skip_special_tokens=False) == "<bos>" + text + "<eos>"
    assert ByteTokenizer().decode([104, 105, 258]) == "hi"  # class defaults still work without a checkpoint
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_hf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = _write_hf_tokenizer(tmp_path / "tok", generation_eos=[2, 5])
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert isinstance(ours, HFTokenizer)
    for text in ["def fib(n):\n    return n", "héllo wörld ✓ <|user|> x", ""]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.bos_token_id == ref.bos_token_id == 1 and ours.eos_token_id == ref.eos_token_id == 2
    assert ours.eos_token_ids == [2, 5]  # the tokenizer's eos plus generation_config.json's
    assert ours.vocab_size == len(ref)
    chats = [[{"role": "user", "content": " hi there "}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fib?"},
              {"role": "assistant", "content": "def fib"}, {"role": "user", "content": "more"}]]
    for messages in chats:
        for gen in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert ours.apply_chat_template(chats[0], tools=tools).endswith(json.dumps(tools))


def test_hf_tokenizer_errors(tmp_path):
    path = _write_hf_tokenizer(tmp_path / "nochat", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(path).apply_chat_template([{"role": "user", "content": "hi"}])
    bad = _write_hf_tokenizer(tmp_path / "raises", chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        load_tokenizer(bad).apply_chat_template([{"role": "user", "content": "hi"}])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(broken))
    sp_only = tmp_path / "sp"
    sp_only.mkdir()
    (sp_only / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        find_tokenizer(str(sp_only))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_tokenizer(str(empty)) is None and find_tokenizer("tiny") is None
    with pytest.raises(ValueError, match="has no tokenizer"):
        load_tokenizer(str(empty))
    (empty / "config.json").write_text(json.dumps({"tokenizer": {"type": "sentencepiece"}}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        find_tokenizer(str(empty))


def test_tokenizer_module_imports_no_engine_or_model():
    import subprocess
    import sys

    # importing the package imports the engine, so the module file is loaded alone
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', %r); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.load_tokenizer(%r).encode('x'); "
            "print([k for k in sys.modules if k.split('.')[0] in ('indexcache', 'torch', 'transformers')])"
            % (os.path.join(os.path.dirname(FIXTURE), "..", "..", "indexcache", "tokenizer.py"), FIXTURE))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_llm_text_in_text_out_on_the_fixture():
    from indexcache import LLM, SamplingParams

    llm = LLM(FIXTURE, max_model_len=256, max_num_seqs=2)
    assert isinstance(llm.tokenizer, ByteTokenizer)
    out = llm.generate("def fib(n):\n", SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert out.prompt_token_ids == [256] + list(b"def fib(n):\n")
    o = out.outputs[0]
    assert len(o.token_ids) == 6 and o.text == bytes(t for t in o.token_ids if t < 256).decode()
    stop = llm.generate("def fib(n):\n", SamplingParams(max_tokens=6, temperature=0.0, stop=["  "]))[0]
    assert stop.outputs[0].text == "" and stop.outputs[0].stop_reason == "  "


@pytest.mark.parametrize("bad", [[1, 1.7], [1, True], [1, "2"]])
def test_llm_rejects_non_integer_token_ids(bad):
    from indexcache.llm import _token_id

    with pytest.raises(ValueError, match=repr(bad[1]).replace(".", r"\.")):
        [_token_id(t, "prompt token id") for t in bad]
