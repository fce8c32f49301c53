"""Text data: corpora, the tokenizer, span views and the text source."""
