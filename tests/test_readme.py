"""The README's example runs as written."""

import pathlib
import re
import tomllib

import jax


def test_readme_example_runs():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)
    params = namespace["params"]
    assert all(bool(jax.numpy.all(jax.numpy.isfinite(leaf))) for leaf in jax.tree.leaves(params))


def test_readme_experiment_file_is_valid():
    from rbyz.sim import config, train

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no TOML experiment"
    for block in blocks:
        exp = config.from_dict(tomllib.loads(block))
        train.defence(exp)  # every setting checked, as `rbyz run` does before training


README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_catalogue_is_generated_from_the_declarations():
    from rbyz.sim import catalogue

    text = README.read_text()
    start, end = catalogue.readme_block(text)
    assert text[start:end].strip() == catalogue.readme_table().strip(), (
        "the README's catalogue is stale: run python -m rbyz.sim.catalogue README.md")


def _comparison_rows():
    text = README.read_text()
    section = text[text.index("### rbyz beside ByzFL"):]
    section = section[:section.index("\n\n", section.index("| feature |"))]
    lines = [line for line in section.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_every_yes_of_rbyz_in_the_comparison_is_backed_by_tests():
    from rbyz import aggregators, attacks, preaggregators
    from rbyz.sim import train

    rows = _comparison_rows()
    assert len(rows) >= 25
    known = (set(aggregators.names()) | set(preaggregators.names()) | set(attacks.names())
             | set(train.ALGORITHMS) | {"label_flip"})
    root = README.parent
    for feature, ours, *peers, tests in rows:
        assert ours in ("Y", "p", "–") and all(p in ("Y", "p", "–") for p in peers), feature
        for name in re.findall(r"`([a-z_0-9]+)`", feature):
            assert name in known, f"{feature}: {name} is not a rule, attack or algorithm"
        if ours != "Y":
            continue
        assert tests, f"{feature}: a Y of rbyz needs its tests"
        for ref in tests.split():
            path, _, name = ref.partition("::")
            source = (root / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", source, flags=re.M), ref
