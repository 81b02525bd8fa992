"""The bundled demo model (assets/demo_model) and `svlm demo`."""

from __future__ import annotations

import json
import re

import av
import numpy as np

from svlm_jax import cli, demo
from svlm_jax.media.video import VideoReader
from svlm_jax.stream_defaults import StreamDefaults
from svlm_jax.synth import MatchConfig, stream_window


def test_bundled_model_reproduces_its_recorded_commentary():
    """Greedy commentary of the first seconds of the demo's match, as train_demo recorded it after export."""
    recorded = json.loads((demo.DEMO_MODEL_DIR / "recorded_outputs.json").read_text())
    model, tokenizer = demo.load_model()
    texts = [text for _, text in demo.commentate(model, tokenizer, recorded["seed"], recorded["seconds"])]
    assert texts == recorded["texts"]
    assert any(texts), "the bundled model should say something in its recorded seconds"


def test_bundled_stream_config_is_the_demos(capsys):
    """The bundled model's stream_config.json is demo.STREAM_DEFAULTS (train_demo writes one from the
    other), and `svlm info` reports it."""
    assert StreamDefaults.from_dir(demo.DEMO_MODEL_DIR) == demo.STREAM_DEFAULTS
    assert cli.main(["info", str(demo.DEMO_MODEL_DIR)]) == 0
    out = capsys.readouterr().out
    assert "stream defaults from stream_config.json" in out and "12,544 to 12,544 pixels" in out, out
    assert "previous text 'Blue home, Black away.'" in out and "vision 8 s, 16 text rounds" in out, out


def test_demo_writes_video_subtitles_and_accuracy(tmp_path, capsys):
    assert cli.main(["demo", "--seconds", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+:\d\d  ", line)]
    assert len(rows) == 4 and all(re.search(r"(ok|--) +\d+\.\d%$", row) for row in rows), out
    assert re.search(r"^accuracy \d+\.\d% over 4 s", out, re.M), out
    assert re.search(r"^real-time factor \d+\.\d+", out, re.M), out

    vtt = (tmp_path / f"match_{demo.DEMO_SEED}.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n")
    for cue in vtt[len("WEBVTT\n\n"):].split("\n\n"):
        if cue:
            timing, payload = cue.split("\n", 1)
            assert re.fullmatch(r"00:00:0[0-3]\.000 --> 00:00:0[1-4]\.000", timing) and payload.strip(), cue

    video = tmp_path / f"match_{demo.DEMO_SEED}.mp4"
    with av.open(str(video)) as container:  # what browsers and players decode
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    with VideoReader(video, fps=2) as reader:
        seconds = list(reader)
    assert len(seconds) == 4
    # Read back by the reader training uses, the video shows each second as the model saw it: in
    # brightness (BT.601 luma; a mean error of 1.3 of 255 measured), as 4:2:0 keeps colour at half resolution.
    luma = np.asarray([0.299, 0.587, 0.114])
    expected = stream_window(MatchConfig(demo.DEMO_SEED), 0, 4).frames @ luma
    read = np.concatenate([s.frames_thwc for s in seconds]) @ luma
    assert np.abs(read - expected).mean(axis=(1, 2)).max() < 2.0

    # `svlm stream` with no option but the model and the video says what the demo said: both take the
    # checkpoint's stream_config.json (the demo's own match needs no --previous-text).
    assert f"svlm stream --model {demo.DEMO_MODEL_DIR} --video {video}\n" in out
    streamed = tmp_path / "streamed.vtt"
    assert cli.main(["stream", "--model", str(demo.DEMO_MODEL_DIR), "--video", str(video), "--vtt", str(streamed)]) == 0
    assert streamed.read_text() == vtt


def test_demo_bad_arguments(tmp_path, capsys):
    assert cli.main(["demo", "--minutes", "0"]) == 2
    assert cli.main(["demo", "--minutes", "2", "--seconds", "5"]) == 2
    assert cli.main(["demo", "--minutes", "1", "--seconds", "5"]) == 2  # also with --minutes' default value
    assert "not allowed with argument" in capsys.readouterr().err
    capsys.readouterr()
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert cli.main(["demo", "--out", str(not_a_folder)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"svlm: error: --out {not_a_folder} exists and is not a folder", err


def test_score_number_and_goal_masks_mark_only_the_numbers_of_stated_scores_and_goal_sentences():
    from experiments.train_demo import goal_statement_mask, memory_word_mask, score_number_mask, side_word_mask
    from svlm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(demo.DEMO_MODEL_DIR)
    text = (" Blue home, Red away. Blue home passes 2 times. Score 12 to three. Goal for Red away! Score"
            " twenty one to 30. Red 4 to one, home side.")
    ids = np.asarray([tok.encode(text)])

    def marked_runs(mask):  # the marked runs of tokens, decoded
        runs, run = [], []
        for token, marked in zip(ids[0].tolist() + [None], mask.tolist() + [False]):
            if marked:
                run.append(token)
            elif run:
                runs.append(tok.decode(run).strip())
                run = []
        return runs

    assert marked_runs(score_number_mask(tok, ids)[0]) == ["12", "three", "twenty one", "30"]
    assert marked_runs(goal_statement_mask(tok, ids)[0]) == ["Goal for Red away! Score twenty one to 30"]
    assert marked_runs(side_word_mask(tok, ids)[0]) == ["away"]
    assert marked_runs(memory_word_mask(tok, ids)[0]) == ["12", "three", "away", "twenty one", "30"]


def test_previous_other_number_is_the_other_slot_of_the_statement_before():
    from experiments.train_demo import previous_other_number
    from svlm_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(demo.DEMO_MODEL_DIR)
    words = ["Score two to one.", "Red passes.", "Score four to three.", "Goal for Red!", "Score five to three."]
    ids = np.asarray(tok.encode(" ".join(words)))
    other = previous_other_number(tok, ids)
    # the second statement's numbers face the first's other numbers; the third's face the second's
    assert [(tok.decode([int(ids[i])]).strip(), tok.decode([int(other[i])]).strip())
            for i in np.nonzero(other >= 0)[0]] == [("four", "one"), ("three", "two"), ("five", "three"),
                                                    ("three", "four")]


def test_text_loss_is_the_models_cross_entropy_over_the_counted_targets():
    """train_demo's text pretraining loss (svlm_jax.train's step on `step.text_batch` rows) against the
    full model's forward (the HF-exact path) on random right-padded rows, counting a random subset of
    the targets."""
    import svlm_jax
    from experiments.train_demo import text_spec
    from svlm_jax.train import step

    model, _ = demo.load_model()
    rng = np.random.default_rng()
    cfg = model.config
    text_ids = np.setdiff1d(np.arange(cfg.text.vocab_size), [cfg.image_token_id, cfg.video_token_id,
                                                             cfg.vision_start_token_id, cfg.vision_end_token_id])
    ids_bt = rng.choice(text_ids, (2, 24)).astype(np.int32)
    real_bt = np.ones(ids_bt.shape, bool)
    real_bt[1, 17:] = False
    counted_bt = rng.random((2, 23)) < 0.5
    counted_bt[0, 0] = True
    counted_bt &= real_bt[:, 1:]
    loss = step.batch_loss(text_spec(cfg), model.params, step.text_batch(ids_bt, real_bt, counted_bt))
    oracle_btv = np.asarray(svlm_jax.forward(model, ids_bt, attention_mask=real_bt.astype(np.int32)))[:, :-1]
    log_p = oracle_btv - np.log(np.exp(oracle_btv).sum(-1, keepdims=True))
    nll_bt = -np.take_along_axis(log_p, ids_bt[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), nll_bt[counted_bt].mean(), rtol=1e-5)
