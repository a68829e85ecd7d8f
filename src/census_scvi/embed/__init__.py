"""Embed stage: every cell's latent, chunked and resumable, SOMA embedding, minified model."""

from census_scvi.embed._stage import (
    EmbedResult,
    encode_csr,
    load_encoder,
    round_bfloat16,
    run_embed,
)

__all__ = [
    "EmbedResult",
    "encode_csr",
    "load_encoder",
    "round_bfloat16",
    "run_embed",
]
