"""Image–caption pairs (data.name=pairs): the readers of their layouts, the captions drawn and tokenized, the source."""
