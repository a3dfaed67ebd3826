"""PyTorch's own module test samples (``torch.testing._internal.common_modules.module_db``) for
torch.nn.RNN, torch.nn.GRU and torch.nn.LSTM and their cells (RNNCell, GRUCell, LSTMCell), run
through fastbptt's twins side by side with torch.nn.

* Every sample of ``module_inputs_func`` (training and eval; with ``with_packed_sequence=True``
  where the function takes it, which yields its plain samples plus the packed ones), in float64 on
  CPU: both modules get torch.nn's weights, run the same (separately cloned) inputs, and must agree
  on the output, the final states and the gradients of every input that requires grad and of every
  parameter, for the backward of the sum of all floating outputs.
* Every sample of ``module_error_inputs_func``: fastbptt must raise the same error type, matching
  the same regex, at the same stage (constructor or forward) as torch.nn.
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import fastbptt

DEVICE = "cpu"
DTYPE = torch.float64
SEED = 0

MODULE_CLASSES = (torch.nn.RNN, torch.nn.GRU, torch.nn.LSTM, torch.nn.RNNCell, torch.nn.GRUCell, torch.nn.LSTMCell)
MODULE_INFOS = [info for info in module_db if info.module_cls in MODULE_CLASSES]
assert len(MODULE_INFOS) == len(MODULE_CLASSES), [info.name for info in MODULE_INFOS]


def _accepts(func, name: str) -> bool:
    """Whether ``func`` (possibly a functools.partial) names ``name`` as a parameter (a bare **kwargs
    swallowing it does not count)."""
    return name in inspect.signature(func).parameters


# ------------------------------------------------------------------------------ readable ids
def _describe_value(value) -> str:
    if isinstance(value, PackedSequence):
        return "packed" + "x".join(map(str, value.data.shape)) + "-bs" + "_".join(map(str, value.batch_sizes.tolist()))
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) or "scalar"
    if isinstance(value, (tuple, list)):
        return "+".join(_describe_value(v) for v in value)
    return repr(value)


def _describe_constructor(function_input) -> str:
    parts = [_describe_value(a) for a in function_input.args]
    short = {"input_size": "in", "hidden_size": "hid", "num_layers": "L", "nonlinearity": "",
             "proj_size": "proj", "batch_first": "bf", "bias": "bias", "bidirectional": "bidir"}
    for key, value in function_input.kwargs.items():
        if key in ("device",):
            continue
        if key == "dtype":
            parts.append(str(value).replace("torch.", ""))
        elif key in ("batch_first", "bias", "bidirectional") and not isinstance(value, bool):
            parts.append(f"{key}={value!r}")  # the error samples' wrongly typed flags, spelled out
        elif isinstance(value, bool) and key in short:
            if value:
                parts.append(short[key])
            else:
                parts.append("no" + short[key] if key == "bias" else "")
        elif key in short:
            if key == "proj_size" and value == 0:
                continue
            parts.append(f"{short[key]}{value}")
        else:
            parts.append(f"{key}={value!r}")
    return "-".join(p for p in parts if p)


def _describe_forward(function_input) -> str:
    if function_input is None:
        return "noforward"
    args = [_describe_value(a) for a in function_input.args]
    if len(function_input.args) == 1:
        args.append("nohx")
    else:
        args[1] = "hx" + args[1]
    args += [f"{k}={_describe_value(v)}" for k, v in function_input.kwargs.items()]
    return "-".join(args)


def _sample_id(info, mode: str, index: int, sample) -> str:
    parts = [info.name.split(".")[-1], mode, f"{index:02d}"]
    if sample.desc:
        parts.append(sample.desc)
    parts += [_describe_constructor(sample.constructor_input), _describe_forward(sample.forward_input)]
    return "-".join(parts).replace(" ", "")


# ------------------------------------------------------------------------------ sample collection
def _module_samples():
    params = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for info in MODULE_INFOS:
            extra = {"with_packed_sequence": True} if _accepts(info.module_inputs_func, "with_packed_sequence") else {}
            for training in (True, False):
                mode = "train" if training else "eval"
                samples = info.module_inputs_func(info, device=DEVICE, dtype=DTYPE, requires_grad=True,
                                                  training=training, **extra)
                for index, sample in enumerate(samples):
                    params.append(pytest.param(info, training, sample, id=_sample_id(info, mode, index, sample)))
    return params


def _error_samples():
    params = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        for info in MODULE_INFOS:
            if info.module_error_inputs_func is None:
                continue
            samples = info.module_error_inputs_func(info, device=DEVICE, dtype=DTYPE, requires_grad=False,
                                                    training=True)
            for index, error_input in enumerate(samples):
                stage = "ctor" if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR else "forward"
                sample = error_input.module_error_input
                ident = "-".join([info.name.split(".")[-1], "error", f"{index:02d}", stage,
                                  error_input.error_type.__name__,
                                  _describe_constructor(sample.constructor_input)]).replace(" ", "")
                params.append(pytest.param(info, error_input, id=ident))
    return params


# ------------------------------------------------------------------------------ helpers
def _clone(value):
    """A fresh copy of a forward argument: tensors become new leaves with the same requires_grad."""
    if isinstance(value, PackedSequence):
        return PackedSequence(_clone(value.data), value.batch_sizes, value.sorted_indices, value.unsorted_indices)
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _leaves(value, path="out"):
    """(path, tensor) for every tensor in a nested value; a PackedSequence contributes .data and
    .batch_sizes (and its index permutations when present)."""
    if isinstance(value, PackedSequence):
        yield f"{path}.data", value.data
        yield f"{path}.batch_sizes", value.batch_sizes
        if value.sorted_indices is not None:
            yield f"{path}.sorted_indices", value.sorted_indices
        if value.unsorted_indices is not None:
            yield f"{path}.unsorted_indices", value.unsorted_indices
    elif isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{path}[{k!r}]")


def _structure(value):
    """The nesting of a value with its tensors replaced by their type name, to compare shapes of results."""
    if isinstance(value, PackedSequence):
        return "PackedSequence"
    if isinstance(value, torch.Tensor):
        return "Tensor"
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_structure(v) for v in value)
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    return type(value).__name__


def _build(cls, constructor_input):
    return cls(*constructor_input.args, **constructor_input.kwargs)


def _fastbptt_cls(info):
    return getattr(fastbptt, info.module_cls.__name__)


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("info, training, sample", _module_samples())
def test_module_db_sample(info, training, sample):
    torch_cls, fast_cls = info.module_cls, _fastbptt_cls(info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        ref = _build(torch_cls, sample.constructor_input).to(device=DEVICE, dtype=DTYPE)
        fast = _build(fast_cls, sample.constructor_input).to(device=DEVICE, dtype=DTYPE)
    if training and getattr(ref, "dropout", 0) > 0:
        pytest.skip("dropout > 0 in training mode: the two modules draw different masks (compared in eval mode)")
    fast.load_state_dict(ref.state_dict())
    ref.train(training)
    fast.train(training)

    names_ref = [n for n, _ in ref.named_parameters()]
    names_fast = [n for n, _ in fast.named_parameters()]
    assert names_fast == names_ref

    args_ref, kwargs_ref = _clone(sample.forward_input.args), _clone(sample.forward_input.kwargs)
    args_fast, kwargs_fast = _clone(sample.forward_input.args), _clone(sample.forward_input.kwargs)

    out_ref = ref(*args_ref, **kwargs_ref)
    out_fast = fast(*args_fast, **kwargs_fast)

    # outputs and final states
    assert _structure(out_fast) == _structure(out_ref)
    leaves_ref, leaves_fast = list(_leaves(out_ref)), list(_leaves(out_fast))
    for (path, a), (_, b) in zip(leaves_fast, leaves_ref):
        torch.testing.assert_close(a, b, msg=lambda m, path=path: f"{path}: {m}")

    # backward of the sum of every floating output
    def total(leaves):
        floats = [t for _, t in leaves if t.is_floating_point() and t.requires_grad]
        return sum(t.sum() for t in floats)

    loss_ref, loss_fast = total(leaves_ref), total(leaves_fast)
    assert isinstance(loss_ref, torch.Tensor) and isinstance(loss_fast, torch.Tensor)
    loss_ref.backward()
    loss_fast.backward()

    inputs_ref = [(p, t) for p, t in _leaves((args_ref, kwargs_ref), "input") if t.requires_grad]
    inputs_fast = [(p, t) for p, t in _leaves((args_fast, kwargs_fast), "input") if t.requires_grad]
    assert [p for p, _ in inputs_fast] == [p for p, _ in inputs_ref]
    assert inputs_ref, "no input requires grad"
    for (path, a), (_, b) in zip(inputs_fast, inputs_ref):
        assert (a.grad is None) == (b.grad is None), f"grad of {path}: fastbptt {a.grad}, torch.nn {b.grad}"
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m, path=path: f"grad of {path}: {m}")

    for (name, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        assert (a.grad is None) == (b.grad is None), f"grad of {name}: fastbptt {a.grad}, torch.nn {b.grad}"
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


def _expect_error(label: str, stage: str, error_input, call) -> None:
    """Runs ``call`` and checks it raises ``error_input``'s type with a message matching its regex."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - every exception is checked below
        assert isinstance(exc, error_input.error_type), (
            f"{label}: {stage} raised {type(exc).__name__}: {exc}; expected {error_input.error_type.__name__} "
            f"matching {error_input.error_regex!r}")
        assert re.search(error_input.error_regex, str(exc)), (
            f"{label}: {stage} message {str(exc)!r} does not match {error_input.error_regex!r}")
    else:
        pytest.fail(f"{label}: {stage} did not raise; expected {error_input.error_type.__name__} "
                    f"matching {error_input.error_regex!r}")


@pytest.mark.parametrize("info, error_input", _error_samples())
def test_module_db_error(info, error_input):
    sample = error_input.module_error_input
    for cls in (info.module_cls, _fastbptt_cls(info)):  # torch.nn first: the sample itself is sound
        label = f"{cls.__module__}.{cls.__name__}"
        if error_input.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            _expect_error(label, "constructor", error_input, lambda cls=cls: _build(cls, sample.constructor_input))
            continue
        try:
            module = _build(cls, sample.constructor_input)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{label}: expected a forward error, but the constructor raised {type(exc).__name__}: {exc}")
        module.train(True)
        args, kwargs = _clone(sample.forward_input.args), _clone(sample.forward_input.kwargs)
        _expect_error(label, "forward", error_input, lambda module=module, args=args, kwargs=kwargs: module(*args, **kwargs))
