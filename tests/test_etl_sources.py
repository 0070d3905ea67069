"""``etl.sources``: line batches read as ``ReadFromText`` reads lines, under Beam's split checks."""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.io import source_test_utils
from apache_beam.io.range_trackers import OffsetRangeTracker
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from etl import sources

# CRLF, empty lines and a last line without its terminator; the lines are the records.
RAW = b"1 a:1\r\n0 b:1\n\n1 c:1 d:1\n" + b"".join(b"%d x%d:1\n" % (i % 2, i) for i in range(40)) + b"0 last:1"
LINES = [b"1 a:1", b"0 b:1", b"", b"1 c:1 d:1"] + [b"%d x%d:1" % (i % 2, i) for i in range(40)] + [b"0 last:1"]


class _Lines(sources._LineBatchSource):
    """The batches' lines one by one, so Beam's split checks compare lines, not batchings."""

    def read_records(self, file_name, range_tracker):
        for tag, batch in super().read_records(file_name, range_tracker):
            assert tag == "t" and 0 < len(batch) <= self._batch_size
            yield from batch


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "log.libfm"
    path.write_bytes(RAW)
    return str(path)


@pytest.mark.parametrize("batch_size", [1, 3, 500])
def test_lines_are_those_of_read_from_text(log, batch_size):
    assert source_test_utils.read_from_source(_Lines(log, batch_size, "t")) == LINES


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_no_split_duplicates_or_drops_a_line(log, batch_size):
    """Beam's exhaustive check: after every number of lines read, a split at every fraction
    either fails or leaves primary + residual = all lines; also with the split racing the read."""
    (bundle,) = _Lines(log, batch_size, "t").split(desired_bundle_size=1 << 20)
    source_test_utils.assert_split_at_fraction_exhaustive(bundle.source, bundle.start_position,
                                                          bundle.stop_position, perform_multi_threaded_test=True)


def test_initial_splits_cover_every_line_once(log):
    source = _Lines(log, 4, "t")
    bundles = list(source.split(desired_bundle_size=37))  # ranges that start and end inside lines
    assert len(bundles) > 5
    source_test_utils.assert_sources_equal_reference_source(
        (source, None, None), [(b.source, b.start_position, b.stop_position) for b in bundles])


def test_inputs_are_one_read_with_their_tags(tmp_path):
    (tmp_path / "train.libfm").write_bytes(b"1 a:1\n0 b:1\n")
    (tmp_path / "eval.libfm").write_bytes(b"1 c:1\n")
    with TestPipeline() as p:
        got = (p | sources.ReadLineBatches([(0, str(tmp_path / "train.libfm")), (1, str(tmp_path / "eval.libfm"))])
               | beam.FlatMap(lambda tb: [(tb[0], line) for line in tb[1]]))
        assert_that(got, equal_to([(0, b"1 a:1"), (0, b"0 b:1"), (1, b"1 c:1")]))


class _SplitBeforeSecondClaim(OffsetRangeTracker):
    """A tracker on which a split at ``split_at`` is asked for while the second batch is being
    read, between the reader's look at the stop and its claim (the race the claim settles)."""

    def __init__(self, start, stop, split_at):
        super().__init__(start, stop)
        self._split_at, self._claims, self.split = split_at, 0, None

    def try_claim(self, position):
        self._claims += 1
        if self._claims == 2:  # a split is refused before the first claim
            self.split = self.try_split(self._split_at)
        return super().try_claim(position)


def test_a_split_landing_inside_a_batch_hands_its_tail_to_the_residual(log):
    source = sources._LineBatchSource(log, 10, "t")

    def lines(tracker):
        return [line for _, batch in source.read_records(log, tracker) for line in batch]

    accepted = 0
    for split_at in range(1, len(RAW)):
        tracker = _SplitBeforeSecondClaim(0, len(RAW), split_at)
        primary = lines(tracker)
        if tracker.split is None:  # at or before the first batch's last line: refused
            assert primary == LINES, split_at
            continue
        accepted += 1
        assert primary + lines(OffsetRangeTracker(split_at, len(RAW))) == LINES, split_at
    assert accepted > 150  # every offset past the first batch's last line start
