"""The article's code as a bare script (its training and evaluation sections) on the package's digits clients.

    python -m fedmnist.bench.bare_tutorial

The benchmark times it as a fresh process beside `python -m fedmnist.train` (`whole_runs`). It is a
script, not a library module: importing it runs it. Two lines differ from the article: the data source,
and a global seed so its shuffle order (hence its numbers) equals the package's. TFF's own default
context would leave its worker_binary running after the script exits, so the worker is hosted by
fedmnist.runtime, which is the same SyncExecutionContext over the same worker_binary; the benchmark
runs it with TFF's thread settings (`whole_runs.STOCK_WORKER_ENV`).
"""

import collections
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from fedmnist import data, runtime

tf.keras.utils.set_random_seed(0)
population = data.load_digits(num_clients=20)
emnist_train, emnist_test = population.train, population.test

NUM_CLIENTS = 10
NUM_EPOCHS = 5
BATCH_SIZE = 20
SHUFFLE_BUFFER = 100
PREFETCH_BUFFER = 10

def preprocess(dataset):
  def batch_format_fn(element):
    return collections.OrderedDict(
        x=tf.reshape(element['pixels'], [-1, 784]),
        y=tf.reshape(element['label'], [-1, 1]))
  return dataset.repeat(NUM_EPOCHS).shuffle(SHUFFLE_BUFFER, seed=1).batch(
      BATCH_SIZE).map(batch_format_fn).prefetch(PREFETCH_BUFFER)

def make_federated_data(client_data, client_ids):
  return [preprocess(client_data.create_tf_dataset_for_client(x)) for x in client_ids]

sample_clients = emnist_train.client_ids[0:NUM_CLIENTS]
federated_train_data = make_federated_data(emnist_train, sample_clients)
preprocessed_example_dataset = federated_train_data[0]

def create_keras_model():
  return tf.keras.models.Sequential([
      tf.keras.layers.InputLayer(input_shape=(784,)),
      tf.keras.layers.Dense(10, kernel_initializer='zeros'),
      tf.keras.layers.Softmax(),
  ])

def model_fn():
  keras_model = create_keras_model()
  return tff.learning.models.from_keras_model(
      keras_model,
      input_spec=preprocessed_example_dataset.element_spec,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(),
      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

with runtime.local_runtime():
  training_process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.02),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0))
  train_state = training_process.initialize()
  result = training_process.next(train_state, federated_train_data)
  train_state = result.state
  print('round  1, metrics={}'.format(result.metrics['client_work']['train']))
  NUM_ROUNDS = 11
  for round_num in range(2, NUM_ROUNDS):
    result = training_process.next(train_state, federated_train_data)
    train_state = result.state
    print('round {:2d}, metrics={}'.format(round_num, result.metrics['client_work']['train']))

  evaluation_process = tff.learning.algorithms.build_fed_eval(model_fn)
  evaluation_state = evaluation_process.initialize()
  model_weights = training_process.get_model_weights(train_state)
  evaluation_state = evaluation_process.set_model_weights(evaluation_state, model_weights)
  evaluation_output = evaluation_process.next(evaluation_state, federated_train_data)
  print(evaluation_output.metrics['client_work']['eval']['current_round_metrics'])
  federated_test_data = make_federated_data(emnist_test, sample_clients)
  evaluation_output = evaluation_process.next(evaluation_state, federated_test_data)
  print(evaluation_output.metrics['client_work']['eval']['current_round_metrics'])
