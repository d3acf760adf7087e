"""The model stage of an encode run, shared by the local model thread and Ray's encoder actors:
prepared rows in, encoded entries or row failures out (a failing batch is retried row by row, so one
bad row fails alone)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mmprep.errors import ErrorKind, RowError
from mmprep.faults import fault_point
from mmprep.keys import stored_url
from mmprep.manifest import Record
from mmprep.models import Encoder
from mmprep.pipeline.core import failure_of
from mmprep.store.index import FailureRecord
from mmprep.store.shards import ShardEntry


@dataclass
class Prepared:
    """A decoded, preprocessed row on its way to the model."""

    record: Record
    key: str
    inputs: dict[str, torch.Tensor]
    content_sha256: str
    etag: str | None
    last_modified: str | None


@dataclass
class Encoded:
    """A row's model outputs, on their way into a shard."""

    row: Prepared
    outputs: dict[str, torch.Tensor]
    dedup: bool = False  # copied from a cached entry with the same bytes, not encoded


@dataclass
class Failed:
    failure: FailureRecord


def encode_batch(encoder: Encoder, batch: list[Prepared]) -> list[Encoded | Failed]:
    """Encode a batch; if the batch fails, encode row by row so one bad row fails alone."""
    try:
        fault_point("in_encode")
        outputs = encoder.encode([row.inputs for row in batch])
        return [Encoded(row, out) for row, out in zip(batch, outputs)]
    except Exception as exc:
        if len(batch) == 1:
            error = RowError(ErrorKind.ENCODE_ERROR, f"{type(exc).__name__}: {exc}")
            return [Failed(failure_of(batch[0].record, batch[0].key, error))]
    results: list[Encoded | Failed] = []
    for row in batch:
        results.extend(encode_batch(encoder, [row]))
    return results


def entry_of(item: Encoded) -> ShardEntry:
    """The shard entry of an encoded row (data URLs stored by hash)."""
    r = item.row.record
    return ShardEntry(
        key=item.row.key,
        url=stored_url(r.url),
        caller_id=r.id,
        tensors=dict(item.outputs),
        content_sha256=item.row.content_sha256,
        created=time.time(),
        etag=item.row.etag,
        last_modified=item.row.last_modified,
    )
