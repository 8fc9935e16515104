"""The aggregation-error table: every aggregator against every attack, on synthetic gradients.

``rbyz errors`` (or ``python -m rbyz.sim.errors``) builds ``n`` honest gradients
``g_i = g* + sigma * xi_i`` of a two-leaf model, lets ``f`` Byzantine workers replace theirs
with each attack of the library, aggregates the stack with each rule, and prints the error of
each rule relative to the honest mean,

    err = ||agg(G) - mean(honest)|| / ||mean(honest)||,

so that 0 is perfect and 1 is as far as the zero vector. ``inf``/``nan`` mark a rule that was
poisoned (only ``mean``, which has no robustness promise, should ever show them).

Options: ``--n``, ``--f``, ``--d``, ``--sigma``, ``--seed``, ``--out FILE.md`` (the table is
written atomically: a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rbyz import aggregators, attacks
from rbyz.sim import io

# Settings that differ from a rule's declared defaults, for a one-shot comparison.
DEMO_HPARAMS = {
    # One call from a zero centre stands in for many rounds of the stateful rule: tau=10 as in
    # Karimireddy et al.'s MNIST runs, enough iterations to travel from 0 to the honest mean.
    "centered_clipping": {"tau": 10.0, "iterations": 20},
}


def attack_suite(n: int, f: int) -> dict[str, tuple[str, dict]]:
    """Column label -> (attack name, hyperparameters), the settings the papers use."""
    return {
        "none": ("", {}),
        "sign flip": ("sign_flip", {}),
        "reverse x100": ("reverse", {"scale": 100.0}),
        "IPM eps=0.1": ("ipm", {"epsilon": 0.1}),
        "IPM eps=100": ("ipm", {"epsilon": 100.0}),
        f"ALIE z={attacks.alie_z(n, f):.2f}": ("alie", {}),
        "min-max": ("min_max", {}),
        "Gaussian": ("gaussian", {}),
        "NaN": ("non_finite", {}),
        "bit flip": ("bit_flip", {"bits": 1}),
    }


def honest_gradients(key, n: int, d: int, sigma: float):
    """``n`` noisy copies of one true gradient of a model with a matrix and a bias leaf."""
    k_true, k_noise_w, k_noise_b = jax.random.split(key, 3)
    rows = max(d // 100, 1)
    true = {"w": jax.random.normal(k_true, (rows, 100)), "b": jnp.ones((100,))}
    noise = {"w": jax.random.normal(k_noise_w, (n, rows, 100)),
             "b": jax.random.normal(k_noise_b, (n, 100))}
    return jax.tree.map(lambda t, z: t[None] + sigma * z, true, noise)


def relative_error(estimate, reference) -> float:
    diff = sum(float(jnp.sum(jnp.square(a.astype(jnp.float32) - b)))
               for a, b in zip(jax.tree.leaves(estimate), jax.tree.leaves(reference)))
    norm = sum(float(jnp.sum(jnp.square(b))) for b in jax.tree.leaves(reference))
    return float(np.sqrt(diff / norm))


def aggregator_fn(declared, f: int, key):
    """The rule as a jitted ``fn(stack)``, built from its declaration: a key if it declares one,
    a single call from its initial state if it keeps one."""
    hparams = dict(DEMO_HPARAMS.get(declared.name, {}), f=f)
    if declared.key:
        hparams["key"] = key
    return jax.jit(functools.partial(declared.fn, **hparams))


def run(n: int = 25, f: int = 5, d: int = 10_000, sigma: float = 1.0, seed: int = 0):
    """Returns ``(rows, columns)``: ``rows[i] = [aggregator, err per attack...]``."""
    key_grads, key_attack, key_rule = jax.random.split(jax.random.key(seed), 3)
    honest = honest_gradients(key_grads, n, d, sigma)
    reference = jax.tree.map(lambda x: jnp.mean(x, axis=0), honest)
    suite = attack_suite(n, f)
    stacks = {}
    for label, (attack, hparams) in suite.items():
        if not attack:
            stacks[label] = honest
            continue
        stacks[label] = attacks.inject(honest, attack, f=f, key=key_attack,
                                       positions="random", **hparams).updates
    rows = []
    for declared in aggregators.specs():
        if declared.constraint.explain(n, f) is not None:
            continue  # e.g. Bulyan needs n >= 4f + 3
        agg = aggregator_fn(declared, f, key_rule)
        rows.append([declared.name] +
                    [relative_error(agg(stack), reference) for stack in stacks.values()])
    return rows, list(suite)


def format_table(rows, columns) -> str:
    from tabulate import tabulate  # the experiments extra; imported here so the library has no

    return tabulate(rows, headers=["aggregator \\ attack", *columns], tablefmt="github",
                    floatfmt=".3f")


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25, help="workers")
    parser.add_argument("--f", type=int, default=5, help="Byzantine workers")
    parser.add_argument("--d", type=int, default=10_000, help="model size (approximate)")
    parser.add_argument("--sigma", type=float, default=1.0, help="honest noise scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    rows, columns = run(args.n, args.f, args.d, args.sigma, args.seed)
    header = (f"relative error ||agg - honest mean|| / ||honest mean||, n={args.n}, f={args.f}, "
              f"d~{args.d}, sigma={args.sigma}, seed={args.seed}, jax {jax.__version__} "
              f"on {jax.default_backend()}")
    text = header + "\n\n" + format_table(rows, columns) + "\n"
    print(text)
    if args.out:
        io.atomic_write_text(args.out, text)
    return text


if __name__ == "__main__":
    main()
