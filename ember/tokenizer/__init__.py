"""ember.tokenizer: byte-level BPE training (HF tokenizers), loading of HF / GPT-2 / tiktoken files with
tiktoken-exact encoding, and chat templates. See `Tokenizer` and `train_bpe`."""

from ember.tokenizer.tokenizer import EOS, PAD, Tokenizer, copy_tokenizer
from ember.tokenizer.train import DEFAULT_SPECIALS, train_bpe

__all__ = ["Tokenizer", "train_bpe", "copy_tokenizer", "EOS", "PAD", "DEFAULT_SPECIALS"]
