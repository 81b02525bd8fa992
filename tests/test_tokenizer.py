"""Tokenizer loading, special tokens by name, configs, streaming detokenisation, and the trainer (checked against
transformers.AutoTokenizer loading the same directory)."""

import json
import random

import pytest

from svlm_jax.media.preprocess import VisionPreprocessConfig
from svlm_jax.tokenizer import QWEN_ADDED_TOKENS, GenerationDefaults, Tokenizer, train_tokenizer

CORPUS = [
    "What a strike from outside the box! The keeper had no chance.",
    "Corner kick, headed away. Possession back to the home side ...",
    "Ça y est, le but ! Él marca otra vez. Tor für München!",
    "进球了！这是一个精彩的进球。 ゴール！素晴らしい。",
    "Emoji time 😀🎉⚽ and numbers 2024, 3-1, 90+4'.",
    "  indented\tline\nnew line\r\n\nblank lines",
]

SAMPLE_TEXTS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\nTime=0.0-1.0s<|vision_start|><|video_pad|><|video_pad|><|vision_end|>Commentate<|im_end|>\n",
    "<|im_start|>assistant\n What a goal! ...<|im_end|>\n",
    "Unseen words: zyzzyva, Ωmega, naïve café, 😀⚽🏟️, 中文字符, \t\t tabs  and   spaces\n\n",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(CORPUS * 20, vocab_size=600, out_dir=directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_pretrained(model_dir)


def test_special_tokens_by_name(tokenizer):
    # Added tokens follow the BPE vocabulary in Qwen's order.
    base = tokenizer.special.endoftext
    ids = {content: base + offset for offset, (content, _) in enumerate(QWEN_ADDED_TOKENS)}
    assert tokenizer.special.im_start == ids["<|im_start|>"]
    assert tokenizer.special.im_end == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert tokenizer.special.vision_start == ids["<|vision_start|>"]
    assert tokenizer.special.vision_end == ids["<|vision_end|>"]
    assert tokenizer.special.vision_pad == ids["<|vision_pad|>"]
    assert tokenizer.special.image_pad == ids["<|image_pad|>"]
    assert tokenizer.special.video_pad == ids["<|video_pad|>"]
    assert tokenizer.pad_token_id == tokenizer.special.endoftext
    assert tokenizer.vocab_size == base + len(QWEN_ADDED_TOKENS) <= 600
    assert tokenizer.encode("<|video_pad|><|im_end|>") == [tokenizer.special.video_pad, tokenizer.special.im_end]


def test_encode_adds_nothing_and_round_trips(tokenizer):
    assert tokenizer.encode("") == []
    for text in SAMPLE_TEXTS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode(SAMPLE_TEXTS[2])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n What a goal! ...\n"


def test_agrees_with_transformers(model_dir, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert type(hf).__name__ == "Qwen2Tokenizer"
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    for content, _ in QWEN_ADDED_TOKENS:
        assert hf.convert_tokens_to_ids(content) == tokenizer.token_id(content)
    rng = random.Random()
    alphabet = "abcdefgh XYZ,.!?'\n\t中文😀éß-0123456789"
    texts = SAMPLE_TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(200)]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_missing_special_token_is_named(tmp_path, model_dir):
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|video_pad|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(KeyError, match=r"<\|video_pad\|>"):
        Tokenizer.from_pretrained(tmp_path)


def test_tokenizer_config_added_tokens_must_agree(tmp_path, model_dir):
    (tmp_path / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    first, second = sorted(decoder, key=int)[:2]
    decoder[first], decoder[second] = decoder[second], decoder[first]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="tokenizer_config.json gives"):
        Tokenizer.from_pretrained(tmp_path)


def test_model_dir_configs(tmp_path, model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((model_dir / name).read_text())
    loaded = Tokenizer.from_pretrained(tmp_path)
    # Without generation_config.json: transformers' defaults, eos from the tokenizer config.
    assert loaded.generation == GenerationDefaults(eos_token_ids=(loaded.special.im_end,))
    assert loaded.vision_preprocess is None
    # As shipped with Qwen2.5-VL-7B-Instruct (eos ids as a list), with ids of this tokenizer.
    im_end, endoftext = loaded.special.im_end, loaded.special.endoftext
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": endoftext, "pad_token_id": endoftext, "do_sample": True, "eos_token_id": [im_end, endoftext],
        "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "transformers_version": "4.41.2",
    }))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056}))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.generation == GenerationDefaults(
        do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05,
        eos_token_ids=(im_end, endoftext),
    )
    assert loaded.vision_preprocess == VisionPreprocessConfig(min_pixels=3136, max_pixels=12845056)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": endoftext}))
    assert Tokenizer.from_pretrained(tmp_path).generation.eos_token_ids == (endoftext,)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_incremental_detokenizer(tokenizer):
    rng = random.Random()
    alphabet = list("abc XYZ!,\n") + list("中文字符😀⚽🎉éßΩ")
    saw_incomplete_character = False
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = tokenizer.encode(text)
        detokenizer = tokenizer.detokenizer()
        pieces = [detokenizer.push(token_id) for token_id in ids]
        assert "".join(pieces) + detokenizer.flush() == text
        assert "".join(pieces) == text  # every character completes by the last token
        assert all("\ufffd" not in piece for piece in pieces)
        saw_incomplete_character |= "" in pieces
    # The small vocabulary splits CJK and emoji into byte tokens, so some steps must have waited.
    assert saw_incomplete_character


def test_incremental_detokenizer_special_tokens_and_flush(tokenizer):
    ids = tokenizer.encode(" Goal!<|im_end|>")
    skipping = tokenizer.detokenizer()
    assert "".join(skipping.push(i) for i in ids) == " Goal!"
    keeping = tokenizer.detokenizer(skip_special_tokens=False)
    assert "".join(keeping.push(i) for i in ids) == " Goal!<|im_end|>"
    # A character cut off mid-way is held back, then flushed as a replacement character.
    emoji_ids = tokenizer.encode("😀")
    assert len(emoji_ids) > 1
    partial = tokenizer.detokenizer()
    assert partial.push(emoji_ids[0]) == ""
    assert partial.flush() == "\ufffd"
    assert partial.push(tokenizer.encode("a")[0]) == "a"


def test_train_tokenizer_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100, out_dir=tmp_path)
