"""The options table: one owner for every optimiser keyword, read by the config and the constructors."""
import inspect

import pytest

from apts_mpi import config, options


@pytest.mark.parametrize("method", options.TRAINABLE)
def test_config_defaults_are_the_options_defaults(method):
    resolved = config.resolve({"optimizer": {"method": method}})["optimizer"]
    assert resolved == {"method": method, **options.defaults(method, config_only=True)}


@pytest.mark.parametrize("method", options.TRAINABLE)
def test_every_keyword_is_checked_with_one_message_naming_it(method):
    for name, option in options.options(method).items():
        with pytest.raises(options.OptionError) as err:  # no keyword takes a list
            options.resolve(method, {name: [1, 2]}, prefix="optimizer.")
        assert err.value.key == name
        assert str(err.value).startswith(f"optimizer.{name} must be") and "\n" not in str(err.value)


@pytest.mark.parametrize("method, given, words", [
    ("apts", {"radius": -1.0}, ["radius must be > 0", "-1.0"]),
    ("apts", {"local_fraction": 0}, ["local_fraction must lie in (0, 1]", "got 0.0"]),
    ("apts", {"acceptance": "maybe"}, ["acceptance must be one of ratio, none, nonmonotone", "'maybe'"]),
    ("apts", {"global_iters": -1}, ["global_iters must be an integer >= 0"]),
    ("apts", {"micro_batch": 0}, ["micro_batch must be an integer >= 1"]),
    ("apts", {"foc": 1}, ["foc must be true or false"]),
    ("apts", {"local_batch": 1.5}, ["local_batch must be a fraction in (0, 1] or 'shard'", "1.5"]),
    ("apts", {"space": "data", "replicas": 2}, ["space='data'", "replicas > 1 (got 2)"]),
    ("tr", {"max_iters": True}, ["max_iters must be an integer"]),
    ("tr", {"radius": float("inf")}, ["radius must be a finite number"]),
    ("tr", {"eta1": 0.5, "eta2": 0.4}, ["0 < eta1 < eta2 < 1", "eta1=0.5"]),
    ("tr", {"radius": 0.5}, ["radius (0.5) must lie in [min_radius, max_radius]"]),
    ("tr", {"min_radius": 0.2}, ["min_radius (0.2) must not exceed max_radius (0.1)"]),
    ("apts", {"step": "sign", "local_model": "lsr1"}, ["step='sign'"]),
    ("sgd", {"lr": 0}, ["lr must be > 0"]),
    ("adam-lbfgs", {"adam_steps": -3}, ["adam_steps must be an integer >= 0"]),
    ("adam", {"momentum": 0.9}, ["momentum: unknown key"]),
    ("adam-apts", {"model_parallel": True, "decomposition": "stages"}, ["adam-apts needs the whole model"]),
    ("adam-apts", {"local_fraction": 2}, ["local_fraction must lie in (0, 1]"]),
])
def test_rules(method, given, words):
    with pytest.raises(options.OptionError) as err:
        options.resolve(method, given)
    for word in words:
        assert word in str(err.value)


def test_ints_become_floats_where_a_number_is_expected():
    values = options.resolve("tr", {"radius": 0.05, "max_radius": 1})
    assert values["max_radius"] == 1.0 and isinstance(values["max_radius"], float)


def test_constructor_only_keywords_stay_out_of_the_config():
    assert "tolerance_grad" in options.options("tr")
    assert "tolerance_grad" not in config.resolve({"optimizer": {"method": "tr"}})["optimizer"]
    with pytest.raises(config.ConfigError, match="optimizer.tolerance_grad: unknown key"):
        config.resolve({"optimizer": {"method": "tr", "tolerance_grad": 1e-3}})



def test_no_keyword_default_is_written_in_a_constructor_signature():
    """Each default lives in the options table: the constructors take ``**keywords``."""
    from apts_mpi import APTS, TrustRegion
    for cls in (APTS, TrustRegion):
        signature = inspect.signature(cls.__init__)
        written = {name for name, p in signature.parameters.items() if p.default is not p.empty}
        keywords = set(options.options("apts")) | set(options.options("tr"))
        assert not written & keywords, f"{cls.__name__} writes the defaults of {sorted(written & keywords)}"


@pytest.mark.parametrize("method", ["apts", "tr"])
def test_a_constructor_checks_each_keyword_once(method, monkeypatch):
    """APTS and TrustRegion check their keywords once (their engines' constants are not checked
    again), and build_optimizer leaves the check to them."""
    import collections

    import torch

    from apts_mpi.optimizers import build_optimizer

    calls = collections.Counter()
    validate = options.Option.validate

    def counting(self, value, prefix=""):
        calls[self.name] += 1
        return validate(self, value, prefix)

    monkeypatch.setattr(options.Option, "validate", counting)
    given = {"radius": 0.02, "max_radius": 1.0, "eta1": 0.1, "norm": "inf"}
    model = torch.nn.Linear(3, 2)
    build_optimizer({"optimizer": {"method": method, **given}, "seed": 0}, model,
                    torch.nn.functional.mse_loss, None)
    assert dict(calls) == {name: 1 for name in given}
