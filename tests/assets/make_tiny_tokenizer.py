"""Rebuild tests/assets/tiny-tokenizer: a byte-level BPE (any text encodes) with a ChatML chat template.

Run: python tests/assets/make_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Answer in at most twenty words. Use bullet points. Do not use commas.",
    "What is a good way to learn cooking, travel cheaply, sleep well and save money?",
    "Sure! Here are three tips: drink water, walk daily, and read books.",
    "I think the answer is yes, because it is simple and clear.",
] * 20

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = TEMPLATE
    out = Path(__file__).parent / "tiny-tokenizer"
    fast.save_pretrained(out)
    print(out, len(fast))


if __name__ == "__main__":
    main()
