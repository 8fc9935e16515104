"""Byzantine attacks: pure functions from known honest updates to the Byzantine workers' rows.

Every model attack has the signature ``attack(honest, *, f, **hparams)`` (plus ``key=`` when it is
random, ``n=`` when it needs the worker count, as its declaration says): ``honest`` is a stacked
pytree ``[h, ...]`` of the honest gradients the attacker knows, and the result is the stacked
pytree ``[f, ...]`` of what the ``f`` Byzantine workers send (``f = 0`` gives an empty stack).
What ``honest`` holds depends on the attacker's knowledge, which each docstring states:

- *own*: the Byzantine workers' own honest gradients (``h = f``; the non-omniscient setting of
  Baruch et al.). Row-wise attacks (``reverse``, ``bit_flip``, ``sign_reverse``) map row ``i``
  to Byzantine worker ``i``, cycling over the rows when fewer than ``f`` are given.
- *honest*: all honest workers' gradients (``h = n - f``; the omniscient setting).
- *aggregator*: the adaptive attacks also need the aggregation rule they target.

Modules: :mod:`~rbyz.attacks.statistical` (ALIE, IPM), :mod:`~rbyz.attacks.fixed` (sign flip,
reverse, constant, non-finite, Gaussian, mimic), :mod:`~rbyz.attacks.minmax` (Min-Max,
Min-Sum), :mod:`~rbyz.attacks.bitflip`, :mod:`~rbyz.attacks.search` (the worst-case scale
search), :mod:`~rbyz.attacks.adaptive` (adaptive ALIE and IPM), :mod:`~rbyz.attacks.sign`
(sign-domain attacks), :mod:`~rbyz.attacks.tailored` (Fang et al. against trimmed mean,
median and Krum; ByzMean; ROP against centered clipping), :mod:`~rbyz.attacks.data` (label
flipping, a data attack, not in the registry) and :mod:`~rbyz.attacks.injection`, the one path
that writes attack rows into a stack (:func:`inject`, :func:`attack_rows`,
:func:`byzantine_positions`).

Every model attack is declared (``rbyz.attacks.spec(name)``: key, constraint, hyperparameters,
references, cost, and where a default differs from the paper); a user's own attack is declared
with :func:`declare`, and an undeclared function ``fn(known, *, f, **hparams)`` still works as a
keyless attack. Randomness only comes from an explicit ``key`` (an int seed or a JAX key).

Example:
  >>> import jax.numpy as jnp
  >>> import rbyz
  >>> g = jnp.arange(20.0).reshape(10, 2)
  >>> rbyz.attacks.inject(g, "alie", f=2).byzantine.tolist()[-3:]
  [False, True, True]
  >>> rbyz.attacks.spec("gaussian").key
  True

References:
  Baruch, Baruch, Goldberg, `A Little Is Enough: Circumventing Defenses For Distributed
  Learning <https://arxiv.org/abs/1902.06156>`_, NeurIPS 2019.
  Xie, Koyejo, Gupta, `Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
  Manipulation <https://arxiv.org/abs/1903.03936>`_, UAI 2019.
  Shejwalkar, Houmansadr, `Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
  Defenses for Federated Learning`, NDSS 2021.
  Rajput, Wang, Charles, Papailiopoulos, `DETOX: A Redundancy-based Framework for Faster and
  More Robust Gradient Aggregation <https://arxiv.org/abs/1907.12205>`_, NeurIPS 2019.
  Sohn, Han, Choi, Moon, `Election Coding for Distributed Learning: Protecting SignSGD against
  Byzantine Attacks <https://arxiv.org/abs/1910.06093>`_, NeurIPS 2020.
"""


from rbyz._src import spec as _spec
from rbyz.attacks.adaptive import alie_adaptive as alie_adaptive
from rbyz.attacks.adaptive import alie_adaptive_search as alie_adaptive_search
from rbyz.attacks.adaptive import ipm_adaptive as ipm_adaptive
from rbyz.attacks.adaptive import ipm_adaptive_search as ipm_adaptive_search
from rbyz.attacks.bitflip import bit_flip as bit_flip
from rbyz.attacks.data import label_flip as label_flip
from rbyz.attacks.fixed import constant as constant
from rbyz.attacks.fixed import gaussian as gaussian
from rbyz.attacks.fixed import mimic as mimic
from rbyz.attacks.fixed import non_finite as non_finite
from rbyz.attacks.fixed import reverse as reverse
from rbyz.attacks.fixed import sign_flip as sign_flip
from rbyz.attacks.injection import Injected as Injected
from rbyz.attacks.injection import attack_rows as attack_rows
from rbyz.attacks.injection import byzantine_positions as byzantine_positions
from rbyz.attacks.injection import inject as inject
from rbyz.attacks.minmax import min_max as min_max
from rbyz.attacks.minmax import min_sum as min_sum
from rbyz.attacks.search import DEFAULT_SCALES as DEFAULT_SCALES
from rbyz.attacks.search import MAX_SCALE as MAX_SCALE
from rbyz.attacks.search import ScaleSearch as ScaleSearch
from rbyz.attacks.search import search_scale as search_scale
from rbyz.attacks.sign import sign_directional as sign_directional
from rbyz.attacks.sign import sign_random as sign_random
from rbyz.attacks.sign import sign_reverse as sign_reverse
from rbyz.attacks.statistical import alie as alie
from rbyz.attacks.statistical import alie_z as alie_z
from rbyz.attacks.statistical import ipm as ipm
from rbyz.attacks.tailored import byzmean as byzmean
from rbyz.attacks.tailored import fang_krum as fang_krum
from rbyz.attacks.tailored import fang_trimmed_mean as fang_trimmed_mean
from rbyz.attacks.tailored import fang_trimmed_mean_partial as fang_trimmed_mean_partial
from rbyz.attacks.tailored import rop as rop

# get(name) -> rule, names(), spec(name) -> declaration, specs(), and declare(...) for a
# rule of your own (not registered): @rbyz.attacks.declare(...).
get, names, spec, specs, declare = (getattr(_spec.registry_view("attack"), attr) for attr in
                                     ("get", "names", "spec", "specs", "declare"))

__all__ = (
    "DEFAULT_SCALES",
    "Injected",
    "MAX_SCALE",
    "ScaleSearch",
    "alie",
    "alie_adaptive",
    "alie_adaptive_search",
    "alie_z",
    "attack_rows",
    "bit_flip",
    "byzantine_positions",
    "byzmean",
    "constant",
    "declare",
    "fang_krum",
    "fang_trimmed_mean",
    "fang_trimmed_mean_partial",
    "gaussian",
    "get",
    "inject",
    "ipm",
    "ipm_adaptive",
    "ipm_adaptive_search",
    "label_flip",
    "mimic",
    "min_max",
    "min_sum",
    "names",
    "non_finite",
    "reverse",
    "rop",
    "search_scale",
    "sign_directional",
    "sign_flip",
    "sign_random",
    "sign_reverse",
    "spec",
    "specs",
)
