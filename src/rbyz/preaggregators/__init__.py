"""Pre-aggregators: stacked updates ``[n, ...]`` in, stacked updates ``[n', ...]`` out.

A pre-aggregator reshapes the set of workers' updates before a robust aggregator reduces it:
nearest-neighbour mixing (NNM) pulls every row towards its neighbours, bucketing averages random
groups, static clipping and adaptive robust clipping (ARC) bound the rows' norms. Each is a pure,
declared function over a stacked pytree (every leaf has the worker axis first) and composes with
any aggregator of :mod:`rbyz.aggregators` through :func:`compose`::

    robust = compose(functools.partial(nnm, f=2), functools.partial(rbyz.aggregators.krum, f=2))
    update = robust(stacked_grads)

Distances and norms are measured over the whole update (all leaves together); the rows are then
combined or rescaled leaf by leaf, so the model is never ravelled into one vector. 16-bit inputs
are combined in float32 and returned in their own dtype; float64 stays float64.
"""


from rbyz._src import spec as _spec
from rbyz.preaggregators.bucketing import bucketing
from rbyz.preaggregators.clipping import arc
from rbyz.preaggregators.clipping import clip
from rbyz.preaggregators.compose import compose
from rbyz.preaggregators.mixing import nnm

# get(name) -> rule, names(), spec(name) -> declaration, specs(), and declare(...) for a
# rule of your own (not registered): @rbyz.preaggregators.declare(...).
get, names, spec, specs, declare = (getattr(_spec.registry_view("preaggregator"), attr) for attr in
                                     ("get", "names", "spec", "specs", "declare"))

__all__ = ("arc", "bucketing", "clip", "compose", "declare", "get", "names", "nnm", "spec",
           "specs")
