"""Maximum-likelihood fitting of small priors on the fly, e.g. RealNVP priors of 2-D toy densities.

    theta* = argmax_theta  mean_i log p_theta(x_i)

Image priors are trained by `experiments/train_prior.py`; this loop is for priors small enough
to fit inside a test or a demo (a 2-D toy prior fits in seconds).
"""

import numpy as np
import tensorflow as tf
import tf_keras

from tfp_composed import data as data_lib
from tfp_composed.priors import builders

__all__ = ["fit_maximum_likelihood", "toy_prior"]


def fit_maximum_likelihood(prior, samples, num_steps=1000, batch_size=256, learning_rate=1e-3,
                           seed=0):
  """Fits the trainable variables of `prior` to `samples` by Adam on the mean negative log-lik.

  Args:
    prior: a distribution built by `tfc.priors` (trainable).
    samples: float array `[N] + event_shape` of training data.
    num_steps: Adam steps.
    batch_size: minibatch size (sampled with replacement).
    learning_rate: Adam learning rate.
    seed: seed of the minibatch sampling.

  Returns:
    numpy array of the per-step losses (mean negative log-likelihood, nats).

  #### Examples

  ```python
  prior = tfc.priors.realnvp_dense(2)
  losses = fit_maximum_likelihood(prior, tfc.data.toy_2d('moons', 5000), num_steps=500)
  ```
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"`num_steps` must be a positive integer. Got: {num_steps!r}.")
  samples = tf.convert_to_tensor(samples, tf.float32)
  if samples.shape[1:] != prior.event_shape:
    raise ValueError(f"`samples` must have shape [N] + {prior.event_shape.as_list()}. "
                     f"Got: {samples.shape.as_list()}.")
  variables = builders.flow_module(prior).trainable_variables
  if not variables:
    raise ValueError("`prior` has no trainable variables (was it loaded frozen?).")
  optimizer = tf_keras.optimizers.Adam(learning_rate)
  n = int(samples.shape[0])

  @tf.function
  def run(seed_tensor):
    def body(i, losses):
      idx = tf.random.stateless_uniform([batch_size], seed=tf.stack([seed_tensor, i]),
                                        maxval=n, dtype=tf.int32)
      with tf.GradientTape() as tape:
        loss = -tf.reduce_mean(prior.log_prob(tf.gather(samples, idx)))
      grads = tape.gradient(loss, variables)
      optimizer.apply_gradients(zip(grads, variables))
      return i + 1, losses.write(i, loss)
    _, losses = tf.while_loop(lambda i, _: i < num_steps, body,
                              (tf.constant(0), tf.TensorArray(tf.float32, num_steps)))
    return losses.stack()

  optimizer.build(variables)
  return run(tf.constant(seed)).numpy()


def toy_prior(name, num_steps=2000, num_samples=20000, seed=0, **kwargs):
  """A `realnvp_dense` prior fitted to the 2-D toy density `name` (see `tfc.data.toy_2d`).

  Args:
    name: toy density name, e.g. `'moons'`, `'rings'`, `'checkerboard'`.
    num_steps: Adam steps of `fit_maximum_likelihood`.
    num_samples: training samples drawn from the toy density.
    seed: data and minibatch seed.
    **kwargs: passed to `realnvp_dense` (e.g. `num_layers`, `hidden_units`).

  Returns:
    A frozen `tfd.TransformedDistribution` over `[2]` (its variables are not trainable).

  #### Examples

  ```python
  prior = tfc.priors.toy_prior('moons', num_steps=1000)
  prior.sample(5)
  ```
  """
  tf.random.set_seed(seed)
  prior = builders.realnvp_dense(2, **kwargs)
  fit_maximum_likelihood(prior, data_lib.toy_2d(name, num_samples, seed=seed), num_steps,
                         seed=seed)
  frozen = builders.build(prior.prior_config, trainable=False)
  for src, dst in zip(builders.flow_module(prior).variables,
                      builders.flow_module(frozen).variables):
    dst.assign(src)
  builders.set_config(frozen, dict(prior.prior_config, toy_density=name, train_steps=num_steps))
  return frozen
