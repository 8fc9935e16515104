"""Models of the experiments as pure functions: ``init(seed) -> params`` and ``apply(params, x)``.

A :class:`Model` is the pair of pure functions the training step needs: ``init`` builds the
parameters (a pytree of float32 arrays, nested dicts) from a seed, and ``apply`` maps them and a
batch ``x [b, ...]`` to logits ``[b, classes]``. Being pure, ``apply`` can be differentiated,
``vmap``-ed over workers and jit-compiled like any JAX function; the flax nnx module is split
into its graph definition and its ``nnx.Param`` state once, and merged back inside ``apply``
(at trace time, so a jitted step pays nothing for it).

The builders follow the papers' models: :func:`mlp` the 784-100-10 perceptron of "A Little Is
Enough", :func:`cnn` the small network of Karimireddy et al.'s experiments (PyTorch's MNIST
example), :func:`logistic` a linear classifier; all are initialised as PyTorch's layers are by
default (the papers' code is PyTorch): weights and biases uniform in ``+-1/sqrt(fan_in)``.
:func:`from_flax` wraps a user's own nnx (or linen) module unchanged.

Example:
  >>> import jax.numpy as jnp
  >>> model = build("mlp", (28, 28, 1), 10)
  >>> params = model.init(0)
  >>> jax.tree.map(jnp.shape, params)
  {'hidden': {0: {'bias': (100,), 'kernel': (784, 100)}}, 'out': {'bias': (10,), 'kernel': (100, 10)}}
  >>> logits = model.apply(params, jnp.zeros((5, 28, 28, 1)))
  >>> logits.shape, model.name
  ((5, 10), 'mlp(784-100-10)')
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen, nnx

from rbyz._src import checks

Params = Any

NAMES = ("mlp", "cnn", "logistic")

# The CNN's two 3x3 'VALID' convolutions take 4 pixels off each side length and its 2x2 max-pool
# needs 2 left: images must be at least 6x6.
CNN_MIN_SIDE = 6


class Model(NamedTuple):
    """A model as two pure functions and a label.

    Attributes:
      init: ``seed (int or jax key) -> params``, a pytree of arrays (the same seed gives the
        same parameters).
      apply: ``(params, x [b, ...]) -> logits [b, classes]``, pure: jit, grad and vmap apply.
      name: a label for reports, e.g. ``"mlp(784-100-10)"``.
    """

    init: Callable[[Any], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    name: str


# ------------------------------------------------------------------------------------------------
# Initialisation as PyTorch's defaults.


def _torch_kernel_init():
    # kaiming_uniform(a=sqrt(5)) of torch.nn.Linear/Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    # which is variance scaling 1/3 (the bound of a uniform with variance s/fan_in is
    # sqrt(3 s / fan_in)).
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(fan_in: int, fan_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(fan_in, fan_out, kernel_init=_torch_kernel_init(),
                      bias_init=_torch_bias_init(fan_in), rngs=rngs)


def _conv(fan_in_channels: int, channels: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(fan_in_channels, channels, (3, 3), padding="VALID",
                    kernel_init=_torch_kernel_init(),
                    bias_init=_torch_bias_init(9 * fan_in_channels), rngs=rngs)


# ------------------------------------------------------------------------------------------------
# The nnx modules.


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


class MLP(nnx.Module):
    """Flatten, then ``Dense(h) -> ReLU`` for each hidden width ``h``, then ``Dense(classes)``."""

    def __init__(self, inputs: int, hidden: Sequence[int], num_classes: int, *, rngs: nnx.Rngs):
        widths = (inputs, *hidden)
        self.hidden = nnx.List([_linear(a, b, rngs) for a, b in itertools.pairwise(widths)])
        self.out = _linear(widths[-1], num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _flatten(x)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


class CNN(nnx.Module):
    """``conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> maxpool 2 -> fc(128) -> ReLU -> fc``.

    PyTorch's MNIST example (the model of Karimireddy et al.'s experiments) without its two
    dropout layers (0.25 after the pool, 0.5 after fc 128): the model is deterministic, so that
    per-worker gradients are one ``vmap`` with no per-worker random masks. Convolutions are
    'VALID' (no padding), as in the example; inputs are NHWC.
    """

    def __init__(self, height: int, width: int, channels: int, num_classes: int, *,
                 rngs: nnx.Rngs):
        self.conv1 = _conv(channels, 32, rngs)
        self.conv2 = _conv(32, 64, rngs)
        pooled = ((height - 4) // 2) * ((width - 4) // 2) * 64
        self.fc1 = _linear(pooled, 128, rngs)
        self.fc2 = _linear(128, num_classes, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = jax.nn.relu(self.fc1(_flatten(x)))
        return self.fc2(x)


# ------------------------------------------------------------------------------------------------
# Wrapping modules as pure functions.


def _check_shape(input_shape, rule: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        shape = None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"{rule}: input_shape must be the shape of one example, a non-empty sequence of "
            f"positive ints (e.g. (28, 28, 1) or (32,)); got {input_shape!r}.")
    return shape


def _check_classes(num_classes, rule: str) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{rule}: num_classes must be a positive int; got {num_classes!r}.")
    return num_classes


def _checked_apply(apply, input_shape: tuple[int, ...], name: str):
    """``apply`` that checks the batch's example shape at trace time."""

    def checked(params, x):
        if tuple(x.shape[1:]) != input_shape:
            raise ValueError(
                f"{name}: expects a batch [b, {', '.join(map(str, input_shape))}]; got x of "
                f"shape {tuple(x.shape)}. Reshape the inputs or build the model for this shape.")
        return apply(params, x)

    return checked


def _nnx_model(factory: Callable[[nnx.Rngs], nnx.Module] | None, instance: nnx.Module | None,
               input_shape, name: str) -> Model:
    template = instance if instance is not None else factory(nnx.Rngs(0))
    graphdef, _, rest = nnx.split(template, nnx.Param, ...)

    def init(seed) -> Params:
        if instance is not None:
            module = instance
        else:
            module = factory(nnx.Rngs(checks.as_key(seed, f"{name}.init")))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def apply(params: Params, x: jax.Array) -> jax.Array:
        # Merging copies the graph at trace time only; the non-Param state (batch statistics,
        # dropout streams) is the template's, frozen.
        return nnx.merge(graphdef, params, rest)(x)

    return Model(init, _checked_apply(apply, input_shape, name), name)


def _linen_model(module: linen.Module, input_shape, name: str) -> Model:
    example = jnp.zeros((1, *input_shape), jnp.float32)
    other = {k: v for k, v in module.init(jax.random.key(0), example).items() if k != "params"}

    def init(seed) -> Params:
        return module.init(checks.as_key(seed, f"{name}.init"), example)["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params, **other}, x)

    return Model(init, _checked_apply(apply, input_shape, name), name)


def from_flax(module, input_shape: Sequence[int], *, name: str | None = None) -> Model:
    """Wraps a flax module as a :class:`Model`, unchanged.

    ``module`` may be

    - a function of ``rngs`` returning an ``nnx.Module``: a class taking ``rngs=`` (with its
      other arguments bound by ``functools.partial``) or a lambda; ``init(seed)`` builds it with
      ``nnx.Rngs(seed)``, so each seed gives its own initialisation;
    - an ``nnx.Module`` instance: ``init`` returns its parameters, whatever the seed;
    - a ``flax.linen.Module``: ``init(seed)`` is ``module.init(key(seed), zeros)["params"]``.

    Only the parameters (``nnx.Param``, linen's ``"params"`` collection) are trained. Any other
    state (batch statistics, dropout's random streams) stays as the module was built, frozen:
    dropout would draw the same mask at every call, so give the simulation deterministic
    modules. ``apply`` must return logits ``[b, classes]``, which is checked here on a batch of
    one example (by ``jax.eval_shape``, no compute).

    Args:
      module: an nnx factory or instance, or a linen module (see above).
      input_shape: the shape of one example, e.g. ``(28, 28, 1)``.
      name: the model's label (default: the module's class name).

    Returns:
      A :class:`Model`.

    Example:
      >>> class Tiny(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense = nnx.Linear(4, 3, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.dense(x)
      >>> model = from_flax(Tiny, (4,))
      >>> model.apply(model.init(0), jnp.ones((2, 4))).shape, model.name
      ((2, 3), 'Tiny')
    """
    shape = _check_shape(input_shape, "from_flax")
    if isinstance(module, linen.Module):
        model = _linen_model(module, shape, name or type(module).__name__)
    elif isinstance(module, nnx.Module):
        model = _nnx_model(None, module, shape, name or type(module).__name__)
    elif callable(module):
        label = name or getattr(module, "__name__", None) or getattr(
            getattr(module, "func", None), "__name__", "model")

        def factory(rngs):
            try:
                built = module(rngs=rngs)
            except TypeError as error:
                raise ValueError(
                    f"from_flax: calling {label}(rngs=...) failed ({error}); bind its other "
                    "arguments with functools.partial(Class, ...).") from error
            if not isinstance(built, nnx.Module):
                raise ValueError(  # noqa: TRY004  (invalid settings raise ValueError here)f"from_flax: {label}(rngs=...) returned a "
                                 f"{type(built).__name__}, not an nnx.Module.")
            return built

        model = _nnx_model(factory, None, shape, label)
    else:
        raise ValueError(  # noqa: TRY004
            f"from_flax: expects an nnx.Module (instance, or a class/function of rngs) or a "
            f"flax.linen.Module; got {type(module).__name__}.")
    params = jax.eval_shape(lambda: model.init(0))
    out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 2 or out.shape[0] != 1:
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ValueError(f"from_flax: {model.name} must map a batch [b, ...] to logits "
                         f"[b, classes]; on [1, {', '.join(map(str, shape))}] it gives {got}.")
    return model


# ------------------------------------------------------------------------------------------------
# The builders.


def mlp(input_shape: Sequence[int], num_classes: int, *,
        hidden: int | Sequence[int] = (100,)) -> Model:
    """The multi-layer perceptron of "A Little Is Enough": flatten, ``Dense(100)``, ReLU,
    ``Dense(classes)`` (784-100-10 on MNIST).

    Any example shape works (it is flattened): images ``[H, W, C]``, feature vectors ``[dim]``.

    Args:
      input_shape: the shape of one example.
      num_classes: the number of logits.
      hidden: the hidden width, or a sequence of widths (one ReLU layer each; ``()`` gives
        logistic regression).

    Returns:
      A :class:`Model` named e.g. ``"mlp(784-100-10)"``.

    Example:
      >>> model = mlp((8, 8, 1), 10, hidden=(32, 16))
      >>> model.name, model.apply(model.init(0), jnp.ones((3, 8, 8, 1))).shape
      ('mlp(64-32-16-10)', (3, 10))

    References:
      Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
      Learning`, NeurIPS 2019 (the MNIST model).
    """
    shape = _check_shape(input_shape, "mlp")
    num_classes = _check_classes(num_classes, "mlp")
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"mlp: hidden must be a positive int or a sequence of them; got "
                         f"{hidden!r}.")
    inputs = math.prod(shape)
    label = "-".join(map(str, (inputs, *widths, num_classes)))
    return from_flax(functools.partial(MLP, inputs, widths, num_classes), shape,
                     name=f"mlp({label})")


def logistic(input_shape: Sequence[int], num_classes: int) -> Model:
    """Multinomial logistic regression: flatten, one ``Dense(classes)``.

    Args:
      input_shape: the shape of one example (any; it is flattened).
      num_classes: the number of logits.

    Returns:
      A :class:`Model` named e.g. ``"logistic(32-10)"``.

    Example:
      >>> model = logistic((32,), 4)
      >>> model.name, jax.tree.map(jnp.shape, model.init(0))
      ('logistic(32-4)', {'out': {'bias': (4,), 'kernel': (32, 4)}})
    """
    shape = _check_shape(input_shape, "logistic")
    num_classes = _check_classes(num_classes, "logistic")
    inputs = math.prod(shape)
    return from_flax(functools.partial(MLP, inputs, (), num_classes), shape,
                     name=f"logistic({inputs}-{num_classes})")


def cnn(input_shape: Sequence[int], num_classes: int) -> Model:
    """The small CNN of Karimireddy et al.'s experiments (PyTorch's MNIST example), no dropout.

    ``conv 3x3 32 -> ReLU -> conv 3x3 64 -> ReLU -> maxpool 2 -> flatten -> fc 128 -> ReLU ->
    fc classes``, 'VALID' convolutions, NHWC. The example's dropout layers are left out so that
    the model is deterministic (see :class:`CNN`). Needs an image ``(H, W)`` or ``(H, W, C)``
    with ``H, W >= 6`` (two 3x3 convolutions without padding, then a 2x2 pool): 28x28 MNIST
    gives 1.2M parameters, 8x8 digits 40k. A ``(H, W)`` shape means one channel, and batches
    ``[b, H, W]``.

    Args:
      input_shape: ``(H, W)`` or ``(H, W, C)``.
      num_classes: the number of logits.

    Returns:
      A :class:`Model` named e.g. ``"cnn(28x28x1-10)"``.

    Example:
      >>> model = cnn((8, 8, 1), 10)
      >>> model.name, model.apply(model.init(0), jnp.ones((2, 8, 8, 1))).shape
      ('cnn(8x8x1-10)', (2, 10))
      >>> cnn((32,), 10)
      Traceback (most recent call last):
      ...
      ValueError: cnn: needs an image shape (H, W) or (H, W, C) with H, W >= 6; got (32,). Use mlp or logistic for feature vectors.

    References:
      Karimireddy, He, Jaggi, `Learning from History for Byzantine Robust Optimization`,
      ICML 2021 (code: epfml/byzantine-robust-optimizer).
    """
    shape = _check_shape(input_shape, "cnn")
    num_classes = _check_classes(num_classes, "cnn")
    if len(shape) not in (2, 3) or min(shape[:2]) < CNN_MIN_SIDE:
        raise ValueError(
            f"cnn: needs an image shape (H, W) or (H, W, C) with H, W >= {CNN_MIN_SIDE}; got "
            f"{shape}. Use mlp or logistic for feature vectors.")
    height, width = shape[:2]
    channels = shape[2] if len(shape) == 3 else 1
    factory = functools.partial(CNN, height, width, channels, num_classes)
    label = f"cnn({'x'.join(map(str, shape))}-{num_classes})"
    if len(shape) == 3:
        return from_flax(factory, shape, name=label)
    inner = from_flax(factory, (height, width, 1), name=label)
    return Model(inner.init, _checked_apply(lambda p, x: inner.apply(p, x[..., None]), shape,
                                            label), label)


_BUILDERS = {"mlp": mlp, "cnn": cnn, "logistic": logistic}


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> Model:
    """The model called ``name``: ``"mlp"``, ``"cnn"`` or ``"logistic"``, with its keywords.

    Args:
      name: one of :data:`NAMES`.
      input_shape: the shape of one example.
      num_classes: the number of logits.
      **kwargs: the builder's keywords (``hidden`` for :func:`mlp`).

    Returns:
      A :class:`Model`.

    Example:
      >>> build("logistic", (64,), 10).name
      'logistic(64-10)'
      >>> build("resnet", (64,), 10)
      Traceback (most recent call last):
      ...
      ValueError: build: unknown model 'resnet'; choose one of mlp, cnn, logistic, or wrap your own module with from_flax.
    """
    if name not in _BUILDERS:
        raise ValueError(f"build: unknown model {name!r}; choose one of {', '.join(NAMES)}, or "
                         "wrap your own module with from_flax.")
    builder = _BUILDERS[name]
    allowed = {"mlp": ("hidden",)}.get(name, ())
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"build: {name} takes no keyword {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) if allowed else 'none'}.")
    return builder(input_shape, num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------
# Loss and accuracy.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the batch, with integer labels.

    ``L = -(1/b) sum_j log softmax(logits_j)[labels_j]``
    (``optax.softmax_cross_entropy_with_integer_labels``, mean over the batch).

    Args:
      logits: ``[b, classes]``.
      labels: ``[b]`` ints in ``[0, classes)``.

    Returns:
      A scalar in the logits' dtype.

    Example:
      >>> cross_entropy(jnp.array([[0.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1]))
      Array(1.4100376, dtype=float32)
    """
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of the batch whose largest logit is the label (float32 scalar).

    Example:
      >>> accuracy(jnp.array([[0.0, 1.0], [2.0, 0.0]]), jnp.array([1, 1]))
      Array(0.5, dtype=float32)
    """
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
