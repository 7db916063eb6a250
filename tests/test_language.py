"""Tiny Shakespeare problem: data split and vocabulary, windows, the GPT (causality, shapes,
parameter counts by hand), the objective contract, the metrics against a direct computation."""
import math

import pytest
import torch

from apts_mpi.config import resolve
from apts_mpi.errors import ConfigError
from apts_mpi.data import DataError
from apts_mpi.problems.language import GPT_SIZES, LanguageProblem, gpt
from conftest import PartComm

TEXT = "".join(f"line {i}: to be, or not to be? {'ABCxyz'[i % 6]}\n" for i in range(12))


def make_problem(tmp_path, text=TEXT, context=8, name="gpt-small", dtype=torch.float64,
                 test_batch_size=5):
    (tmp_path / "tinyshakespeare").mkdir(exist_ok=True)
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text, encoding="utf-8")
    cfg = {"seed": 3, "model": {"name": name, "dtype": "float64"},
           "data": {"dataset": "tinyshakespeare", "root": str(tmp_path), "batch_size": 16,
                    "test_batch_size": test_batch_size, "context": context}}
    return LanguageProblem(cfg, torch.device("cpu"), dtype)


def decode(problem, ids):
    return "".join(problem.chars[i] for i in ids.tolist())


def hand_count(vocab, layers, width, context):
    d = width
    embedding = vocab * d + context * d
    attention = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    block = 2 * d + attention + 2 * d + mlp  # two LayerNorms (weight, bias)
    head = 2 * d + d * vocab  # final LayerNorm, linear head without bias
    return embedding + layers * block + head


def test_split_vocabulary_and_windows(tmp_path):
    p = make_problem(tmp_path)
    assert p.chars == sorted(set(TEXT)) and p.vocab == len(set(TEXT))
    cut = int(0.9 * len(TEXT))
    assert decode(p, p.train_tokens) == TEXT[:cut]
    assert decode(p, p.val_tokens) == TEXT[cut:]
    assert p.n_train == (cut - 1) // 8
    x, y = p.batch(torch.tensor([0, 3, p.n_train - 1]))
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    for row, i in enumerate((0, 3, p.n_train - 1)):
        assert decode(p, x[row]) == TEXT[8 * i:8 * i + 8]
        assert decode(p, y[row]) == TEXT[8 * i + 1:8 * i + 9]


def test_bad_data_and_config(tmp_path):
    cfg = {"seed": 0, "model": {"name": "gpt-small", "dtype": "float32"},
           "data": {"root": str(tmp_path / "nowhere"), "test_batch_size": 10, "context": None}}
    with pytest.raises(DataError) as e:
        LanguageProblem(cfg, torch.device("cpu"), torch.float32)
    assert "input.txt" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(b"abc\xff\xfe def" * 20)
    cfg["data"]["root"] = str(tmp_path)
    with pytest.raises(DataError, match="not UTF-8") as e:
        LanguageProblem(cfg, torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="too short"):
        make_problem(tmp_path, text="abcdefghij", context=8)
    # the config refuses what the problem cannot build, before any data is read
    given = {"data": {"dataset": "tinyshakespeare", "context": 65}, "model": {"name": "gpt-small"}}
    with pytest.raises(ConfigError, match=r"data.context must be at most 64 \(the context of "
                                          r"gpt-small\); got 65"):
        resolve(given)
    given["data"]["context"] = 64
    assert resolve(given)["data"]["context"] == 64
    given["model"]["name"] = "mnist-fc"
    with pytest.raises(ConfigError, match="model.name must be one of gpt-"):
        resolve(given)


@pytest.mark.parametrize("name", sorted(GPT_SIZES))
def test_parameter_counts_and_shapes(name):
    layers, heads, width, context = GPT_SIZES[name]
    torch.manual_seed(0)
    model = gpt(65, layers, heads, width, context)
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count:,} parameters (65 characters)")
    assert count == hand_count(65, layers, width, context)
    assert isinstance(model, torch.nn.Sequential) and len(model) == layers + 2
    ids = torch.randint(0, 65, (2, context))
    assert model(ids).shape == (2, context, 65)
    assert model(ids[:, :5]).shape == (2, 5, 65)
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, context + 1, dtype=torch.int64))
    # APTS runs a frozen prefix once and the rest per evaluation: slices compose to the whole
    with torch.no_grad():
        for k in (1, layers + 1):
            assert type(model[k:]) is torch.nn.Sequential
            torch.testing.assert_close(model[k:](model[:k](ids)), model(ids), rtol=0, atol=0)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = gpt(11, 2, 2, 16, 12).double()
    ids = torch.randint(0, 11, (3, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % 11
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 1e-6  # every later position sees it


def test_objective_contract(tmp_path):
    p = make_problem(tmp_path)
    torch.manual_seed(0)
    model = p.build_model()
    x, y = p.batch(torch.tensor([5, 0, 2, 9, 1, 7, 4]))
    # independent reference: mean over every token of -log softmax at the target
    logp = torch.log_softmax(model(x), dim=-1)
    reference = -logp.gather(-1, y[..., None]).mean()
    for cuts in ([7], [3, 4], [1, 2, 4], [1] * 7):
        parts = torch.split(torch.arange(7), cuts)
        total = sum(p.objective(model, (x[i], y[i])) for i in parts) / 7
        torch.testing.assert_close(total, reference, rtol=1e-12, atol=0)


def test_metrics_against_direct_computation(tmp_path):
    p = make_problem(tmp_path)
    torch.manual_seed(1)
    model = p.build_model()
    cut = int(0.9 * len(TEXT))
    val = TEXT[cut:]

    @torch.no_grad()
    def nats(text, start, stop):  # summed loss of predicting text[start+1:stop+1] from text[start:stop]
        ids = torch.tensor([[p.stoi[c] for c in text[start:stop + 1]]])
        logp = torch.log_softmax(model(ids[:, :-1]), dim=-1)[0]
        return -float(logp.gather(-1, ids[0, 1:, None]).sum())

    val_sum = sum(nats(val, s, min(s + 8, len(val) - 1)) for s in range(0, len(val) - 1, 8))
    starts = [int(s) for s in p.train_eval_starts]
    train_sum = sum(nats(TEXT[:cut], s, s + 8) for s in starts)
    metrics = p.evaluate(model, PartComm(0, 1))
    assert set(metrics) == set(p.metrics)
    assert metrics["val_loss"] == pytest.approx(val_sum / (len(val) - 1), rel=1e-12)
    assert metrics["train_loss"] == pytest.approx(train_sum / (8 * len(starts)), rel=1e-12)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-12)
    assert model.training
    # three ranks: the parts of the sums add up to the serial sums
    for size in (3, 10):  # 10 ranks: more than the validation windows
        comms = [PartComm(r, size) for r in range(size)]
        for c in comms:
            p.evaluate(model, c)
        summed = [sum(c.values[i] for c in comms) for i in range(2)]
        assert summed == pytest.approx([train_sum, val_sum], rel=1e-12)


def test_adam_lowers_the_loss_and_samples(tmp_path):
    text = "the cat sat on the mat.\n" * 60
    p = make_problem(tmp_path, text=text, context=16, dtype=torch.float32, test_batch_size=64)
    torch.manual_seed(0)
    model = p.build_model()
    before = p.evaluate(model, PartComm(0, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        part = p.batch(torch.randint(0, p.n_train, (16,), generator=g))
        opt.zero_grad()
        (p.objective(model, part) / 16).backward()
        opt.step()
    after = p.evaluate(model, PartComm(0, 1))
    assert after["train_loss"] < 0.5 * before["train_loss"]
    assert after["val_loss"] < 0.5 * before["val_loss"]
    sample = p.artifacts(model)["sample"]
    assert len(sample) == 201 and sample[0] == "\n" and set(sample[1:]) <= set(text)
    assert p.artifacts(model)["sample"] == sample  # seeded
    with pytest.raises(ValueError, match="prompt"):
        p.generate(model, prompt="Q")


def test_a_diverged_model_ends_its_sample_instead_of_failing(tmp_path):
    problem = make_problem(tmp_path)
    torch.manual_seed(0)
    model = problem.build_model()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # what a diverged run leaves
    assert problem.artifacts(model)["sample"] == "\n"
