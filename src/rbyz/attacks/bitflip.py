"""Bit flips: the Byzantine rows are the attackers' own gradients with IEEE-754 bits flipped.

The hardware fault DETOX names. Values are reinterpreted as same-width unsigned integers and
XOR-ed with a random mask of exactly ``bits`` ones per row or per value, drawn without
replacement (Floyd's algorithm: a fixed number of draws, no rejection loop, so it jit-compiles
to fixed shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rbyz._src import checks
from rbyz.attacks import _common

_BIT_RANGES = ("any", "sign", "exponent", "mantissa")


def _bit_range(dtype, bit_range) -> tuple[int, int]:
    """``[lo, hi)``: the bit positions (0 = least significant) that may be flipped."""
    info = jnp.finfo(dtype)
    width = 8 * jnp.dtype(dtype).itemsize
    named = {
        "any": (0, width),
        "sign": (width - 1, width),
        "exponent": (info.nmant, info.nmant + info.nexp),
        "mantissa": (0, info.nmant),
    }
    if isinstance(bit_range, str):
        checks.require(bit_range in named, "bit_flip",
                       f"bit_range must be one of {_BIT_RANGES} or (lo, hi); got {bit_range!r}.")
        return named[bit_range]
    lo, hi = (int(b) for b in bit_range)
    checks.require(0 <= lo < hi <= width, "bit_flip",
                   f"bit_range (lo, hi) needs 0 <= lo < hi <= {width} for {jnp.dtype(dtype)}; "
                   f"got {bit_range!r}.")
    return lo, hi


def _distinct_draws(key, bits: int, size: int) -> jax.Array:
    """``[bits]`` distinct integers drawn uniformly from ``[0, size)``.

    Floyd's algorithm: draw ``t`` in ``[0, j]`` for ``j = size - bits, ..., size - 1`` and keep
    ``j`` instead when ``t`` was taken; a fixed number of draws, no rejection loop.
    """
    slots = jnp.arange(bits, dtype=jnp.int32)

    def draw(step, picks):
        j = size - bits + step
        t = jax.random.randint(jax.random.fold_in(key, step), (), 0, j + 1, jnp.int32)
        taken = jnp.any((picks == t) & (slots < step))
        return picks.at[step].set(jnp.where(taken, j, t))

    # int32 loop bounds keep every index int32 under jax_enable_x64 too.
    return jax.lax.fori_loop(jnp.int32(0), jnp.int32(bits), draw, jnp.zeros((bits,), jnp.int32))


def _flip(x: jax.Array, mask: jax.Array) -> jax.Array:
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(x, uint)
    return jax.lax.bitcast_convert_type(bits ^ mask.astype(uint), x.dtype)


def _flip_per_value(key, x: jax.Array, bits: int, lo: int, hi: int) -> jax.Array:
    """Flips ``bits`` distinct bits of ``[lo, hi)`` in every value (Floyd's draws, per value)."""
    uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    one = jnp.ones(x.shape, uint)

    def draw(step, mask):
        j = hi - lo - bits + step
        t = jax.random.randint(jax.random.fold_in(key, step), x.shape, 0, j + 1, jnp.int32)
        taken = (jnp.right_shift(mask, (t + lo).astype(uint)) & one) == one
        pick = jnp.where(taken, j, t)
        return mask | jnp.left_shift(one, (pick + lo).astype(uint))

    return _flip(x, jax.lax.fori_loop(jnp.int32(0), jnp.int32(bits), draw,
                                      jnp.zeros(x.shape, uint)))


def _flip_per_row(key, row_leaves: list[jax.Array], bits: int, ranges) -> list[jax.Array]:
    """Flips ``bits`` distinct (value, bit) positions drawn over all leaves of one row."""
    counts = [x.size * (hi - lo) for x, (lo, hi) in zip(row_leaves, ranges)]
    total = sum(counts)
    checks.require(bits <= total, "bit_flip",
                   f"needs bits <= the flippable bits of a row; got bits={bits}, {total}.")
    checks.require(total < 2**31, "bit_flip", "a row has 2**31 or more flippable bits; use "
                   "per='value'.")
    positions = _distinct_draws(key, bits, total)
    out, offset = [], 0
    for x, (lo, hi), count in zip(row_leaves, ranges, counts):
        uint = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
        local = positions - offset
        inside = (local >= 0) & (local < count)
        value = jnp.where(inside, local // (hi - lo), x.size)  # out of bounds: dropped
        shift = (lo + local % (hi - lo)).astype(uint)
        powers = jnp.where(inside, jnp.left_shift(jnp.ones_like(shift), shift), 0)
        # Positions are distinct, so adding the powers of two is a bitwise or.
        mask = jnp.zeros(x.size, uint).at[value].add(powers.astype(uint), mode="drop")
        out.append(_flip(x, mask.reshape(x.shape)))
        offset += count
    return out


@_common.declare_attack(
    key=True, knowledge="own", reference=(_common.RAJPUT,), cost="O(f d bits)",
    note="DETOX names bit flips as a hardware fault; epfml's \"bit flip\" is a plain negation "
         "(reverse with scale=1).")
def bit_flip(honest, *, f: int, key=None, bits: int = 1, per: str = "row",
             bit_range: str | tuple[int, int] = "any"):
    """Bit flips: Byzantine worker ``i`` sends its own gradient with IEEE-754 bits flipped.

    The hardware fault DETOX names: values are reinterpreted as same-width unsigned integers
    (``lax.bitcast_convert_type``) and XOR-ed with a random mask holding exactly ``bits`` ones
    per row (over all leaves) or per value, drawn without replacement inside ``bit_range``:
    ``"any"``, ``"sign"``, ``"exponent"``, ``"mantissa"`` or ``(lo, hi)`` (bit 0 = least
    significant). One exponent flip can turn 0.5 into ~1.7e38 (float32). Note: epfml's
    "bit flip" is a plain negation, :func:`reverse` with ``scale=1``. Knowledge: its *own*
    gradient (row ``i % h``). Floating-point leaves only.

    Args:
      honest: stacked pytree ``[h, ...]`` of floating-point leaves.
      f: number of Byzantine workers (static).
      key: an int seed or a JAX key (required: there is no default seed).
      bits: how many bits to flip per row or per value (static, >= 1).
      per: ``"row"`` (default) or ``"value"``.
      bit_range: which bits may flip.

    Returns:
      Stacked pytree ``[f, ...]``.

    Example:
      >>> out = bit_flip(jnp.ones((1, 4)), f=1, key=0, bits=1, bit_range="sign")
      >>> int(jnp.sum(out < 0))
      1

    References:
      Rajput, Wang, Charles, Papailiopoulos, `DETOX`, NeurIPS 2019.
    """
    _, f = _common.prepare(honest, f, "bit_flip")
    bits = checks.static_int(bits, "bit_flip", "bits", minimum=1)
    checks.require(per in ("row", "value"), "bit_flip", f"per must be 'row' or 'value'; got "
                   f"{per!r}.")
    flat, treedef = jax.tree.flatten(_common.cycle_rows(honest, f))
    for x in flat:
        checks.require(jnp.issubdtype(x.dtype, jnp.floating), "bit_flip",
                       f"needs floating-point leaves; got {x.dtype}.")
    ranges = [_bit_range(x.dtype, bit_range) for x in flat]
    if per == "value":
        for lo, hi in ranges:
            checks.require(bits <= hi - lo, "bit_flip",
                           f"needs bits <= the bits in bit_range; got bits={bits}, {hi - lo}.")
    key = checks.as_key(key, "bit_flip")
    if f == 0:
        return jax.tree.unflatten(treedef, flat)
    row_keys = jax.random.split(key, f)
    if per == "value":
        flipped = [
            jax.vmap(lambda k, row, i=i: _flip_per_value(jax.random.fold_in(k, i), row, bits,
                                                         *ranges[i]))(row_keys, x)
            for i, x in enumerate(flat)
        ]
    else:
        flipped = jax.vmap(lambda k, *row: _flip_per_row(k, list(row), bits, ranges))(
            row_keys, *flat)
    return jax.tree.unflatten(treedef, list(flipped))
