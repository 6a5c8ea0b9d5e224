"""Data: records -> buckets -> tokens -> packs -> batches."""

from .buckets import bucket_counts, bucket_weights
from .demo import demo_records
from .packing import Batch, collate, pack_examples, packing_efficiency
from .pairs import PreferencePair, load_pairs, make_pairs, pair_weights, save_pairs
from .records import LoadReport, Record, load_records, make_record, read_records
from .text import (bucket_id, detect_language, length_bin, normalize_whitespace, profile_prompt,
                   token_count)
from .tokenize import Example, byte_tokenizer, encode_record, encode_records, load_tokenizer

__all__ = [
    "Record", "PreferencePair", "load_pairs", "make_pairs", "pair_weights", "save_pairs",
    "LoadReport", "load_records", "read_records", "make_record", "token_count",
    "length_bin", "bucket_id", "detect_language", "normalize_whitespace", "profile_prompt",
    "bucket_weights", "bucket_counts", "pack_examples", "collate", "packing_efficiency", "Batch",
    "demo_records", "Example", "byte_tokenizer", "load_tokenizer", "encode_record", "encode_records",
]
