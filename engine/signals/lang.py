"""Language identification: per-record language of the instruction and the response side.

(Schema fixed here first; the detector is filled in by the language issue.)
"""

from __future__ import annotations

import pyarrow as pa

LANG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("lang", pa.string()),  # ISO 639-1 of the instruction side ("und" when undetermined)
        ("lang_confidence", pa.float64()),
        ("response_lang", pa.string()),
        ("response_lang_confidence", pa.float64()),
        ("lang_mismatch", pa.bool_()),
    ]
)
