"""Errors and skip accounting shared by every stage of the data pipeline.

Nothing in the pipeline stops on one bad sample or shard: sample-level problems raise ``SkipSample(reason)`` inside
the decoders and are counted by the caller; shard-level problems are counted by the tar reader. The counts travel
with the loader state (see ``data_pipelines.loader``) and reach the trainer's log line and tensorboard.

    reason              kind     meaning
    bad_image           sample   image bytes that do not decode
    no_image            sample   an (image, caption) sample without an image (or latent) member
    missing_caption     sample   caption absent, empty, not UTF-8, or not a string in the json record
    caption_too_long    sample   caption over data.max_text_tokens tokens or data.max_caption_chars characters
    too_long_for_row    sample   a document that cannot fit one row (data.long_documents = "skip", or nothing left)
    image_too_small     sample   an image whose shorter side is under data.min_image_size pixels
    bad_document        sample   an interleaved document whose segments are malformed or name a missing image
    bad_latent          sample   a latent member that does not parse, or whose shape differs from the stream's
    corrupt_shard       shard    a tar stream that broke after its first member (truncated, corrupt), after retries
    missing_shard       shard    a shard that could not be opened (missing file, failing pipe: command), after retries
    truncated           info     a document cut at a segment boundary to fit a row (kept, not a skip)
    shard_retries       info     reopenings of a shard whose source failed mid-read (data.shard_retries; the read
                                 goes on after the samples already taken, so nothing is lost or repeated)
"""

from __future__ import annotations

# Per-sample skip reasons (they count against data.max_skip_rate) and per-shard error reasons (they do not).
SAMPLE_SKIP_REASONS = ("bad_image", "no_image", "missing_caption", "caption_too_long", "too_long_for_row",
                       "image_too_small", "bad_document", "bad_latent")
SHARD_ERROR_REASONS = ("corrupt_shard", "missing_shard")
SKIP_REASONS = SAMPLE_SKIP_REASONS + SHARD_ERROR_REASONS
SHARD_RETRY = "shard_retries"
INFO_COUNTS = ("truncated", SHARD_RETRY)
COUNT_KEYS = ("seen",) + SKIP_REASONS + INFO_COUNTS  # "seen": raw samples a reader took from its stream


class ShardSpecError(ValueError):
    """A shard spec that names no data."""


class DataError(RuntimeError):
    """The data stream cannot go on usefully (too many skipped samples, nothing readable)."""


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SAMPLE_SKIP_REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_KEYS, 0)
