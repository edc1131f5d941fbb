"""Data for fit/evaluate/predict: tensors, dicts of tensors, a Dataset, a DataLoader or a generator, as batches.

  - ``structure``: a model's inputs and outputs, and user data flattened into their order;
  - ``batches``: the batch sources the loops iterate (``for xs, ys, sample_weights, n in ...``);
  - ``adapters``: ``make_batches`` / ``split_validation`` for whatever the user passed;
  - ``weights``: Keras' ``class_weight`` as per-sample weights.
"""

from .adapters import check_batch_size, is_batch_iterable, make_batches, split_validation
from .batches import IterableBatches, LimitedBatches, LoaderBatches, TensorBatches
from .structure import IOInfo, flatten_inputs, flatten_outputs, flatten_targets, io_info, pack_outputs, to_tensor
from .weights import class_weight_table, class_weights_for

__all__ = ["IOInfo", "io_info", "to_tensor", "flatten_inputs", "flatten_targets", "flatten_outputs",
           "pack_outputs", "TensorBatches", "LoaderBatches", "IterableBatches", "LimitedBatches",
           "make_batches", "split_validation", "is_batch_iterable", "check_batch_size",
           "class_weight_table", "class_weights_for"]
