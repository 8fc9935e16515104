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
