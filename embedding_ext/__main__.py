"""``python -m embedding_ext``: versions, backends, devices, and a self-check of every op
against torch.nn.Embedding on every available device (embedding_ext/selfcheck.py)."""
import sys

from .selfcheck import main

sys.exit(main(sys.argv[1:]))
