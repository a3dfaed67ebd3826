"""The character language model: vocabulary, corpus preparation, model, generation, and the
``fastbptt train / predict / sweep`` commands end to end on the tiny shipped corpus."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastbptt.cli import main
from fastbptt.lm import CharLM, LMConfig, Vocabulary, generate, next_char_distribution, tiny_corpus_path, warm_up
from fastbptt.lm import data as lm_data
from fastbptt.lm.cli import _plan
from fastbptt.tbptt.checkpoint import save_checkpoint_file

TINY = str(tiny_corpus_path())
SMALL = ["--hidden-size", "16", "--embedding-dim", "8", "--batch-size", "4", "--num-steps", "16",
         "--val-fraction", "0.1", "--eval-batch-size", "2", "--no-progress", "--threads", "1", "--device", "cpu"]



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- data
def test_tiny_corpus_is_shipped_pinyin():
    text = Path(TINY).read_text(encoding="utf-8")
    assert 2000 < len(text) < 10_000
    assert text.startswith("ni hao")
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz0123456789 ,.;:!?'\"()%-\n")


def test_vocabulary_roundtrip_unknown_and_state():
    vocab = Vocabulary.from_text("ni hao")
    assert len(vocab) == 7 and vocab.itos[0] == "<unk>"  # " ahino" and <unk>
    ids = vocab.encode("hao ni")
    assert vocab.decode(ids) == "hao ni"
    assert vocab.encode("nix").tolist()[-1] == 0            # unknown -> <unk>
    with pytest.raises(ValueError, match=r"not in the model's vocabulary: 'xz'"):
        vocab.encode("zixn", strict=True)
    assert Vocabulary.from_state_dict(vocab.state_dict()) == vocab
    assert vocab.describe() == "7 tokens (6 characters + unknown)"
    with pytest.raises(ValueError) as exc:
        vocab.encode("nix", strict=True)
    assert str(exc.value).endswith("'x'; it has 7 tokens (6 characters + unknown), the characters ' ahino'")


def test_pinyin_conversion_of_tagged_text():
    pytest.importorskip("pypinyin")
    line = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t  （/w  附/v  图片/n  １/m  张/q  ）/w"
    assert lm_data.strip_tags(line) == "迈向充满希望的新世纪——一九九八年（附图片１张）"
    assert lm_data.strip_tags("[中央/n  人民/n  广播/vn  电台/n]nt  。/w") == "中央人民广播电台。"
    text = lm_data.to_pinyin([lm_data.strip_tags(line), "你好，世界。"], progress=False)
    assert text == "mai xiang chong man xi wang de xin shi ji -- yi jiu jiu ba nian (fu tu pian 1 zhang)\n" \
                   "ni hao, shi jie.\n"


def test_load_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--text: file not found"):
        lm_data.load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="--text: .* is empty"):
        lm_data.load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        lm_data.load_text(tmp_path / "latin1.txt")
    with pytest.raises(IsADirectoryError, match="got a directory"):
        lm_data.load_text(tmp_path)
    with pytest.raises(ValueError, match="too short to split"):
        lm_data.split_text("abc", 0.1)


def test_default_corpus_uses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBPTT_CACHE", str(tmp_path))
    (tmp_path / lm_data.DEFAULT_CORPUS_NAME).write_text("ni hao\n")
    assert lm_data.default_corpus(progress=False, log=lambda m: pytest.fail("converted again")) == "ni hao\n"


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("cell,embedding", [("rnn", 0), ("gru", 8), ("lstm", 8)])
def test_model_shapes_and_zero_initial_state(cell, embedding):
    model = CharLM(LMConfig(vocab_size=11, cell=cell, hidden_size=6, num_layers=2, embedding_dim=embedding)).double()
    tokens = torch.randint(0, 11, (3, 5))
    logits, state = model(tokens)
    assert logits.shape == (3, 5, 11)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2, 3, 6)
    zeros = torch.zeros(2, 3, 6, dtype=torch.float64)
    again, _ = model(tokens, (zeros, zeros) if cell == "lstm" else zeros)
    torch.testing.assert_close(again, logits)
    # carrying the state over a split equals one pass
    a, s = model(tokens[:, :2])
    b, _ = model(tokens[:, 2:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), logits)


def test_model_config_errors():
    with pytest.raises(ValueError, match="cell must be one of"):
        LMConfig(vocab_size=5, cell="transformer").validate()
    with pytest.raises(ValueError, match="hidden_size must be an integer >= 1"):
        LMConfig(vocab_size=5, hidden_size=0).validate()


# ----------------------------------------------------------------------------- generation
def test_generation_warm_up_greedy_and_sampling():
    vocab = Vocabulary.from_text("abc ")
    torch.manual_seed(0)
    model = CharLM(LMConfig(vocab_size=len(vocab), hidden_size=8, embedding_dim=4))
    logits, state = warm_up(model, vocab, "ab c")
    full, _ = model(vocab.encode("ab c")[None])
    torch.testing.assert_close(logits, full[0, -1])
    top = next_char_distribution(model, vocab, "ab c", top_k=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert sum(p for _, p in next_char_distribution(model, vocab, "ab c", top_k=10)) == pytest.approx(1.0)
    greedy = generate(model, vocab, "ab c", 12)
    assert len(greedy) == 12 and greedy == generate(model, vocab, "ab c", 12)
    assert greedy[0] == top[0][0]
    s1 = generate(model, vocab, "ab", 20, strategy="sample", generator=torch.Generator().manual_seed(1))
    s2 = generate(model, vocab, "ab", 20, strategy="sample", generator=torch.Generator().manual_seed(1))
    assert s1 == s2 and set(s1) <= set("abc ")
    only = generate(model, vocab, "ab", 20, strategy="sample", top_k=1, generator=torch.Generator().manual_seed(2))
    assert only == generate(model, vocab, "ab", 20)            # top-1 sampling is greedy
    with pytest.raises(ValueError, match="--prefix 'abz': characters not in the model's vocabulary: 'z'"):
        generate(model, vocab, "abz", 3)
    with pytest.raises(ValueError, match="--prefix must be a non-empty string"):
        generate(model, vocab, "", 3)
    with pytest.raises(ValueError, match="--steps must be an integer >= 1"):
        generate(model, vocab, "ab", 0)


# ----------------------------------------------------------------------------- the commands
def test_train_predict_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--text", TINY, *SMALL, "--max-steps", "30", "--eval-every", "10", "--lr", "0.01",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_ppl"] for r in records if r["kind"] == "val"]
    assert len(val) == 4 and val[-1] < val[1] < val[0]  # steps 0, 10, 20, 30
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["extra"]["model"]["cell"] == "gru" and "chars" in ckpt["extra"]["vocab"]

    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--prefix", "ni hao", "--steps", "10"]) == 0
    printed = capsys.readouterr().out
    assert "next character (top 5)" in printed and "greedy, 10 steps" in printed and "sample 2" in printed

    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--prefix", "ni hao 世界"]) == 2
    err = capsys.readouterr().err
    assert "--prefix 'ni hao 世界': characters not in the model's vocabulary: '世界'" in err

    # the torch.nn baseline reads the same checkpoint
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--prefix", "ni", "--steps", "5",
                 "--baseline", "torch"]) == 0
    assert "torch.nn" in capsys.readouterr().out


def _cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastbptt", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def test_resume_from_the_command_line_is_bit_for_bit(tmp_path):
    """Two processes: 8 updates, stop, resume to 16 == 16 updates straight (torch.equal)."""
    common = ["train", "--text", TINY, *SMALL, "--k2", "24", "--dropout", "0.2", "--num-layers", "2",
              "--schedule", "exponential", "--decay-steps", "4", "--eval-every", "4"]
    straight = _cli(*common, "--max-steps", "16", "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    first = _cli(*common, "--max-steps", "8", "--out", str(tmp_path / "b"))
    assert first.returncode == 0, first.stderr
    resumed = _cli(*common, "--max-steps", "16", "--out", str(tmp_path / "b"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 8" in resumed.stderr
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for name, p in a["model"].items():
        assert torch.equal(p, b["model"][name]), name
    assert a["progress"]["last_val"] == b["progress"]["last_val"]

    def validations(run):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]

    assert validations("b") == validations("a") and len(validations("a")) == 5


def test_bad_input_gives_clear_messages(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--text", str(empty), *SMALL]) == 2
    assert "--text" in capsys.readouterr().err
    assert main(["train", "--text", str(tmp_path / "nope.txt"), *SMALL]) == 2
    assert "--text: file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--text", TINY, "--num-steps", "0"])
    assert exc.value.code == 2
    assert "argument --num-steps/--k1: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert main(["train", "--text", TINY, *SMALL, "--k2", "8", "--out", str(tmp_path / "x")]) == 2
    assert "k2 (steps backpropagated, 8) must be >= k1" in capsys.readouterr().err

    # a checkpoint from another model
    out = tmp_path / "run"
    assert main(["train", "--text", TINY, *SMALL, "--max-steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--text", TINY, *SMALL, "--hidden-size", "24", "--cell", "lstm", "--max-steps", "4",
                 "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: the checkpoint holds another model: cell='gru' (asked for 'lstm'), hidden_size=16" in err
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "foreign.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "foreign.pt"), "--prefix", "ni"]) == 2
    assert "not a fastbptt training checkpoint" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--prefix", "ni"]) == 2
    assert "--checkpoint: checkpoint not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what the commands say
TINY_MODEL = ["--hidden-size", "12", "--embedding-dim", "6", "--batch-size", "4", "--num-steps", "16",
              "--val-fraction", "0.1", "--eval-batch-size", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A checkpoint trained 2 updates, and what the training printed on stderr."""
    out = tmp_path_factory.mktemp("tiny_run")
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--text", TINY, *TINY_MODEL, "--device", "cpu", "--max-steps", "2",
                     "--out", str(out)]) == 0
    return out / "checkpoint.pt", log.getvalue()


def _rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` changed by ``edit(state)``, saved as training saves one."""
    state = torch.load(src, weights_only=True)
    state.pop("sha256", None)
    edit(state)
    save_checkpoint_file(state, dst)
    return dst


def _predict(capsys, checkpoint, *args) -> tuple[int, str, str]:
    status = main(["predict", "--checkpoint", str(checkpoint), "--prefix", "ni hao", "--steps", "12", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_says_when_the_plan_ends_mid_epoch(tiny_run):
    windows = int(re.search(r"2 updates planned: [0-9.]+ of an epoch of (\d+) windows \(--max-steps 2\)",
                            tiny_run[1]).group(1))
    assert f"2 updates planned: {2 / windows:.2f} of an epoch of {windows} windows (--max-steps 2)" in tiny_run[1]


@pytest.mark.parametrize("updates,accum,epochs,max_steps,expected", [
    (1500, 1, 1, 1500, "1500 updates planned: 0.48 of an epoch of 3152 windows (--max-steps 1500)"),
    (5000, 1, 3, 5000, "5000 updates planned: 1.59 of 3 epochs of 3152 windows (--max-steps 5000)"),
    (6304, 1, 2, 10000, "6304 updates planned: 2 epochs of 3152 windows"),
    (1576, 2, 1, 1576, "1576 updates planned: 1 epoch of 3152 windows, 2 windows per update"),
    (788, 2, 1, 788, "788 updates planned: 0.50 of an epoch of 3152 windows, 2 windows per update "
                     "(--max-steps 788)"),
])
def test_plan_line(updates, accum, epochs, max_steps, expected):
    cfg = SimpleNamespace(accum_steps=accum, epochs=epochs, max_steps=max_steps)
    assert _plan(updates, 3152, cfg) == expected


def test_train_and_predict_describe_the_vocabulary_alike(tiny_run, capsys):
    vocabulary = re.search(r"vocabulary (\d+ tokens \((\d+) characters \+ unknown\))", tiny_run[1])
    chars = len(set(lm_data.split_text(Path(TINY).read_text(encoding="utf-8"), 0.1)[0]))
    assert int(vocabulary.group(2)) == chars
    status, out, _ = _predict(capsys, tiny_run[0])
    assert status == 0 and f"vocabulary {vocabulary.group(1)}" in out
    status, _, err = _predict(capsys, tiny_run[0], "--prefix", "ni hao Z")
    assert status == 2 and f"it has {vocabulary.group(1)}" in err


def _samples(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("sample ")]


def test_predict_draws_a_fresh_seed_and_prints_it(tiny_run, capsys):
    runs = [_predict(capsys, tiny_run[0], "--samples", "3") for _ in range(2)]
    seeds = [int(re.search(r"^samples drawn with --seed (\d+)$", out, re.MULTILINE).group(1)) for _, out, _ in runs]
    assert seeds[0] != seeds[1]
    # the printed seed repeats a run's samples exactly
    for seed, (_, out, _) in zip(seeds, runs):
        status, again, _ = _predict(capsys, tiny_run[0], "--samples", "3", "--seed", str(seed))
        assert status == 0 and _samples(again) == _samples(out) and len(_samples(out)) == 3
        assert f"samples drawn with --seed {seed}" in again


@pytest.mark.parametrize("device", ["meta", "gpu", "cuda:x"])
def test_unsupported_device_is_an_argument_error(device, tiny_run, tmp_path, capsys):
    expected = f"fastbptt: error: --device: expected cpu, cuda, cuda:N or auto, got {device!r}\n"
    assert main(["train", "--text", TINY, *TINY_MODEL, "--device", device, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == expected
    assert _predict(capsys, tiny_run[0], "--device", device) == (2, "", expected)


def test_a_backend_that_cannot_run_here_is_an_argument_error(tiny_run, tmp_path, capsys):
    assert main(["train", "--text", TINY, *TINY_MODEL, "--device", "cpu", "--backend", "cuda",
                 "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("fastbptt: error: --backend cuda: ")
    assert not (tmp_path / "run").exists()  # stopped before training started
    assert main(["train", "--text", TINY, *TINY_MODEL, "--device", "cpu", "--cell", "rnn", "--backend",
                 "cuda:persistent", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("fastbptt: error: --backend cuda:persistent: ")
    status, _, err = _predict(capsys, tiny_run[0], "--backend", "cuda")
    assert status == 2 and err.startswith("fastbptt: error: --backend cuda: ")
    # a checkpoint trained on kernels that cannot run here names where the backend came from
    on_cuda = _rewrite_checkpoint(tiny_run[0], tmp_path / "cuda.pt",
                                  lambda state: state["extra"]["model"].update(backend="cuda"))
    status, _, err = _predict(capsys, on_cuda)
    assert status == 2
    assert err.startswith("fastbptt: error: the checkpoint's backend 'cuda' (choose another with --backend): ")
    assert _predict(capsys, on_cuda, "--backend", "reference")[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs compiled on a GPU")
def test_triton_backend_without_its_interpreter_is_an_argument_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    run = _cli("train", "--text", TINY, *TINY_MODEL, "--device", "cpu", "--backend", "triton",
               "--out", str(tmp_path / "run"))
    assert run.returncode == 2
    assert run.stderr.startswith("fastbptt: error: --backend triton: the triton kernels cannot run on this machine: ")
    assert "TRITON_INTERPRET=1" in run.stderr


def test_predict_rejects_non_finite_weights(tiny_run, tmp_path, capsys):
    name = next(iter(torch.load(tiny_run[0], weights_only=True)["model"]))
    broken = _rewrite_checkpoint(tiny_run[0], tmp_path / "nan.pt",
                                 lambda state: state["model"][name].view(-1)[0].fill_(float("nan")))
    status, out, err = _predict(capsys, broken)
    assert status == 2 and out == ""
    assert err.startswith(f"fastbptt: error: --checkpoint: {str(broken)!r} holds non-finite weights "
                          f"(NaN/Inf in {name}): ")


@pytest.mark.parametrize("argv,policy", [([], "auto"), (["--recompute", "on"], True), (["--recompute", "off"], False),
                                         (["--no-recompute"], False)])
def test_recompute_option_reaches_the_model(argv, policy):
    from fastbptt.cli import command_parser
    from fastbptt.lm.cli import _lm_config

    parser, _ = command_parser("train")
    cfg = _lm_config(parser.parse_args(argv), 10)
    assert cfg.recompute == policy
    assert CharLM(cfg).rnn.recompute == policy
