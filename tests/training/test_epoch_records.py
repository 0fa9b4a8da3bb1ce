"""An epoch of the training data: one source's records, or for a weighted mixture grain's
length of the same finite mix (one pass over the source with the fewest records per unit
of weight); sources of weight 0 are not read and do not count."""

import grain
import ml_collections

from configs.common import embedded_sources
from input_pipeline.tfrecord import TFRecordSource
from mmssl_jax.training.trainer import epoch_records


def _data(sources: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"sources": sources})


def test_one_source_is_its_records(embedded_data):
    sources = embedded_sources(str(embedded_data))
    emoji = len(TFRecordSource(sources["emoji"]["shards"]))
    assert epoch_records(_data(sources)) == emoji


def test_a_mixture_is_a_pass_over_its_scarcest_source(embedded_data):
    sources = embedded_sources(str(embedded_data), fashion_weight=0.5)
    sizes = {name: len(TFRecordSource(src["shards"])) for name, src in sources.items()}
    assert sizes["fashion_mnist"] > sizes["emoji"]  # emoji runs out first
    weights = [src["weight"] for src in sources.values()]
    ranges = [grain.MapDataset.range(n) for n in sizes.values()]
    mixed = len(grain.MapDataset.mix(ranges, weights))
    assert epoch_records(_data(sources)) == mixed
    # emoji weight 1 vs 0.5: two thirds of the samples are emoji, read once per epoch
    assert abs(epoch_records(_data(sources)) - 1.5 * sizes["emoji"]) <= 1
    assert epoch_records(_data(sources)) < sum(sizes.values())


def test_a_source_of_weight_zero_does_not_count(embedded_data):
    sources = embedded_sources(str(embedded_data), fashion_weight=0.5)
    sources["fashion_mnist"]["weight"] = 0.0
    assert epoch_records(_data(sources)) == epoch_records(
        _data(embedded_sources(str(embedded_data)))
    )
