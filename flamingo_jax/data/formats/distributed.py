"""Distributed builds: the format builders under Apache Beam (TFDS' beam).

`formats.build(..., beam_runner='DirectRunner', beam_args=[...])` (or the
command line's --beam_runner / --beam_arg) builds a dataset with a Beam
pipeline instead of one process: the same records, examples, keys and ids,
written as the same ArrayRecord shards, and the same statistics (from Beam
counters). `apache_beam` is needed only then (the `beam` extra:
pip install -e '.[beam]').

The pipeline of a split: its parts (`FormatBuilder.split_units`: the
source's files for the training formats; the whole split for the
evaluation sets) are counted in parallel, which gives each part the global
position of its first record (the example 'id', as in one process); then
the parts are read in parallel, their records reshuffled across workers,
and each made into an example (`FormatBuilder.example_or_skip`), skipped
records counted under the split's Beam counters. TFDS writes the shards.

The DirectRunner runs on this machine (--beam_arg=--direct_num_workers=N
--beam_arg=--direct_running_mode=multi_processing); any other Beam runner
(Dataflow, Flink, Spark) takes its own options the same way. Workers need
this package and its dependencies installed, and read the source by its
path (so a cluster needs gs:// or another shared file system).
"""

from collections.abc import Sequence
import collections
from typing import Any

NAMESPACE = 'flamingo_jax.data.formats'


def examples(builder, split: str, units: Sequence[Any]):
  """The PTransform (pipeline -> (key, example)) of one split."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  indexed = list(enumerate(units))

  @beam.ptransform_fn
  def make(root):
    offsets = (
        root
        | 'CreateForCount' >> beam.Create(indexed)
        | 'Count' >> beam.Map(_count, builder=builder, split=split)
        | 'Gather' >> beam.combiners.ToList()
        | 'Offsets' >> beam.Map(_offsets))
    return (
        root
        | 'Create' >> beam.Create(indexed)
        | 'Records' >> beam.FlatMap(_records, builder=builder, split=split,
                                    offsets=beam.pvalue.AsSingleton(offsets))
        | 'Reshuffle' >> beam.Reshuffle()
        | 'Examples' >> beam.FlatMap(_example, builder=builder, split=split))

  return make()  # pylint: disable=no-value-for-parameter


def _count(unit, builder, split) -> tuple[int, int]:
  index, part = unit
  return index, sum(1 for _ in builder.unit_records(split, part))


def _offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
  """{part: position of its first record in the split}."""
  offsets, total = {}, 0
  for index, count in sorted(counts):
    offsets[index], total = total, total + count
  return offsets


def _records(unit, builder, split, offsets):
  index, part = unit
  for position, record in enumerate(builder.unit_records(split, part),
                                    start=offsets[index]):
    yield position, record


def _example(item, builder, split):
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  position, record = item
  key, example, counts = builder.example_or_skip(position, record)
  for name, count in counts.items():
    beam.metrics.Metrics.counter(NAMESPACE, f'{split}|{name}').inc(count)
  if key is not None:
    yield key, example


def statistics(result) -> dict[str, dict[str, int]]:
  """{split: {counter: n}} of a finished pipeline's counters."""
  from apache_beam.metrics import metric  # pylint: disable=g-import-not-at-top
  query = result.metrics().query(
      metric.MetricsFilter().with_namespace(NAMESPACE))
  out = collections.defaultdict(collections.Counter)
  for counter in query['counters']:
    split, _, name = counter.key.metric.name.partition('|')
    value = counter.committed
    out[split][name] += value if value is not None else counter.attempted
  return {split: dict(counts) for split, counts in out.items()}
