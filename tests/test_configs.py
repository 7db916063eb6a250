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


APTS_CONFIGS = [p for p in CONFIGS if config.load(p)["optimizer"]["method"] == "apts"]


@pytest.mark.parametrize("path", APTS_CONFIGS, ids=lambda p: p.stem)
def test_benchmarks_take_a_configs_apts_keywords_from_the_file(path):
    """bench and gpu_bench build APTS from ``config_options``: the file's own optimizer keys (read
    here with plain YAML), the defaults for the rest, method and subdomains left to the world."""
    import yaml
    from apts_mpi.bench.harness import config_options
    written = dict(yaml.safe_load(path.read_text())["optimizer"])
    written.pop("method"), written.pop("subdomains", None)
    expected = {k: v for k, v in options.defaults("apts").items() if k != "subdomains"}
    assert config_options(path) == {**expected, **written}


def test_config_options_refuses_a_baseline_config():
    from apts_mpi.bench.harness import config_options
    with pytest.raises(SystemExit, match="not an APTS config"):
        config_options(Path(__file__).parent.parent / "configs" / "mnist-adam.yaml")
