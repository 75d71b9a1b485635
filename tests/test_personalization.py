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
