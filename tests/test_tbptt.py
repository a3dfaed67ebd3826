"""The TBPTT trainer: stream batching, state detach, TBPTT(k1, k2) gradients against a
hand-unrolled reference, clipping, bit-for-bit resume, and DDP against one process."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastbptt
from fastbptt import tbptt
from fastbptt.tbptt import StreamBatcher, TrainConfig, Trainer
from helpers import TinyLM, config, new_trainer, tokens



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- stream batching
@pytest.mark.parametrize("n,batch,steps", [(101, 3, 5), (64, 4, 8), (50, 7, 3)])
def test_stream_windows_continue_and_cover_each_token_once(n, batch, steps):
    data = torch.arange(n)
    b = StreamBatcher(data, batch, steps)
    windows = list(b)
    assert len(windows) == len(b) and b.epoch == 1 and b.position == 0
    assert [w.reset for w in windows] == [True] + [False] * (len(windows) - 1)
    streams = torch.cat([w.input for w in windows], 1)    # [B, L]: consecutive windows continue
    targets = torch.cat([w.target for w in windows], 1)
    length = (n - 1) // batch
    assert streams.shape == (batch, length)
    assert torch.equal(streams, data[:batch * length].reshape(batch, length))
    assert torch.equal(targets, streams + 1)
    seen = streams.flatten().sort().values            # every input exactly once, nothing lost but the tail
    assert torch.equal(seen, torch.arange(batch * length))
    assert n - 1 - batch * length < batch
    assert all(w.input.shape[1] == steps for w in windows[:-1]) and 1 <= windows[-1].input.shape[1] <= steps


def test_stream_shards_over_processes_equal_the_whole_batch():
    data = torch.arange(200)
    whole = [w.input for w in StreamBatcher(data, 4, 6)]
    shards = [[w.input for w in StreamBatcher(data, 4, 6, rank=r, world_size=2)] for r in range(2)]
    for i, window in enumerate(whole):
        assert torch.equal(torch.cat([shards[0][i], shards[1][i]]), window)


def test_random_windows_reset_and_resume_the_same_draws():
    data = torch.arange(300)
    b = StreamBatcher(data, 4, 10, mode="random", seed=3)
    it = iter(b)
    first = [next(it) for _ in range(3)]
    assert all(w.reset for w in first)
    assert all(torch.equal(w.target, w.input + 1) for w in first)
    assert all(torch.equal(w.input[:, 1:], w.input[:, :-1] + 1) for w in first)  # contiguous windows
    saved = b.state_dict()
    expected = [next(it) for _ in range(2)]
    again = StreamBatcher(data, 4, 10, mode="random", seed=99)
    again.load_state_dict(saved)
    got = [w for _, w in zip(range(2), again)]
    assert all(torch.equal(a.input, e.input) for a, e in zip(got, expected))


def test_batcher_errors():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        StreamBatcher(torch.arange(10), 2, 0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        StreamBatcher(torch.arange(4), 8, 2)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        StreamBatcher(torch.arange(40), 3, 2, world_size=2)
    with pytest.raises(ValueError, match="k2 .* must be >= k1"):
        TrainConfig(k1=8, k2=4).validate()


# ----------------------------------------------------------------------------- state detach
def _saved_bytes_per_window(trainer: Trainer, windows: int, check_detached: bool = True) -> list[int]:
    """Runs ``windows`` updates; returns the bytes autograd saved in each window's forward."""
    sizes = []
    for _, window in zip(range(windows), trainer.batcher):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = trainer._forward_backward(window, sync=True)
        trainer._optimizer_step(loss)
        sizes.append(sum(storages.values()))
        for t in (trainer.state if isinstance(trainer.state, tuple) else (trainer.state,)):
            assert not check_detached or (t.grad_fn is None and not t.requires_grad)
    return sizes


@pytest.mark.parametrize("cell,layers", [("gru", 2), ("lstm", 2), ("rnn", 1)])
def test_state_is_detached_and_the_graph_stays_flat_over_100_windows(cell, layers):
    trainer = new_trainer(TinyLM(cell, layers=layers), tokens(2000), config(batch_size=2, k1=8))
    sizes = _saved_bytes_per_window(trainer, 100)
    assert trainer.step == 0 and len(sizes) == 100
    assert isinstance(trainer.state, tuple) == (cell == "lstm")
    assert len(set(sizes[1:])) == 1, "saved activations grew across windows"


def test_without_detach_the_second_window_reaches_into_the_first(monkeypatch):
    """The control: the flat-graph test above would catch a missing detach."""
    monkeypatch.setattr("fastbptt.tbptt.trainer.detach_state", lambda s: s)
    trainer = new_trainer(TinyLM(), tokens(), config())
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _saved_bytes_per_window(trainer, 2, check_detached=False)


# ----------------------------------------------------------------------------- TBPTT(k1, k2)
def hand_unrolled_grads(model, data, batch, k1, k2, updates, lr):
    """TBPTT(k1, k2) written out step by step: every k1 steps, restart from the state saved k2
    steps back, unroll one step at a time, score the last k1 outputs, SGD."""
    length = (data.shape[0] - 1) // batch
    x = data[:-1][:batch * length].reshape(batch, length)
    y = data[1:][:batch * length].reshape(batch, length)
    saved = {0: None}                      # position -> detached state at that position
    grads = []
    for u in range(updates):
        end = (u + 1) * k1
        start = max(0, end - k2)
        state, outs = saved[start], []
        for t in range(start, end):
            out, state = model(x[:, t:t + 1], state)
            outs.append(out)
            saved[t + 1] = tbptt.detach_state(state)
        logits = torch.cat(outs[-k1:], 1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, end - k1:end].reshape(-1))
        model.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return grads


@pytest.mark.parametrize("k1,k2", [(3, 3), (2, 5), (3, 7), (4, 8)])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_k1_k2_gradients_equal_a_hand_unrolled_reference(cell, k1, k2):
    data, updates = tokens(200), 6
    expected = hand_unrolled_grads(TinyLM(cell, layers=2), data, 3, k1, k2, updates, lr=0.1)
    model = TinyLM(cell, layers=2)
    trainer = new_trainer(model, data, config(k1=k1, k2=k2, max_steps=updates))
    got = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: got.append([p.grad.clone() for p in model.parameters()]))
    trainer.fit()
    assert len(got) == updates
    for u, (g_ref, g) in enumerate(zip(expected, got)):
        for a, b in zip(g_ref, g):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda m: f"update {u}: {m}")


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("clip", ["norm", "value"])
def test_gradient_clipping(clip):
    data = tokens()
    reference = new_trainer(TinyLM(), data, config(clip="none"))
    window = next(iter(reference.batcher))
    reference._forward_backward(window, sync=True)
    raw = [p.grad.clone() for p in reference.model.parameters()]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw]))
    limit = 0.1 * (float(raw_norm) if clip == "norm" else max(float(g.abs().max()) for g in raw))

    model = TinyLM()
    trainer = new_trainer(model, data, config(clip=clip, clip_value=limit))
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda *_: applied.append([p.grad.clone() for p in model.parameters()]))
    loss = trainer._forward_backward(next(iter(trainer.batcher)), sync=True)
    reported = trainer._optimizer_step(loss)
    assert reported == pytest.approx(float(raw_norm))
    if clip == "norm":
        for g, r in zip(applied[0], raw):
            torch.testing.assert_close(g, r * (limit / (raw_norm + 1e-6)))  # torch's clip_coef has eps 1e-6
    else:
        for g, r in zip(applied[0], raw):
            torch.testing.assert_close(g, r.clamp(-limit, limit))
        assert any(bool((r.abs() > limit).any()) for r in raw)  # the clip did something


# ----------------------------------------------------------------------------- optimisation options
@pytest.mark.parametrize("schedule", ["step", "exponential", "cosine", "plateau", "none"])
def test_schedules_move_the_learning_rate(schedule):
    cfg = config(optimizer="adam", lr=0.01, schedule=schedule, decay=0.5, decay_steps=2, max_steps=8,
                 warmup_steps=0 if schedule == "plateau" else 2, eval_every=2, min_lr=1e-4)
    trainer = new_trainer(TinyLM(), tokens(), cfg, val_data=tokens(60, seed=5))
    lrs = []
    trainer.optimizer.register_step_post_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    assert len(lrs) == 8
    if schedule == "none":
        assert lrs[:3] == pytest.approx([0.005, 0.0075, 0.01])  # linear warm-up, then constant
        assert lrs[-1] == pytest.approx(0.01)
    elif schedule != "plateau":
        assert lrs[0] < lrs[1] and lrs[-1] < 0.01


def test_bf16_autocast_and_fp16_scaler_run():
    for amp in ("bf16", "fp16"):
        model = TinyLM().float()
        trainer = new_trainer(model, tokens(), config(amp=amp, max_steps=3, clip="norm"), val_data=tokens(60, seed=5))
        summary = trainer.fit()
        assert summary["step"] == 3 and math.isfinite(summary["val_loss"])
        assert trainer.scaler.is_enabled() == (amp == "fp16")


def test_gradient_accumulation_equals_the_mean_over_windows():
    """accum_steps=2 over windows w0, w1 gives the mean of their gradients (state carried)."""
    data = tokens()
    single = new_trainer(TinyLM(), data, config(k1=4))
    grads = []
    for window in [w for _, w in zip(range(2), single.batcher)]:
        single.model.zero_grad()
        single._forward_backward(window, sync=True)
        grads.append([p.grad.clone() for p in single.model.parameters()])
    model = TinyLM()
    trainer = new_trainer(model, data, config(k1=4, accum_steps=2, max_steps=1))
    got = []
    trainer.optimizer.register_step_pre_hook(lambda *_: got.append([p.grad.clone() for p in model.parameters()]))
    trainer.fit()
    for g, a, b in zip(got[0], *grads):
        torch.testing.assert_close(g, (a + b) / 2)


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("options", [
    dict(k1=4, k2=6, accum_steps=2, schedule="cosine", warmup_steps=2, eval_every=3),
    dict(sampling="random", schedule="exponential", decay_steps=3, clip="norm", clip_value=0.5),
])
def test_resume_is_bit_for_bit(tmp_path, options):
    data, val = tokens(600), tokens(80, seed=7)
    cfg = config(optimizer="adam", lr=0.01, max_steps=10, **options)
    straight = new_trainer(TinyLM(layers=2, dropout=0.3), data, cfg, val_data=val)  # dropout draws from the RNG
    straight.fit()

    first = new_trainer(TinyLM(layers=2, dropout=0.3), data, cfg, val_data=val, out_dir=tmp_path)
    first.fit(until=5)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["step"] == 5
    torch.manual_seed(1234)                        # a fresh process state ...
    second = new_trainer(TinyLM(layers=2, dropout=0.3, seed=5), data, cfg, val_data=val, out_dir=tmp_path)
    second.resume(tmp_path / "checkpoint.pt")      # ... restored from the checkpoint
    second.fit()
    assert second.step == straight.step == 10
    for (name, a), b in zip(straight.model.named_parameters(), second.model.parameters()):
        assert torch.equal(a, b), name
    assert second.last_val == straight.last_val
    assert (tmp_path / "metrics.jsonl").is_file() and (tmp_path / "curves.png").is_file()


def test_checkpoint_errors(tmp_path):
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=1), out_dir=tmp_path)
    trainer.fit()
    other = new_trainer(TinyLM(hidden=9), tokens(), config(max_steps=1))
    with pytest.raises(ValueError, match="different model"):
        other.resume(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="--resume: checkpoint not found"):
        other.resume(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a fastbptt training checkpoint"):
        other.resume(tmp_path / "foreign.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable fastbptt checkpoint"):
        other.resume(tmp_path / "garbage.pt")
    batch = new_trainer(TinyLM(), tokens(), config(batch_size=2, max_steps=1))
    with pytest.raises(ValueError, match="batch_size=3 .* has 2"):
        batch.resume(tmp_path / "checkpoint.pt")


# ----------------------------------------------------------------------------- distributed
def _train_cli(out: Path, batch: int, nproc: int) -> list:
    text = Path(fastbptt.__file__).parent / "data" / "tiny_pinyin.txt"
    args = ["train", "--text", str(text), "--hidden-size", "12", "--embedding-dim", "6", "--batch-size", str(batch),
            "--num-steps", "8", "--max-steps", "6", "--eval-every", "3", "--eval-batch-size", "4",
            "--val-fraction", "0.1", "--out", str(out), "--no-progress", "--threads", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastbptt", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastbptt", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_ddp_two_processes_match_one_process_with_the_whole_batch(tmp_path):
    """torchrun, gloo, 2 processes x 4 streams == 1 process x 8 streams."""
    _train_cli(tmp_path / "one", 8, 1)
    ddp = _train_cli(tmp_path / "two", 8, 2)
    assert "2 processes" in ddp.stderr
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert one["progress"]["step"] == two["progress"]["step"] == 6
    for name, a in one["model"].items():
        torch.testing.assert_close(two["model"][name], a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert two["progress"]["last_val"] == pytest.approx(one["progress"]["last_val"], rel=1e-4)
    # the carried state was gathered from both processes: the same global batch layout
    torch.testing.assert_close(two["carry"]["state"], one["carry"]["state"], rtol=1e-4, atol=1e-5)
