"""Reading log files as batches of raw lines.

``beam.io.ReadFromText`` emits one element per line, and on the Python runners
the per-element cost of the read and of handing each line to the next DoFn
was a third of the job's time. ``ReadLineBatches`` is the same splittable
file source (Beam's ``FileBasedSource``: globs, any filesystem, gzip/bz2 by
extension, dynamic splitting) emitting lists of raw lines instead, each
tagged with its input. All inputs (train, eval, valid globs) are one read,
so the runner reads them in one stage instead of one stage each.

Line semantics are those of ``ReadFromText`` with ``BytesCoder``: a line ends
at ``\\n`` (a preceding ``\\r`` is removed too), the last line of a file needs
no terminator, empty lines are records, and a line belongs to the range in
which it starts. A batch is claimed from the range tracker once, at its last
line's start (not once per line, under the tracker's lock): a split is
only accepted past the last claimed position, so when the claim fails because
a split moved the range's stop into the batch, the lines from the new stop on
are dropped (the residual range reads them), and a split never duplicates or
drops a line (``tests/test_etl_sources.py``, with Beam's split checks).
"""
from __future__ import annotations

import bisect

import apache_beam as beam
from apache_beam.io import filebasedsource
from apache_beam.io.concat_source import ConcatSource
from apache_beam.io.filesystem import CompressionTypes

DEFAULT_BATCH = 500


class _LineBatchSource(filebasedsource.FileBasedSource):
    def __init__(self, file_pattern: str, batch_size: int, tag=None, compression_type=CompressionTypes.AUTO):
        super().__init__(file_pattern, compression_type=compression_type)
        self._batch_size = batch_size
        self._tag = tag

    def read_records(self, file_name, range_tracker):
        start = range_tracker.start_position()
        batch_size, tag = self._batch_size, self._tag
        with self.open_file(file_name) as f:
            if start > 0:
                # The line holding byte start-1 belongs to the previous range.
                f.seek(start - 1)
                pos = start - 1 + len(f.readline())
            else:
                pos = 0
            while True:
                batch, starts, stop = [], [], range_tracker.stop_position()
                while len(batch) < batch_size and pos < stop:
                    line = f.readline()
                    if not line:
                        break
                    starts.append(pos)
                    pos += len(line)
                    if line.endswith(b"\n"):
                        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
                    batch.append(line)
                if not batch:
                    return
                if not range_tracker.try_claim(starts[-1]):
                    # A split moved the stop into this batch: lines from it on are the residual's.
                    keep = bisect.bisect_left(starts, range_tracker.stop_position())
                    if keep:
                        yield tag, batch[:keep]
                    return
                yield tag, batch


class ReadLineBatches(beam.PTransform):
    """PCollection of ``(tag, lines)``: lists (up to ``batch_size``) of raw ``bytes`` lines of the
    files matching each glob of ``inputs``, a sequence of ``(tag, glob)``.

    The globs are one source (Beam's ``ConcatSource``, what ``FileBasedSource`` itself builds for
    a glob of several files), so the runner splits and reads all files in one stage.
    """

    def __init__(self, inputs, batch_size: int = DEFAULT_BATCH):
        super().__init__()
        sources = [_LineBatchSource(pattern, batch_size, tag) for tag, pattern in inputs]
        self._source = sources[0] if len(sources) == 1 else ConcatSource(sources)

    def expand(self, pbegin):
        return pbegin | beam.io.Read(self._source)
