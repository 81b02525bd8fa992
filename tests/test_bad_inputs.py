"""Broken inputs at the boundaries (issue 28): config.json, checkpoints and output directories, JSONL
samples, the training config's out_dir, video sources. Each must end in one of the user-error classes
with a message naming the file (and field or line), which `svlm` prints as one `svlm: error:` line and
exit 1: never a traceback. Property-based cases (hypothesis, derandomized) plus one hand-written case
for each kind the issue lists."""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import svlm_jax
from svlm_jax import cli
from svlm_jax.config import ConfigError, ModelConfig, tiny
from svlm_jax.media.video import VideoError, VideoReader
from svlm_jax.model.params import param_leaves
from svlm_jax.stream_defaults import FILE_NAME as STREAM_FILE
from svlm_jax.stream_defaults import StreamDefaults
from svlm_jax.stream_format import CachePolicy
from svlm_jax.train import data
from svlm_jax.train.config import TrainConfigError, load_config
from svlm_jax.weights import CheckpointError, check_output_dir

DEMO = Path(svlm_jax.__file__).parent / "assets" / "demo_model"
USER_ERRORS = cli.user_errors()
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_cli(argv, capsys) -> str:
    """`svlm ARGV` in-process: asserts exit 1 and exactly one `svlm: error:` line; returns that line."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("svlm: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- config.json ---------------------------------------------------------------------------------

CONFIGS = {"qwen2_5_vl": json.loads((DEMO / "config.json").read_text()),
           "qwen2_vl": tiny("qwen2_vl").to_dict()}

# Values a field may be swapped for: wrong types, nulls, containers, huge and tiny numbers.
JUNK = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8), st.sampled_from(["4", "four", "", "true", "null"]),
    st.integers(-3, 3), st.sampled_from([-(2**40), 2**31, 2**63, 10**400 // 10**300]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, -1.0, 1e300, 1e-300]),
    st.lists(st.integers(-2, 20), max_size=4), st.dictionaries(st.sampled_from(["a", "depth"]), st.integers(), max_size=2),
)


def key_paths(node, prefix=()):
    """Every (path to a value) in a nested JSON object, containers included."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from key_paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from key_paths(v, prefix + (i,))


def broken(draw, cfg, new_keys=()):
    """`cfg` with 1-3 edits: a value swapped for junk, a key deleted, or (given `new_keys`) one added."""
    for _ in range(draw(st.integers(1, 3))):
        paths = list(key_paths(cfg))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = cfg
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["junk", "delete", *(["add"] if new_keys else [])]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(new_keys))] = draw(JUNK)
        else:
            parent[path[-1]] = draw(JUNK)
    return cfg


@st.composite
def broken_configs(draw):
    """A valid config.json, broken."""
    return broken(draw, copy.deepcopy(CONFIGS[draw(st.sampled_from(sorted(CONFIGS)))]))


def copy_of_demo(tmp_path_factory, name: str) -> Path:
    """A copy of the bundled checkpoint (config, weights, tokenizer, stream defaults) to break."""
    path = tmp_path_factory.mktemp(name) / "ckpt"
    shutil.copytree(DEMO, path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return copy_of_demo(tmp_path_factory, "model")


def write_config(model_dir: Path, cfg) -> Path:
    path = model_dir / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@FUZZ
@given(cfg=broken_configs())
def test_fuzz_config_json(cfg, tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("cfg"), cfg)
    try:
        loaded = ModelConfig.from_file(path)
    except ConfigError as error:
        assert str(path) in str(error)
        return
    # Accepted: then it describes a model whose shapes can be computed.
    assert loaded.text.head_dim >= 1 and loaded.vision.head_dim >= 1
    param_leaves(loaded)


@FUZZ
@given(cfg=broken_configs(), cut=st.floats(0, 1))
def test_fuzz_config_text_through_cli(cfg, cut, model_dir, capsys):
    """Whole `svlm info DIR` runs on broken (and truncated) config files: an error line or a report."""
    text = json.dumps(cfg)
    if cut < 0.3:
        text = text[: int(len(text) * cut / 0.3)]
    (model_dir / "config.json").write_text(text)
    capsys.readouterr()
    rc = cli.main(["info", str(model_dir)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc != 0:
        assert rc == 1 and err.startswith("svlm: error:") and "config.json" in err, err


@pytest.mark.parametrize("edit,field,expected", [
    (lambda c: c["vision_config"].update(depth="2"), "vision_config.depth", "a positive integer"),
    (lambda c: c["vision_config"].update(depth=True), "vision_config.depth", "a positive integer"),
    (lambda c: c["text_config"].update(num_hidden_layers=None), "text_config.num_hidden_layers", "a positive integer"),
    (lambda c: c["text_config"].update(hidden_size=-128), "text_config.hidden_size", "a positive integer"),
    (lambda c: c["text_config"].update(vocab_size=2**40), "text_config.vocab_size", "a positive integer no larger than 2147483647"),
    (lambda c: c.update(vision_config=None), "vision_config", "an object"),
    (lambda c: c.update(vision_config=[1, 2]), "vision_config", "an object"),
    (lambda c: c.update(text_config=["x"]), "text_config", "an object"),
    (lambda c: c["text_config"].update(rope_parameters=[1]), "text_config.rope_parameters", "an object"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 6]),
     "text_config.rope_parameters.mrope_section", "a list of 3 non-negative integers"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_theta="big"),
     "text_config.rope_parameters.rope_theta", "a positive number"),
    (lambda c: c["text_config"].update(rms_norm_eps=float("nan")), "text_config.rms_norm_eps", "a positive number"),
    (lambda c: c["vision_config"].update(fullatt_block_indexes=[0.5]), "vision_config.fullatt_block_indexes",
     "a list of non-negative integers"),
    (lambda c: c.update(tie_word_embeddings="false"), "tie_word_embeddings", "true or false"),
    (lambda c: c.update(image_token_id=-1), "image_token_id", "a non-negative integer"),
])
def test_config_field_errors_name_the_field(edit, field, expected, model_dir, capsys):
    cfg = copy.deepcopy(CONFIGS["qwen2_5_vl"])
    edit(cfg)
    path = write_config(model_dir, cfg)
    line = run_cli(["info", model_dir], capsys)
    assert str(path) in line and f"{field} must be {expected}" in line, line


def test_config_whole_file_errors(model_dir, capsys):
    path = model_dir / "config.json"
    cases = {b"": "is empty", b"  \n": "is empty", b"[1, 2]": "expected a JSON object at the top level",
             b'{"model_type": ': "is not valid JSON", b"\xff\xfe{}": "is not UTF-8", b"null": "top level"}
    for content, message in cases.items():
        path.write_bytes(content)
        line = run_cli(["info", model_dir], capsys)
        assert str(path) in line and message in line, line


# ---- stream_config.json (a checkpoint's stream defaults) -----------------------------------------------

STREAM_CONFIG = json.loads((DEMO / STREAM_FILE).read_text())


@st.composite
def broken_stream_configs(draw):
    """The bundled stream_config.json, broken, unknown keys added too."""
    return broken(draw, copy.deepcopy(STREAM_CONFIG), new_keys=["vision_window", "sampling", "fps", "Query"])


@pytest.fixture(scope="module")
def stream_model_dir(tmp_path_factory):
    """Another copy, whose stream_config.json the tests break."""
    return copy_of_demo(tmp_path_factory, "stream_model")


@FUZZ
@given(cfg=broken_stream_configs(), cut=st.floats(0, 1))
def test_fuzz_stream_config(cfg, cut, stream_model_dir, capsys):
    """`StreamDefaults.from_dir` and `svlm info` on broken and truncated files: an error naming the file,
    or defaults of the right types that the CLI reports."""
    text = json.dumps(cfg)
    if cut < 0.3:
        text = text[: int(len(text) * cut / 0.3)]
    path = stream_model_dir / STREAM_FILE
    path.write_text(text)
    try:
        loaded = StreamDefaults.from_dir(stream_model_dir)
    except ConfigError as error:
        assert str(path) in str(error)
        assert run_cli(["info", stream_model_dir], capsys).startswith(f"svlm: error: {path}")
        return
    assert isinstance(loaded.policy, CachePolicy) and 1 <= loaded.min_pixels <= loaded.max_pixels
    assert isinstance(loaded.previous_text, str) and isinstance(loaded.query, str)
    capsys.readouterr()
    assert cli.main(["info", str(stream_model_dir)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ('{"policy": {"text_sink": "64"}}', "policy.text_sink must be a non-negative integer, got \"64\""),
    ('{"policy": {"fps": null}}', "policy.fps must be a non-negative integer, got null"),
    ('{"policy": {"fps": 0}}', "fps must be a whole number >= 1"),
    ('{"policy": {"vision_window": 8}}', "unknown field(s) policy.vision_window"),
    ('{"policy": [8]}', "policy must be an object"),
    ('{"previous_text": 3}', "previous_text must be a string, got 3"),
    ('{"max_pixels": 1.5}', "max_pixels must be a positive integer"),
    ('{"min_pixels": 900, "max_pixels": 800}', "min_pixels (900) must be at least 1 and at most max_pixels (800)"),
    ('{"sampling": {}}', "unknown field(s) sampling"),
    ('[]', "expected a JSON object at the top level"),
    ('{"query": ', "is not valid JSON"),
    ('', "is not valid JSON"),
])
def test_stream_config_errors_name_the_file_and_field(content, message, stream_model_dir, capsys):
    path = stream_model_dir / STREAM_FILE
    path.write_text(content)
    for argv in (["info", stream_model_dir], ["stream", "--model", stream_model_dir, "--video", DEMO / "none.mp4"]):
        line = run_cli(argv, capsys)
        assert line.startswith(f"svlm: error: {path}: ") or line.startswith(f"svlm: error: {path} "), line
        assert message in line, line


def test_valid_configs_still_read(hf_checkpoint):
    """HF parity is kept: transformers' own config files read as before."""
    _, hf_model, path = hf_checkpoint
    cfg = ModelConfig.from_file(path)
    assert cfg.text.hidden_size == hf_model.config.text_config.hidden_size
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    nulls = {**cfg.to_dict(), "rope_scaling": None}
    nulls["text_config"] = {**nulls["text_config"], "num_key_value_heads": None, "sliding_window": None}
    assert ModelConfig.from_dict(nulls).text.num_kv_heads == cfg.text.num_heads


# ---- checkpoints and output directories ----------------------------------------------------------

@pytest.fixture(scope="module")
def demo_model():
    return svlm_jax.load_pretrained(DEMO, dtype="float32")


def test_export_to_an_existing_file(demo_model, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("precious")
    with pytest.raises(CheckpointError, match=f"{target}: it is an existing file"):
        svlm_jax.save_pretrained(demo_model, target)
    with pytest.raises(CheckpointError, match=f"{target / 'sub'}"):
        svlm_jax.save_pretrained(demo_model, target / "sub")
    assert target.read_text() == "precious"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_dir(tmp_path, monkeypatch, code):
    """A read-only file system or a directory not ours (simulated: tests may run as root)."""
    real = Path.write_bytes

    def refuse(self, content):
        if self.parent == tmp_path / "out":
            raise OSError(code, os.strerror(code), str(self))
        return real(self, content)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(CheckpointError, match=f"cannot write to the checkpoint directory {tmp_path / 'out'}: "
                                              f"{os.strerror(code)}"):
        check_output_dir(tmp_path / "out")


def test_full_disk_while_exporting_leaves_the_old_export(demo_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    svlm_jax.save_pretrained(demo_model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import svlm_jax.weights as weights

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(weights, "save_file", full)
    with pytest.raises(CheckpointError, match=f"cannot write {out / 'model-00001-of-'}.*No space left on device"):
        svlm_jax.save_pretrained(demo_model, out, max_shard_size="1MB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, old files intact


@pytest.mark.parametrize("corrupt", [
    lambda b: b"", lambda b: b[:7], lambda b: b[:100], lambda b: b[: len(b) // 2], lambda b: b[:-1],
    lambda b: np.random.default_rng(0).bytes(5000), lambda b: (2**60).to_bytes(8, "little") + b[8:],
    lambda b: b[:8] + b"{" * (int.from_bytes(b[:8], "little")) + b[8 + int.from_bytes(b[:8], "little"):],
])
def test_corrupt_safetensors(corrupt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(DEMO, path)
    weights_file = path / "model.safetensors"
    weights_file.write_bytes(corrupt(weights_file.read_bytes()))
    with pytest.raises(CheckpointError, match=f"{weights_file} is corrupt or truncated"):
        svlm_jax.load_pretrained(path)


@pytest.mark.parametrize("index", ["", "[]", '{"weight_map": []}', '{"weight_map": {"a": 3}}',
                                   '{"weight_map": {"a": "../x.safetensors"}}', "{"])
def test_corrupt_index(index, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(DEMO, path)
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=f"{path / 'model.safetensors.index.json'} is not a valid"):
        svlm_jax.load_pretrained(path)


def write_video(path: Path, seconds: int = 2) -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(4 * seconds):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_stream_with_a_truncated_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt"
    shutil.copytree(DEMO, path)
    weights_file = path / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1000])
    line = run_cli(["stream", "--model", path, "--video", write_video(tmp_path / "v.mp4")], capsys)
    assert f"{weights_file} is corrupt or truncated" in line


# ---- video sources --------------------------------------------------------------------------------

def test_zero_byte_video(tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=f"{empty}: the file is empty"):
        VideoReader(empty)
    assert "the file is empty (0 bytes)" in run_cli(["stream", "--model", DEMO, "--video", empty], capsys)


def test_unknown_format(tmp_path, capsys):
    video = write_video(tmp_path / "v.mp4")
    with pytest.raises(VideoError, match="unknown container format 'mpegt'; did you mean mpegts"):
        VideoReader(video, format="mpegt")
    line = run_cli(["stream", "--model", DEMO, "--video", video, "--format", "no-such-format"], capsys)
    assert "unknown container format 'no-such-format'" in line


def test_video_path_is_a_directory(tmp_path):
    with pytest.raises(VideoError, match="is a directory"):
        VideoReader(tmp_path)


# ---- JSONL samples --------------------------------------------------------------------------------

GOOD_SAMPLE = {"video": "v.mp4", "video_start": 1.0, "video_end": 4.0, "previous": "Red passes.",
               "text_stream": [[1.1, 1.4, "Blue"], [1.5, 2.0, "shoots!"], [3.2, 3.9, "Goal!"]],
               "qa_stream": [[2.5, 2.6, "Who scored?", "Red did."]]}


def write_samples(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@st.composite
def broken_samples(draw):
    """A valid sample line with 1-3 edits (swaps, deletions, entries shortened), possibly truncated."""
    sample = copy.deepcopy(GOOD_SAMPLE)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(key_paths(sample)) or [("video",)]))
        parent = sample
        try:
            for part in path[:-1]:
                parent = parent[part]
            action = draw(st.sampled_from(["swap", "delete", "append"]))
            if action == "delete" or isinstance(parent, dict) and action == "append":
                del parent[path[-1]]
            elif action == "append" and isinstance(parent, list):
                parent.append(draw(JUNK))
            else:
                parent[path[-1]] = draw(JUNK)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed the path
            pass
    line = json.dumps(sample)
    cut = draw(st.floats(0, 1))
    return line[: int(len(line) * cut / 0.2)] if cut < 0.2 else line


@FUZZ
@given(line=broken_samples())
def test_fuzz_jsonl_samples(line, tmp_path_factory):
    path = write_samples(tmp_path_factory.mktemp("jsonl") / "train.jsonl", json.dumps(GOOD_SAMPLE), line)
    try:
        samples = data.read_samples(path)
    except data.DataError as error:
        assert f"{path}:2: " in str(error), error
        return
    for sample in samples:  # accepted: then usable
        assert 1 <= sample.n_seconds and all(isinstance(w, str) for _, _, w in sample.words)
        assert all(math.isfinite(t) for w in sample.words for t in w[:2])


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(text_stream=[[1.1, "Blue"]]), "text_stream[0] must be [start, end, word]"),
    (lambda s: s["text_stream"].append([1.1, 1.2, 7]), "text_stream[3] must be [start, end, word]"),
    (lambda s: s["text_stream"].append(["one", 1.2, "x"]), "text_stream[3] must be [start, end, word]"),
    (lambda s: s.update(video_end="four"), 'video_end must be a non-negative number of seconds, got "four"'),
    (lambda s: s.update(video_start=None), "video_start must be a non-negative number of seconds, got null"),
    (lambda s: s.update(video_start=True), "video_start must be a non-negative number of seconds, got true"),
    (lambda s: s.update(video_end=1e12), "at most"),
    (lambda s: s.update(previous=None), "previous must be a string"),
    (lambda s: s.update(previous=["a"]), "previous must be a string"),
    (lambda s: s.update(qa_stream=[[2.5, 2.6, "Who?"]]), "qa_stream[0] must be [start, end, question, answer]"),
    (lambda s: s.update(qa_stream={"q": "a"}), "qa_stream must be a list of"),
    (lambda s: s.update(text_stream=None), "text_stream must be a list of"),
    (lambda s: s.update(video=3), "video must be a non-empty path string"),
    (lambda s: s.pop("video"), "missing fields ['video']"),
])
def test_sample_errors_name_line_and_field(edit, message, tmp_path, capsys):
    bad = copy.deepcopy(GOOD_SAMPLE)
    edit(bad)
    path = write_samples(tmp_path / "train.jsonl", json.dumps(GOOD_SAMPLE), "", json.dumps(bad))
    with pytest.raises(data.DataError) as error:
        data.read_samples(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value), error.value


def test_sample_file_errors(tmp_path):
    path = tmp_path / "train.jsonl"
    cases = {b"": "no samples (the file is empty)", b"\n\n": "no samples",
             b'{"video": "v.mp4",\n': ":1: not valid JSON", b"[1]\n": ":1: a sample must be a JSON object",
             b"\xff\n": ":1: not UTF-8"}
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(data.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            data.read_samples(path)
    with pytest.raises(data.DataError, match="no such samples file"):
        data.read_samples(tmp_path / "missing.jsonl")


# ---- the training config's out_dir ---------------------------------------------------------------

def train_config(tmp_path: Path, out_dir: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f'[model]\ntokenizer = "tok"\npreset = "tiny"\n[data]\ntrain = "train.jsonl"\n'
                    f'buckets = [[300, 96]]\n[train]\nout_dir = "{out_dir}"\nsteps = 1\n')
    return path


def test_train_out_dir_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    line = run_cli(["train", "--config", train_config(tmp_path, "taken")], capsys)
    assert "run.toml" in line and f"train.out_dir {tmp_path / 'taken'} is an existing file" in line
    with pytest.raises(TrainConfigError, match="cannot be created"):
        load_config(train_config(tmp_path, "taken/run"))


def test_train_out_dir_read_only(tmp_path, monkeypatch, capsys):
    import svlm_jax.train.config as train_config_module

    monkeypatch.setattr(train_config_module.os, "access", lambda path, mode: False)
    line = run_cli(["train", "--config", train_config(tmp_path, "runs/a")], capsys)
    assert f"train.out_dir {tmp_path / 'runs' / 'a'} is not writable" in line
    monkeypatch.undo()
    assert load_config(train_config(tmp_path, "runs/a")).train.out_dir == str(tmp_path / "runs" / "a")


def test_user_error_classes_are_reported():
    """Every user-error class is one the CLI reports (no new exception types escape)."""
    for cls in (ConfigError, CheckpointError, data.DataError, TrainConfigError, VideoError):
        assert issubclass(cls, USER_ERRORS)
