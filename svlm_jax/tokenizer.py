"""Tokenizer of a Qwen2.5-VL model directory, read with the `tokenizers` library (no transformers at run time).

Reads what a real checkpoint ships: tokenizer.json (the BPE tokenizer and its added tokens), tokenizer_config.json
(eos / pad tokens, added tokens), generation_config.json (sampling defaults) and the vision preprocessing:
video_preprocessor_config.json where the checkpoint has one (the processor of videos, which are what streaming and
training feed; Qwen3-VL's differs from its image processor), else preprocessor_config.json. Special-token ids are
looked up by name, never hard-coded. `train_tokenizer` builds a small byte-level BPE with Qwen's pipeline and special
tokens, loadable both here and by transformers.AutoTokenizer.
"""

import dataclasses
import json
import pathlib
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from svlm_jax.media.preprocess import VisionPreprocessConfig

# Qwen2's pre-tokenizer split (as in its tokenizer.json and transformers' Qwen2Tokenizer).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's added tokens in id order (151643...151664): (content, special). The first 14 are special tokens
# (skipped by decode(skip_special_tokens=True)); the tool-call and fill-in-the-middle markers are ordinary added tokens.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special tokens the streaming prompt uses, looked up by name in the tokenizer."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    vision_pad: int
    image_pad: int
    video_pad: int

    NAMES = {
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "vision_pad": "<|vision_pad|>",
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
    }


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json; missing fields take transformers' GenerationConfig defaults
    (which is what the model's authors' generation used): greedy unless do_sample, top_k 50, top_p 1, no penalty."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_generation_config(cls, config: dict, fallback_eos_ids: tuple[int, ...]) -> "GenerationDefaults":
        eos = config.get("eos_token_id")
        eos_ids = fallback_eos_ids if eos is None else tuple([eos] if isinstance(eos, int) else eos)
        defaults = cls()
        return cls(
            do_sample=bool(config.get("do_sample", defaults.do_sample)),
            temperature=float(config.get("temperature", defaults.temperature)),
            top_k=int(config.get("top_k", defaults.top_k)),
            top_p=float(config.get("top_p", defaults.top_p)),
            repetition_penalty=float(config.get("repetition_penalty", defaults.repetition_penalty)),
            eos_token_ids=tuple(int(i) for i in eos_ids),
        )


def _read_json(path: pathlib.Path) -> dict:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _token_content(value) -> str | None:
    """tokenizer_config.json spells a token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A model directory's tokenizer plus the configs around it (see the module docstring)."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        eos_token: str,
        pad_token: str | None,
        generation: GenerationDefaults | None = None,
        vision_preprocess: VisionPreprocessConfig | None = None,
        name: str = "<tokenizer>",
    ):
        self._tokenizer = tokenizer
        self.name = name
        self.special = SpecialTokenIds(
            **{field: self.token_id(token) for field, token in SpecialTokenIds.NAMES.items()}
        )
        self.eos_token_id = self.token_id(eos_token)
        self.pad_token_id = None if pad_token is None else self.token_id(pad_token)
        self.generation = generation or GenerationDefaults(eos_token_ids=(self.eos_token_id,))
        self.vision_preprocess = vision_preprocess

    @classmethod
    def from_pretrained(cls, model_dir: str | pathlib.Path) -> "Tokenizer":
        """Loads tokenizer.json, tokenizer_config.json, generation_config.json and video_preprocessor_config.json
        or preprocessor_config.json (all but the first optional) from a model directory."""
        model_dir = pathlib.Path(model_dir)
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.exists():
            raise FileNotFoundError(f"{model_dir}: no tokenizer.json")
        tokenizer = HFTokenizer.from_file(str(tokenizer_path))
        config = _read_json(model_dir / "tokenizer_config.json")
        _check_added_tokens(tokenizer, config.get("added_tokens_decoder", {}), model_dir)
        eos_token = _token_content(config.get("eos_token")) or "<|endoftext|>"
        pad_token = _token_content(config.get("pad_token"))
        result = cls(tokenizer, eos_token=eos_token, pad_token=pad_token, name=str(model_dir))
        generation_config = _read_json(model_dir / "generation_config.json")
        result.generation = GenerationDefaults.from_generation_config(
            generation_config, fallback_eos_ids=(result.eos_token_id,)
        )
        video_path, image_path = model_dir / "video_preprocessor_config.json", model_dir / "preprocessor_config.json"
        if video_path.exists():
            result.vision_preprocess = VisionPreprocessConfig.from_video_preprocessor_config(_read_json(video_path))
        elif image_path.exists():
            result.vision_preprocess = VisionPreprocessConfig.from_preprocessor_config(_read_json(image_path))
        return result

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding table may be larger)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of a token by its exact text; KeyError naming the token when the tokenizer lacks it."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{self.name}: tokenizer has no token {token!r}")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids, nothing is added implicitly."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)


def _check_added_tokens(tokenizer: HFTokenizer, added_tokens_decoder: dict, model_dir: pathlib.Path) -> None:
    """tokenizer_config.json's added tokens must agree with tokenizer.json; ones missing there are added."""
    for id_text, token in sorted(added_tokens_decoder.items(), key=lambda item: int(item[0])):
        content = token["content"]
        existing = tokenizer.token_to_id(content)
        if existing is None:
            tokenizer.add_tokens([AddedToken(content, special=bool(token.get("special", False)), normalized=False)])
            existing = tokenizer.token_to_id(content)
        if existing != int(id_text):
            raise ValueError(
                f"{model_dir}: tokenizer_config.json gives {content!r} id {id_text}, tokenizer.json gives {existing}"
            )


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, emitting text only once it is complete.

    Byte-level BPE can split one UTF-8 character over several tokens; decoding such a prefix gives U+FFFD, so
    nothing is emitted until a later token completes it. Each step decodes only the pending tokens plus those of
    the previous emission (as context), so a step costs the same however long the stream runs.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window that is decoded again
        self._read_offset = 0  # tokens before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Adds one token; returns the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            new_text = text[len(emitted) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._ids = self._ids[self._prefix_offset :]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
            return new_text
        return ""

    def flush(self) -> str:
        """Returns whatever is still pending (incomplete bytes decode to U+FFFD) and starts afresh."""
        emitted = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._ids, self._prefix_offset, self._read_offset = [], 0, 0
        return text[len(emitted) :]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | pathlib.Path) -> Tokenizer:
    """Trains a byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder on `texts`, appends Qwen's 22
    added tokens (special ones first, in Qwen's order) and saves tokenizer.json + tokenizer_config.json to out_dir.

    vocab_size bounds everything, added tokens included: the BPE part gets at most vocab_size - 22 entries (the
    256 byte symbols plus the merges the texts support; a small corpus gives fewer). The directory loads with
    Tokenizer.from_pretrained and with transformers.AutoTokenizer.
    """
    bpe_size = vocab_size - len(QWEN_ADDED_TOKENS)
    if bpe_size < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(QWEN_ADDED_TOKENS)}, got {vocab_size}")
    tokenizer = HFTokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    for content, special in QWEN_ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    added_tokens_decoder = {
        str(tokenizer.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN_ADDED_TOKENS
    }
    # The fields transformers reads, with the values of Qwen2.5-VL's own tokenizer_config.json.
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [c for c, special in QWEN_ADDED_TOKENS if special and c != "<|endoftext|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as file:
        json.dump(tokenizer_config, file, indent=2, ensure_ascii=False)
    return Tokenizer.from_pretrained(out_dir)
