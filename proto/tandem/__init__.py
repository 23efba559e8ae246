"""The `tandem` contract package: what orchestrator and workers both import (wire types, block
hashing, tokenizer). It imports neither of them, nor torch or ray."""
