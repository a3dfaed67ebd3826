"""Character-level language model trained with truncated BPTT on fastbptt's recurrent layers.

``fastbptt train`` / ``predict`` / ``sweep`` drive it from the command line (:mod:`.cli`).
"""
from .data import Vocabulary, default_corpus, load_text, split_text, tiny_corpus_path
from .generate import generate, next_char_distribution, warm_up
from .model import CharLM, LMConfig

__all__ = ["CharLM", "LMConfig", "Vocabulary", "default_corpus", "load_text", "split_text", "tiny_corpus_path",
           "generate", "next_char_distribution", "warm_up"]
