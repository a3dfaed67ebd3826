"""fastbptt: fused RNN/GRU/LSTM kernels with chunked recompute for truncated BPTT.

Drop-in replacements for ``torch.nn.RNN``, ``torch.nn.GRU`` and ``torch.nn.LSTM``::

    import fastbptt
    rnn = fastbptt.GRU(input_size=64, hidden_size=256, num_layers=2, batch_first=True)

and of the cells ``torch.nn.RNNCell``, ``torch.nn.GRUCell`` and ``torch.nn.LSTMCell``.
"""
from .nn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert
from .ops import cell_step, recurrent_layer

__version__ = "0.1.0"
__all__ = ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "convert", "recurrent_layer", "cell_step",
           "__version__"]
