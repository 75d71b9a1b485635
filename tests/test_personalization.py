"""Personalized evaluation: fine-tuning on a client's own data helps on label-skewed clients."""

import numpy as np
import pytest

from fedmnist import data, model
from fedmnist.config import PersonalizationConfig
from fedmnist.clients.personalization import PersonalizationEvaluator, summarize_gain


@pytest.mark.unit
def test_gain_summary_statistics():
    summary = summarize_gain(np.array([0.5, 0.5, 0.2, 0.9]), np.array([0.7, 0.4, 0.6, 0.9]))
    assert summary["gain_mean"] == pytest.approx(0.125)
    assert summary["gain_median"] == pytest.approx(0.1)
    assert summary["improved_share"] == 0.5 and summary["clients"] == 4


def test_fine_tuning_helps_on_shards(tff_runtime):
    dataset = data.load_digits(num_clients=20, method="shards", seed=0)
    weights = model.initial_weights("linear", 10, seed=0)
    # A global model that knows a little of every digit: a few centralized steps on a slice of data.
    pixels, labels = data.digits_as_emnist()
    keras_model = model.to_keras(weights, "linear", 10)
    keras_model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    keras_model.fit(pixels[:300].reshape(-1, 784), labels[:300], epochs=1, batch_size=20, verbose=0)
    weights = type(weights)(trainable=keras_model.get_weights(), non_trainable=[])
    evaluator = PersonalizationEvaluator(model.build_model_fn(), PersonalizationConfig(epochs=3))
    summary = evaluator(weights, dataset.train, dataset.test, dataset.train.client_ids[:10])
    assert summary["clients"] == 10
    assert summary["gain_mean"] > 0.05 and summary["gain_median"] > 0
    assert summary["accuracy_after"] > summary["accuracy_before"]


@pytest.mark.unit
def test_fine_tuning_epochs_are_a_graph_loop_so_a_large_count_cannot_fill_memory_while_tracing():
    # `personalization.epochs=10**12` once grew the process by gigabytes a minute: each epoch was unrolled
    # into the graph as it was traced.
    from fedmnist.clients.personalization import as_example, build_personalize_fn

    dataset = data.load_digits(num_clients=4, method="iid", seed=0)
    client = dataset.train.create_tf_dataset_for_client(dataset.train.client_ids[0]).map(as_example)

    def graph_size(epochs: int) -> int:
        personalize = build_personalize_fn(PersonalizationConfig(epochs=epochs))()
        graph = personalize.get_concrete_function(model.build_model_fn()(), client, client).graph.as_graph_def()
        return len(graph.node) + sum(len(function.node_def) for function in graph.library.function)

    assert graph_size(1) == graph_size(12)
