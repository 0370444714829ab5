"""A tiny frozen-teacher folder for token relation distillation tests: a 2-layer BERT with its own WordPiece tokenizer
(lower-cased, a different tokenisation from the tiny byte-level BPE student's), built in-process."""

from __future__ import annotations

from pathlib import Path


def make_tiny_teacher(path: str | Path, hidden_size: int = 12, seed: int = 0) -> str:
    """Save the teacher (model + fast tokenizer) into ``path`` once; return the folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from lit_ft.testing import tiny_corpus

    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(tiny_corpus(), trainer=trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                                              show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                                ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=2 * hidden_size,
                                 max_position_embeddings=64))
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    model.save_pretrained(str(path))
    return str(path)
