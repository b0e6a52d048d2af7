"""Pure, I/O-free building blocks: signed messages, at-rest AEAD, sizes, HTTP ranges, tus headers, audit chaining."""
