"""Failing streams: a shard source that breaks mid-read (a `pipe:` command that exits non-zero part-way, an object
store hiccup) is reopened with backoff and read on after the samples already taken, so the stream equals an unbroken
read and resume stays exact; a source that keeps failing is skipped and counted (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_shards
from test_data_pipeline import TOK, _assert_same, _cfg, _dataset_states, _take

import data_pipelines.shards as shards_mod
from data_pipelines.loader import build_loader, data_counts
from data_pipelines.shards import iter_tar

# Serves a shard through a pipe, counting attempts in a file per shard. A failing attempt writes the first half of
# the shard's bytes (cutting a tar member in two), then: "first" / "alternate" (the first / every other attempt)
# exit 1, as a download that breaks part-way; "always" exits 0, a stream that simply ends early.
FLAKY = """\
n=$(cat "$2" 2>/dev/null || echo 0)
echo $((n + 1)) > "$2"
size=$(wc -c < "$1")
if [ "$3" = always ] || { [ "$3" = first ] && [ "$n" = 0 ]; } || { [ "$3" = alternate ] && [ $((n % 2)) = 0 ]; }
then
  head -c $((size / 2)) "$1"
  [ "$3" = always ] || exit 1
  exit 0
fi
cat "$1"
"""


def flaky_urls(tmp_path: Path, spec: str, mode: str) -> tuple[list[str], list[Path]]:
    """``pipe:`` URLs serving each local shard of ``spec`` through the flaky script, and their attempt counters."""
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY)
    urls, counters = [], []
    for shard in shards_mod.expand_shard_spec(spec):
        counter = tmp_path / f"{Path(shard).name}.attempts"
        urls.append(f"pipe:sh {script} {shard} {counter} {mode}")
        counters.append(counter)
    return urls, counters


def flaky_shard(tmp_path: Path, mode: str) -> tuple[str, str, Path]:
    """One local shard of 12 samples: its path, a ``pipe:`` URL serving it through the flaky script, the counter."""
    spec = make_shards(tmp_path / "data", n_shards=1, per_shard=12)
    (url,), (counter,) = flaky_urls(tmp_path, spec, mode)
    return shards_mod.expand_shard_spec(spec)[0], url, counter


def attempts(counter: Path) -> int:
    return int(counter.read_text()) if counter.exists() else 0


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays asked for (recorded, not slept)."""
    asked: list[float] = []
    monkeypatch.setattr(shards_mod, "_sleep", asked.append)
    return asked


def _raw(samples) -> list[tuple[int, str, bytes, bytes]]:
    return [(i, s["__key__"], s["png"], s["txt"]) for i, s in samples]


# ---------------------------------------------------------------------------------------------------------------
# one shard


def test_a_stream_that_breaks_on_its_first_attempt_reads_like_an_unbroken_one(tmp_path, sleeps):
    path, url, counter = flaky_shard(tmp_path, "first")
    errors = []
    got = _raw(iter_tar(url, retries=3, backoff_s=0.5, on_error=lambda *a: errors.append(a[0])))
    unbroken = _raw(iter_tar(path))
    assert len(unbroken) == 12 and got == unbroken  # every sample once, in order, same bytes
    assert errors == ["shard_retries"] and attempts(counter) == 2 and sleeps == [0.5]


def test_start_and_keep_survive_a_retry(tmp_path, sleeps):
    path, url, _ = flaky_shard(tmp_path, "first")
    keep = lambda i: i % 3 != 1  # noqa: E731 - a sample split, as with fewer shards than readers
    got = _raw(iter_tar(url, start=2, keep=keep, retries=1, backoff_s=0.0))
    assert got == _raw(iter_tar(path, start=2, keep=keep))


def test_a_stream_that_always_fails_is_skipped_and_counted_after_its_retries(tmp_path, sleeps):
    path, url, counter = flaky_shard(tmp_path, "always")
    errors = []
    got = _raw(iter_tar(url, retries=3, backoff_s=0.25, on_error=lambda *a: errors.append(a[0])))
    unbroken = _raw(iter_tar(path))
    assert 0 < len(got) < 12 and got == unbroken[: len(got)]  # the samples before the cut, once each
    assert errors == ["shard_retries"] * 3 + ["corrupt_shard"] and attempts(counter) == 4
    assert sleeps == [0.25, 0.5, 1.0]  # exponential backoff
    # a source that fails before its first byte (the object is gone, the command exits 1) is a missing shard
    errors.clear()
    assert list(iter_tar("pipe:exit 1", retries=2, backoff_s=0.0, on_error=lambda *a: errors.append(a[0]))) == []
    assert errors == ["shard_retries", "shard_retries", "missing_shard"]


def test_local_format_errors_are_not_retried(tmp_path, sleeps):
    """Bytes on a local disk read the same the next time: a corrupt or missing local shard is skipped at once."""
    full = Path(shards_mod.expand_shard_spec(make_shards(tmp_path, n_shards=1, per_shard=6))[0])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    errors = []
    for url in (str(cut), str(tmp_path / "missing.tar")):
        list(iter_tar(url, retries=3, backoff_s=1.0, on_error=lambda *a: errors.append(a[0])))
    assert errors == ["corrupt_shard", "missing_shard"] and sleeps == []


def test_a_local_io_error_is_retried_after_the_samples_already_read(tmp_path, sleeps, monkeypatch):
    """EIO from a network filesystem is transient: the shard is reopened, and the read goes on after the samples
    the broken attempt had already yielded."""
    import errno

    path = shards_mod.expand_shard_spec(make_shards(tmp_path, n_shards=1, per_shard=6))[0]
    real = shards_mod.gopen
    calls = []

    def flaky_gopen(url, mode="rb"):
        calls.append(url)
        stream = real(url, mode)
        if len(calls) == 1:
            class Broken:
                def __init__(self):
                    self.served = 0

                def read(self, n=-1):
                    if self.served > 6000:
                        raise OSError(errno.EIO, "Input/output error")
                    data = stream.read(n)
                    self.served += len(data)
                    return data

                def close(self):
                    stream.close()
            return Broken()
        return stream

    monkeypatch.setattr(shards_mod, "gopen", flaky_gopen)
    errors = []
    got, opened = [], []
    for sample in iter_tar(path, retries=2, backoff_s=0.0, on_error=lambda *a: errors.append(a[0])):
        got.append(sample)
        opened.append(len(calls))  # how many times the shard had been opened when this sample came out
    monkeypatch.undo()
    assert _raw(got) == _raw(iter_tar(path)) and errors == ["shard_retries"] and len(calls) == 2
    assert 0 < opened.count(1) < len(got)  # part before the error, the rest from the reopened shard


# ---------------------------------------------------------------------------------------------------------------
# the training loader


def test_loader_over_a_flaky_stream_equals_the_unbroken_one_and_counts_retries(tmp_path, sleeps):
    spec = make_shards(tmp_path / "data", n_shards=3, per_shard=8)
    urls, counters = flaky_urls(tmp_path, spec, "first")
    kw = dict(repeat=False, shard_retries=3, shard_retry_backoff_s=0.01, format="pixels")  # (no peek at a shard)
    loader = build_loader(_cfg(",".join(urls), **kw), TOK, (2, 2), seed=5)
    got = list(loader)
    reference = list(build_loader(_cfg(spec, **kw), TOK, (2, 2), seed=5))
    assert len(got) == len(reference) > 1
    for a, b in zip(got, reference, strict=True):
        _assert_same(a, b)
    counts = data_counts(loader.state_dict())
    assert counts["shard_retries"] == 3 and counts["corrupt_shard"] == 0 and counts["missing_shard"] == 0
    assert [attempts(c) for c in counters] == [2, 2, 2]


def test_a_shard_that_keeps_failing_is_skipped_and_the_run_goes_on(tmp_path, sleeps):
    spec = make_shards(tmp_path / "data", n_shards=2, per_shard=8)
    urls, counters = flaky_urls(tmp_path, spec, "always")
    good = make_shards(tmp_path / "good", n_shards=1, per_shard=8, prefix="good")
    cfg = _cfg(f"{good},{urls[0]}", repeat=False, shard_retries=2, shard_retry_backoff_s=0.01)
    loader = build_loader(cfg, TOK, (2, 2), seed=0)
    keys = [k for b in loader for k in b.keys]
    counts = data_counts(loader.state_dict())
    assert {f"k{i:04d}" for i in range(8)} <= set(keys)  # the good shard, whole (its keys are k0000..k0007 too)
    assert counts["corrupt_shard"] == 1 and counts["shard_retries"] == 2 and attempts(counters[0]) == 3


@pytest.mark.parametrize("num_workers,ks", [(0, [1, 3, 5, 8]), (2, [3, 7])])
def test_resume_is_exact_over_a_flaky_stream(tmp_path, sleeps, num_workers, ks):
    """Every other open of every shard breaks half-way (`alternate`): taking the state after k batches, rebuilding
    and loading it gives the unbroken stream's next batches, and so does the uninterrupted flaky run."""
    spec = make_shards(tmp_path / "data", n_shards=4, per_shard=10)
    urls, _ = flaky_urls(tmp_path, spec, "alternate")
    kw = dict(num_workers=num_workers, shard_retries=3, shard_retry_backoff_s=0.01)
    flaky, unbroken = _cfg(",".join(urls), **kw), _cfg(spec, **kw)
    total = 10
    reference, _ = _take(build_loader(unbroken, TOK, (2, 2), seed=7), total)
    straight, end_state = _take(build_loader(flaky, TOK, (2, 2), seed=7), total)
    for a, b in zip(reference, straight, strict=True):
        _assert_same(a, b)
    assert data_counts(end_state)["shard_retries"] > 0
    positions = set()
    for k in ks:
        _, state = _take(build_loader(flaky, TOK, (2, 2), seed=7), k)
        resumed = build_loader(flaky, TOK, (2, 2), seed=7)
        resumed.load_state_dict(state)
        rest, resumed_end = _take(resumed, total - k)
        for a, b in zip(reference[k:], rest, strict=True):
            _assert_same(a, b)
        skip = {"shard_retries"}  # retries are events of this read, not properties of the data
        assert {k: v for k, v in data_counts(resumed_end).items() if k not in skip} == \
            {k: v for k, v in data_counts(end_state).items() if k not in skip}
        positions |= {(ds["stream"]["epoch"], ds["stream"]["shard_cursor"]) for ds in _dataset_states(state)}
    assert len({p[1] for p in positions}) > 1  # resumed from inside different shards


# ---------------------------------------------------------------------------------------------------------------
# messages that name the right cause when shards cannot be read


def test_latents_format_over_unreadable_shards_says_they_could_not_be_read(tmp_path, sleeps):
    from data_pipelines.loader import resolve_format
    from data_pipelines.shards import DataError

    (tmp_path / "junk.tar").write_bytes(b"\x00not a tar" * 100)
    urls = [str(tmp_path / "junk.tar"), "pipe:exit 1"]
    with pytest.raises(DataError, match=r"none of the first 2 shard\(s\) .* could be read") as e:
        resolve_format(urls, "latents", 8, (2, 2), retries=1)
    assert "has no <key>.latent" not in str(e.value) and sleeps == [0.0]


def test_resuming_over_a_shard_that_became_unreadable_names_it(tmp_path):
    from data_pipelines.shards import DataError, ShardStream

    (url,) = shards_mod.expand_shard_spec(make_shards(tmp_path, n_shards=1, per_shard=6))
    stream = ShardStream([url], seed=0, shuffle_buffer=4)
    for _ in range(2):
        next(stream)
    state = stream.state_dict()  # inside the first block: resuming re-reads it
    Path(url).unlink()
    with pytest.raises(DataError, match=r"shards could not be read while resuming \(missing_shard=1\).*--reset-data"):
        ShardStream([url], seed=0, shuffle_buffer=4).load_state_dict(state)
