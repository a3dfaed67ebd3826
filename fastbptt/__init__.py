"""fastbptt: fused RNN/GRU/LSTM kernels with chunked recompute for truncated BPTT.

Drop-in replacements for ``torch.nn.RNN``, ``torch.nn.GRU`` and ``torch.nn.LSTM``::

    import fastbptt
    rnn = fastbptt.GRU(input_size=64, hidden_size=256, num_layers=2, batch_first=True)
"""
from .nn import GRU, LSTM, RNN, convert
from .ops import recurrent_layer

__version__ = "0.1.0"
__all__ = ["RNN", "GRU", "LSTM", "convert", "recurrent_layer", "__version__"]
