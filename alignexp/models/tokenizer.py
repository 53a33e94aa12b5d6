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


def apply_conventions(tokenizer, source: str = "") -> dict[str, object]:
    """Make a loaded tokenizer meet alignexp's conventions; returns them (logged by the caller).

    * **EOS** ends every response (added when a response is encoded; sampling stops at the first EOS).
      A tokenizer without one is refused: nothing could end a response.
    * **BOS** starts every plain-text prompt where the tokenizer has one (chat prompts get the chat
      template's own opening instead).
    * **pad** fills the unused positions of a batch and is never attended to or read back: log-probs use
      explicit lengths, sampling stops at the first EOS (a finished row pads, even where pad = EOS), and a
      reward model is saved with a pad token of its own, so that Hugging Face's pooling (the last non-pad
      token) is not misled. A tokenizer without a pad token gets its unknown token where that is neither
      EOS nor BOS, else its EOS; one whose pad is already its EOS (SmolLM2, Llama-family ports) keeps it.
    * **Long prompts** keep their last ``model.max_prompt_len`` tokens, responses their first
      ``model.max_response_len`` (a response cut there has no EOS); the tokenizer's own
      ``model_max_length`` is not used (many tokenizers leave it at 1e30).
    * **Chat template**: the tokenizer's own on chat tasks (message lists), else the documented default.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{source or 'the tokenizer'}: it has no EOS token, so no response could end; set "
                         f"tokenizer.eos_token in the folder's tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        unk = tokenizer.unk_token_id
        if unk is not None and unk not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.pad_token = tokenizer.eos_token
    had_template = getattr(tokenizer, "chat_template", None) is not None
    ensure_chat_template(tokenizer)
    return {"bos": (tokenizer.bos_token, tokenizer.bos_token_id), "eos": (tokenizer.eos_token, tokenizer.eos_token_id),
            "pad": (tokenizer.pad_token, tokenizer.pad_token_id), "pad_is_eos": tokenizer.pad_token_id ==
            tokenizer.eos_token_id, "vocab": len(tokenizer),
            "chat_template": "the tokenizer's own" if had_template else "alignexp's default"}
