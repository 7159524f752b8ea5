"""The exception classes embedding_ext raises beyond Python's and PyTorch's own."""


class EmbeddingIndexError(IndexError, RuntimeError):
    """An id (or, on CUDA, a bag offset) outside the table: raised by every op family on
    every device. It is both an ``IndexError`` (what ``F.embedding`` raises for such an id)
    and a ``RuntimeError`` (what ``F.embedding_bag`` raises), so handlers written against
    either keep working."""
