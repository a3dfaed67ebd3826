"""The trainer under faults: corrupt checkpoints, NaN/Inf losses and gradients, two runs in one
directory, interrupted writes, torn metrics logs, mismatched resumes, and data-parallel
reductions (gloo on CPU)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastbptt.lm.model import sequence_cross_entropy
from fastbptt.tbptt import (CheckpointError, NonFiniteError, RunDirectoryBusy, Trainer, load_checkpoint,
                            read_metrics)
from fastbptt.tbptt import distributed as ddp
from fastbptt.tbptt.rundir import RunDirectoryLock
from helpers import TinyLM, config, new_trainer, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _records(path: Path) -> list[dict]:
    """The metrics log without its timing field (the only one a resume may change)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_metrics(path)]


# ----------------------------------------------------------------------------- checkpoint integrity
def _flip_bytes_inside(path: Path, tensor: torch.Tensor, count: int = 64) -> None:
    """Inverts ``count`` bytes in the middle of ``tensor``'s data as stored in the file."""
    blob = bytearray(path.read_bytes())
    at = blob.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0, "the tensor's bytes are not stored verbatim"
    start = at + (tensor.numel() * tensor.element_size() - count) // 2
    blob[start:start + count] = bytes(b ^ 0xFF for b in blob[start:start + count])
    path.write_bytes(bytes(blob))


def test_a_checkpoint_with_flipped_bytes_is_rejected(tmp_path):
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=2), out_dir=tmp_path)
    trainer.fit()
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path)["progress"]["step"] == 2  # intact: loads
    _flip_bytes_inside(path, trainer.model.rnn.weight_hh_l0.detach())
    assert torch.load(path, weights_only=True)["progress"]["step"] == 2  # torch.load alone does not notice
    with pytest.raises(CheckpointError, match="is corrupt: its content does not match the digest"):
        load_checkpoint(path, argument="--resume")
    with pytest.raises(CheckpointError, match="corrupt"):
        new_trainer(TinyLM(), tokens(), config(max_steps=4)).resume(path)


def test_a_checkpoint_without_a_digest_still_loads(tmp_path):
    """Version 1 files (written before the digest) load as before."""
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=1), out_dir=tmp_path)
    trainer.fit()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del ckpt["sha256"]
    torch.save({**ckpt, "version": 1}, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt")["progress"]["step"] == 1


# ----------------------------------------------------------------------------- non-finite losses and gradients
class _PoisonedLoss:
    """The LM's loss, made NaN (or the gradient of the logits Inf) at the given calls."""

    def __init__(self, nan_at=(), inf_grad_at=()):
        self.calls, self.nan_at, self.inf_grad_at = 0, set(nan_at), set(inf_grad_at)

    def __call__(self, output, target):
        self.calls += 1
        if self.calls in self.inf_grad_at:
            output = output + 0.0
            output.register_hook(lambda g: torch.full_like(g, math.inf))
        loss = sequence_cross_entropy(output, target)
        return loss * math.nan if self.calls in self.nan_at else loss


def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path):
    loss_fn = _PoisonedLoss(nan_at={3})
    trainer = Trainer(TinyLM(), tokens(), config(max_steps=6, checkpoint_every=1), loss_fn=loss_fn, out_dir=tmp_path)
    with pytest.raises(NonFiniteError, match=r"update 3: the training loss is nan .* the run stops without applying "
                                             r"it\. The last checkpoint, .*checkpoint\.pt' \(update 2\)"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["progress"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the update was not applied
    assert [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "nonfinite"][0]["step"] == 3


def test_an_infinite_gradient_norm_stops_the_run():
    trainer = Trainer(TinyLM(), tokens(), config(max_steps=6), loss_fn=_PoisonedLoss(inf_grad_at={2}))
    with pytest.raises(NonFiniteError, match="update 2: the training loss is [0-9.]+ and the gradient norm (inf|nan)"):
        trainer.fit()


def test_skip_leaves_out_non_finite_updates_and_restarts_the_state(tmp_path):
    loss_fn = _PoisonedLoss(nan_at={2}, inf_grad_at={5})
    trainer = Trainer(TinyLM(), tokens(), config(max_steps=6, nonfinite="skip"), loss_fn=loss_fn, out_dir=tmp_path,
                      log=lambda msg: None)
    states = []
    skip = trainer._handle_nonfinite_update
    trainer._handle_nonfinite_update = lambda *a: (skip(*a), states.append(trainer.state))
    summary = trainer.fit()
    assert summary["step"] == 6 and summary["skipped_updates"] == 2 and loss_fn.calls == 8
    assert states == [None, None]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    skipped = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "nonfinite"]
    assert [(r["step"], r["action"]) for r in skipped] == [(2, "skip"), (4, "skip")]  # update 4 = the 5th window


def test_a_non_finite_model_is_never_written_over_a_checkpoint(tmp_path):
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=2), out_dir=tmp_path)
    trainer.fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        trainer.model.head.bias[0] = math.nan
    with pytest.raises(NonFiniteError, match=r"holds NaN/Inf values \(head\.bias\) and is not saved"):
        trainer.save_checkpoint()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_non_finite_validation_loss_stops_the_run(tmp_path):
    loss_fn = _PoisonedLoss(nan_at={1})  # the first call: the validation before training
    trainer = Trainer(TinyLM(), tokens(), config(max_steps=2), loss_fn=loss_fn, val_data=tokens(60, seed=5))
    with pytest.raises(NonFiniteError, match="after update 0 the validation loss is nan"):
        trainer.fit()


# ----------------------------------------------------------------------------- one run per directory
def test_a_second_run_in_the_same_directory_is_refused_and_names_the_holder(tmp_path):
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=1), out_dir=tmp_path)
    with RunDirectoryLock(tmp_path):
        with pytest.raises(RunDirectoryBusy, match=rf"is in use by another run \(pid {os.getpid()} on "):
            trainer.fit()
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint.pt").exists()
    assert trainer.fit()["step"] == 1  # released: the run goes ahead


def test_the_lock_of_a_killed_run_does_not_outlive_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastbptt.tbptt.rundir import "
                               "RunDirectoryLock; RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"pid {holder.pid} on "):
            RunDirectoryLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunDirectoryLock(tmp_path).acquire().release()


def test_temporary_files_of_an_interrupted_write_are_removed(tmp_path):
    leftovers = [tmp_path / "checkpoint.ptx1y2z3.tmp", tmp_path / "metrics.jsonlab12.tmp"]
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    keep = tmp_path / "notes.tmp"  # not ours
    keep.write_text("x")
    messages = []
    new_trainer(TinyLM(), tokens(), config(max_steps=1), out_dir=tmp_path, log=messages.append).fit()
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert any("removed 2 temporary file(s)" in m for m in messages)


# ----------------------------------------------------------------------------- resume
def _run_and_keep_every_checkpoint(tmp_path, cfg, monkeypatch):
    """An uninterrupted run that copies each checkpoint it writes: (run dir, [copies])."""
    run, copies = tmp_path / "run", []
    save = Trainer.save_checkpoint

    def save_and_copy(self, path=None):
        written = save(self, path)
        copies.append(tmp_path / f"checkpoint-{len(copies)}.pt")
        shutil.copy(written, copies[-1])
        return written

    monkeypatch.setattr(Trainer, "save_checkpoint", save_and_copy)
    new_trainer(TinyLM(), tokens(160), cfg, val_data=tokens(60, seed=5), out_dir=run).fit()
    monkeypatch.undo()
    return run, copies


@pytest.mark.parametrize("schedule", [dict(eval_every=4), dict(eval_every=None, checkpoint_every=7)],
                         ids=["evaluate-every-4", "checkpoint-every-7"])
def test_resuming_from_any_checkpoint_logs_exactly_what_the_run_logged(tmp_path, monkeypatch, schedule):
    """A kill right after any checkpoint, with later records already in the log: the resumed run's
    log equals the uninterrupted one (no record lost, none twice; with checkpoint-every-7 an
    epoch ends on a checkpoint that precedes the epoch's validation)."""
    cfg = config(epochs=3, max_steps=None, log_every=1, **schedule)
    run, copies = _run_and_keep_every_checkpoint(tmp_path, cfg, monkeypatch)
    expected = _records(run / "metrics.jsonl")
    assert len(copies) >= 6
    for i, copy in enumerate(copies):
        again = tmp_path / f"again-{i}"
        again.mkdir()
        shutil.copy(copy, again / "checkpoint.pt")
        shutil.copy(run / "metrics.jsonl", again / "metrics.jsonl")
        trainer = new_trainer(TinyLM(seed=9), tokens(160), cfg, val_data=tokens(60, seed=5), out_dir=again)
        trainer.resume(again / "checkpoint.pt")
        trainer.fit()
        assert _records(again / "metrics.jsonl") == expected, f"resumed from checkpoint {i}"


def test_a_torn_last_metrics_line_is_dropped_with_a_note(tmp_path):
    first = new_trainer(TinyLM(), tokens(), config(max_steps=2, log_every=1), out_dir=tmp_path)
    first.fit()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "tok')  # killed while appending
    messages = []
    second = new_trainer(TinyLM(), tokens(), config(max_steps=3, log_every=1), out_dir=tmp_path, log=messages.append)
    second.resume(tmp_path / "checkpoint.pt")
    second.fit()
    assert any("dropped line 3, a record cut short" in m for m in messages)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_bad_metrics_line_before_the_end_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl', line 2: not a metrics record \('not json'\)"):
        read_metrics(path)


def test_the_metrics_log_is_rewritten_atomically(tmp_path, monkeypatch):
    """A resume that dies while rewriting the log leaves the old log whole, and no temporary file."""
    new_trainer(TinyLM(), tokens(), config(max_steps=3, log_every=1, checkpoint_every=1), out_dir=tmp_path).fit()
    before = (tmp_path / "metrics.jsonl").read_text()
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=3, log_every=1), out_dir=tmp_path)
    trainer.load_state_dict({**load_checkpoint(tmp_path / "checkpoint.pt"),
                             "progress": {**load_checkpoint(tmp_path / "checkpoint.pt")["progress"], "step": 1}})

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        trainer.fit()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path):
    new_trainer(TinyLM(), tokens(), config(max_steps=1, optimizer="adam"), out_dir=tmp_path).fit()
    other = new_trainer(TinyLM(), tokens(), config(max_steps=2, optimizer="sgd"))
    with pytest.raises(CheckpointError, match=r"trained with optimizer='adam' but this run has optimizer='sgd'; "
                                              r"resume with the same optimizer \(--optimizer\)"):
        other.resume(tmp_path / "checkpoint.pt")


def test_resuming_with_another_amp_setting_works(tmp_path):
    new_trainer(TinyLM().float(), tokens(), config(max_steps=1), out_dir=tmp_path).fit()
    trainer = new_trainer(TinyLM().float(), tokens(), config(max_steps=2, amp="fp16"))
    trainer.resume(tmp_path / "checkpoint.pt")
    assert trainer.fit()["step"] == 2


def test_a_validation_text_too_short_names_eval_batch_size():
    with pytest.raises(ValueError, match=r"the validation sequence has 3 items, fewer than eval_batch_size=8 streams; "
                                         r"use a longer validation text or a smaller eval_batch_size "
                                         r"\(--eval-batch-size\)"):
        new_trainer(TinyLM(), tokens(), config(eval_batch_size=8), val_data=tokens(4))


# ----------------------------------------------------------------------------- data-parallel reductions (gloo)
def _reduce_in_group(rank: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    device = torch.device("cpu")
    out = {
        "place": ddp.process_place(),
        "sum": ddp.sum_over_processes([rank + 1.0, 10.0], device),
        "mean": ddp.mean_over_processes(float(rank), device),
        "any_one": ddp.any_over_processes(rank == 1, device),
        "any_none": ddp.any_over_processes(False, device),
        "gathered": ddp.gather_batch(torch.full((1, 2, 3), float(rank)), 1).tolist(),
        "shard": ddp.shard_batch(torch.arange(8.0).reshape(1, 4, 2), 1).tolist(),
    }
    Path(results, f"{rank}.json").write_text(json.dumps(out))
    ddp.end_process(0, wait=True)


def test_reductions_and_batch_gathering_over_two_gloo_processes(tmp_path):
    mp.start_processes(_reduce_in_group, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        r = json.loads((tmp_path / f"{rank}.json").read_text())
        assert r["place"] == [rank, 2]
        assert r["sum"] == [3.0, 20.0] and r["mean"] == 0.5 and r["any_one"] and not r["any_none"]
        assert torch.tensor(r["gathered"]).shape == (1, 4, 3)
        assert torch.tensor(r["gathered"])[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
        assert r["shard"] == torch.arange(8.0).reshape(1, 4, 2)[:, 2 * rank:2 * rank + 2].tolist()


def test_outside_a_process_group_the_reductions_are_local():
    device = torch.device("cpu")
    assert ddp.process_place() == (0, 1)
    assert ddp.sum_over_processes([1.5, 2], device) == [1.5, 2.0] and ddp.mean_over_processes(3.0, device) == 3.0
    assert ddp.any_over_processes(True, device) and not ddp.any_over_processes(False, device)


def test_the_trainer_reduces_on_its_training_device(monkeypatch):
    """NCCL takes only CUDA tensors: every reduction the trainer makes is on its training device."""
    import fastbptt.tbptt.trainer as trainer_module

    devices = []
    for name in ("sum_over_processes", "mean_over_processes", "any_over_processes"):
        real = getattr(trainer_module, name)
        monkeypatch.setattr(trainer_module, name, lambda value, device, real=real: (devices.append(device),
                                                                                       real(value, device))[1])
    trainer = new_trainer(TinyLM(), tokens(), config(max_steps=2, time_budget=60.0, log_every=1),
                          val_data=tokens(60, seed=5), device="cpu")
    trainer.fit()
    assert len(devices) >= 6 and set(devices) == {torch.device("cpu")}


# ----------------------------------------------------------------------------- the command
TINY_RUN = ["--text", str(Path(__file__).parents[1] / "fastbptt" / "data" / "tiny_pinyin.txt"), "--hidden-size", "8",
            "--embedding-dim", "4", "--batch-size", "4", "--num-steps", "8", "--max-steps", "2", "--eval-every", "2",
            "--eval-batch-size", "2", "--val-fraction", "0.1", "--no-progress", "--threads", "1", "--device", "cpu"]


def test_the_command_reports_a_busy_directory_and_a_corrupt_checkpoint(tmp_path, capsys):
    from fastbptt.cli import main

    with RunDirectoryLock(tmp_path):
        assert main(["train", *TINY_RUN, "--out", str(tmp_path)]) == 2
    assert f"fastbptt: error: {str(tmp_path)!r} is in use by another run (pid {os.getpid()}" in capsys.readouterr().err
    assert main(["train", *TINY_RUN, "--out", str(tmp_path)]) == 0
    path = tmp_path / "checkpoint.pt"
    _flip_bytes_inside(path, load_checkpoint(path)["model"]["head.weight"])
    capsys.readouterr()
    assert main(["train", *TINY_RUN, "--out", str(tmp_path), "--resume", "--max-steps", "4"]) == 2
    assert "fastbptt: error: --resume: " in capsys.readouterr().err
