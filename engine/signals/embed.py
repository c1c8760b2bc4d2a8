"""Sentence embeddings: which text of a record is embedded, and the sidecar schema.

(Schema fixed here first; the embedder is filled in by the embeddings issue.)
"""

from __future__ import annotations

import pyarrow as pa

EMBED_SCHEMA = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])
