"""A byte-level tokenizer built locally and deterministically: no download, any text.

Every UTF-8 byte is one token (256 ids, GPT-2's byte-to-unicode alphabet), followed by the special
tokens ``<pad>``, ``<s>`` and ``</s>``. No merges: the same text always gives the same ids on every
machine, and the real tasks' fixtures (any language, any symbol) run on the tiny model too.
It is a ``PreTrainedTokenizerFast``, saved and reloaded with the usual ``save_pretrained`` /
``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

# The default chat format for tokenizers without a chat template (documented in the README):
# each message is "<|role|>\n{content}\n", and generation continues after "<|assistant|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer: 256 byte tokens then <pad>=256, <s>=257, </s>=258."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # A fixed order (by the byte each symbol stands for) so ids equal byte values.
    byte_to_symbol = _bytes_to_unicode()
    vocab = {byte_to_symbol[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for offset, token in enumerate((PAD, BOS, EOS)):
        vocab[token] = 256 + offset
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                        eos_token=EOS, clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"pad_token": PAD, "bos_token": BOS, "eos_token": EOS})
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode symbols (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the documented default one."""
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
