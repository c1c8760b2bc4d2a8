"""MinHash near-duplicate candidates: word shingles, signatures, LSH bands.

(Schema fixed here first; the arithmetic is filled in by the embeddings/dedup issue.)
"""

from __future__ import annotations

import pyarrow as pa

# near_dup_cluster: the smallest id of the record's connected component of near-duplicate pairs,
# null for a record with no near-duplicate. Which member is kept is decided at selection time.
MINHASH_SCHEMA = pa.schema([("id", pa.string()), ("near_dup_cluster", pa.string())])
