"""Every shipped config loads and passes every check of the config and the options table."""
from pathlib import Path

import pytest

from apts_mpi import config, options

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    c = config.load(path)
    assert c["name"] == path.stem, "a config's name is its file name (runs are named after it)"
    opt = dict(c["optimizer"])
    method = opt.pop("method")
    assert options.resolve(method, opt, config_only=True) == {**options.defaults(method, True), **opt}
