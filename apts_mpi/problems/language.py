"""Character-level language modelling on Tiny Shakespeare with a small decoder-only transformer.

Data: ``ROOT/tinyshakespeare/input.txt`` (``ROOT`` is :func:`apts_mpi.data.data_root`), read as
UTF-8.  The vocabulary is the sorted set of the characters of the whole text; the first 90% of the
characters (by position, ``int(0.9 * n)``) are the training split, the rest the validation split.

Samples: the training split is cut into non-overlapping windows of ``context + 1`` characters that
share their boundary character, window ``i`` being ``train[i * context : (i + 1) * context + 1]``;
its input is the first ``context`` characters and its targets the next character at every position.
So ``n_train = (len(train) - 1) // context`` and one epoch of the sampler predicts every training
character (but the first and a short tail) exactly once: an epoch is one pass over the text, as
for the image sets.  All ``len(train) - context`` overlapping windows would make an "epoch"
``context`` times longer while showing each character ``context`` times; fixed windows also make a
minibatch a pure function of its indices, so a resumed run sees the same data.

Objective: :class:`~apts_mpi.objective.SampleLoss` of ``cross_entropy``: a sample's term is the mean
loss (nats) over its ``context`` targets.

Metrics after every epoch, in nats per character:
``val_loss``: over the whole validation split, every character but the first predicted once, in
consecutive windows of ``context`` characters (the last one shorter); a character early in its
window sees little context, so this is higher than a sliding-window evaluation.
``train_loss``: the same over a fixed, evenly spaced subset of the training windows, as many as the
validation split has full windows (the whole split would cost nine validation passes).
``val_perplexity``: ``exp(val_loss)``.
Evaluation runs ``data.test_batch_size`` windows per forward pass: set it to a few hundred (256
keeps ``gpt-shakespeare``'s activations to a few hundred MB; 10,000 would need several GB).

Networks (:func:`gpt`, an ``nn.Sequential`` of an embedding block, transformer blocks and a head, so
that APTS's balanced decomposition cuts it between whole blocks and caches a frozen prefix):

=====================  ======  =====  =====  =======  =================================
name                   layers  heads  width  context  parameters (65 characters)
=====================  ======  =====  =====  =======  =================================
``gpt-shakespeare``         6      6    192      128  2,719,104 (the authors' size)
``gpt-small``               2      4     64       64  112,512 (minutes on 2 CPU cores)
=====================  ======  =====  =====  =======  =================================

Pre-norm blocks ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``; causal self-attention through
``scaled_dot_product_attention(is_causal=True)``; learned position embeddings; a GELU MLP of width
``4 * width``; a final LayerNorm and a bias-free linear head (no weight tying: a tensor shared by two
blocks could not belong to one subdomain); no dropout (the objective must be deterministic for the
trust-region ratio).  Initialisation as in GPT-2: normal(0, 0.02) weights, zero biases, the residual
projections scaled by ``1 / sqrt(2 * layers)``.  Parameters: ``2 * V * d + T * d + 2 * d +
L * (12 * d**2 + 13 * d)`` for vocabulary V, width d, context T, L layers.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataError, data_root
from ..objective import SampleLoss
from ..options import Option, at_least
from .base import Problem

# name: (layers, heads, width, context)
GPT_SIZES = {
    "gpt-shakespeare": (6, 6, 192, 128),
    "gpt-small": (2, 4, 64, 64),
}
TRAIN_FRACTION = 0.9
FILE = Path("tinyshakespeare") / "input.txt"
SAMPLE_LENGTH = 200


class Embedding(nn.Module):
    """Token plus learned position embeddings: ``(b, t)`` integer ids -> ``(b, t, width)``."""

    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)

    def forward(self, ids):
        t = ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(f"sequence of {t} tokens is longer than the context "
                             f"{self.position.num_embeddings}")
        return self.token(ids) + self.position(torch.arange(t, device=ids.device))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``i`` attends to positions ``<= i``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d / heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the linear map to next-character logits ``(b, t, vocab)``."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        return self.out(self.ln(x))


def gpt(vocab: int, layers: int, heads: int, width: int, context: int) -> nn.Sequential:
    """Decoder-only transformer ``(b, t)`` ids -> ``(b, t, vocab)`` logits, ``t <= context``.

    A plain ``nn.Sequential`` (not a subclass: slicing it, as APTS does to run a frozen prefix
    once, builds a new ``nn.Sequential`` of the same class from the sliced modules).
    """
    model = nn.Sequential(Embedding(vocab, width, context),
                          *(Block(width, heads) for _ in range(layers)),
                          Head(width, vocab))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".ln" in name:
            nn.init.ones_(p)
        elif name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))  # residual projections
        else:
            nn.init.normal_(p, 0.0, 0.02)
    return model


def gpt_parameter_count(vocab: int, layers: int, width: int, context: int) -> int:
    """Hand count of the parameters of :func:`gpt` (see the module docstring)."""
    d = width
    return 2 * vocab * d + context * d + 2 * d + layers * (12 * d * d + 13 * d)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; DataError (one line) if missing, unreadable or not UTF-8."""
    if not path.is_file():
        raise DataError(f"missing {path}: put Tiny Shakespeare's input.txt there (or set data.root "
                        f"/ APTS_DATA to the folder that holds tinyshakespeare/)")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from e


class LanguageProblem(Problem):
    """Next-character prediction on Tiny Shakespeare (module docstring)."""

    datasets = ("tinyshakespeare",)
    data_keys = {"context": Option("context", None, (int, type(None)), **at_least(1))}
    models = tuple(GPT_SIZES)
    metrics = ("train_loss", "val_loss", "val_perplexity")
    target = ("val_loss", "min")

    @classmethod
    def config_rules(cls, cfg):
        name, context = cfg["model"]["name"], cfg["data"]["context"]
        if context is not None and context > GPT_SIZES[name][3]:
            yield "context", (f"data.context must be at most {GPT_SIZES[name][3]} (the context of "
                              f"{name}); got {context}")

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        context = cfg["data"].get("context")  # checked by the config (config_rules)
        self.context = GPT_SIZES[cfg["model"]["name"]][3] if context is None else context
        path = data_root(cfg["data"].get("root")) / FILE
        text = read_text(path)
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        tokens = torch.tensor([self.stoi[c] for c in text], dtype=torch.int64)
        cut = int(TRAIN_FRACTION * len(tokens))
        self.train_tokens, self.val_tokens = tokens[:cut].to(device), tokens[cut:].to(device)
        self.n_train = (len(self.train_tokens) - 1) // self.context
        if self.n_train < 1 or len(self.val_tokens) < 2:
            raise DataError(f"{path} is too short: {len(text)} characters give {self.n_train} "
                            f"training windows of {self.context + 1} and {len(self.val_tokens)} "
                            f"validation characters (need >= 1 and >= 2)")
        self.objective = SampleLoss(F.cross_entropy)
        # the validation split in consecutive windows of `context` targets, the last one shorter
        self.val_starts = torch.arange(0, len(self.val_tokens) - self.context, self.context)
        n_eval = max(min(self.n_train, len(self.val_starts)), 1)
        picks = torch.linspace(0, self.n_train - 1, n_eval).round().long().unique()
        self.train_eval_starts = picks * self.context

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def build_model(self):
        layers, heads, width, context = GPT_SIZES[self.cfg["model"]["name"]]
        return gpt(self.vocab, layers, heads, width, context).to(self.device, self.dtype)

    def batch(self, indices):
        starts = indices.to(self.device, torch.int64) * self.context
        windows = self.train_tokens[starts[:, None] + torch.arange(self.context + 1, device=self.device)]
        return windows[:, :-1], windows[:, 1:]

    def _summed_loss(self, model, tokens, starts, length):
        """Sum of the per-character losses (nats) of windows ``tokens[s : s + length + 1]``."""
        total = 0.0
        step = self.cfg["data"]["test_batch_size"]  # windows per forward pass
        offsets = torch.arange(length + 1, device=self.device)
        for i in range(0, len(starts), step):
            w = tokens[starts[i:i + step].to(self.device)[:, None] + offsets]
            logits = model(w[:, :-1])
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum"))
        return total

    def evaluate(self, model, comm):
        was_training = model.training
        model.eval()
        mine = []
        for starts in (self.train_eval_starts, self.val_starts):
            n = len(starts)
            mine.append(starts[n * comm.rank // comm.size:n * (comm.rank + 1) // comm.size])
        with torch.no_grad():
            train_sum = self._summed_loss(model, self.train_tokens, mine[0], self.context)
            val_sum = self._summed_loss(model, self.val_tokens, mine[1], self.context)
            tail_start = len(self.val_starts) * self.context
            tail = len(self.val_tokens) - 1 - tail_start
            if comm.rank == comm.size - 1 and tail > 0:
                val_sum += self._summed_loss(model, self.val_tokens, torch.tensor([tail_start]), tail)
        model.train(was_training)
        train_sum, val_sum = comm.sum_scalars([train_sum, val_sum])
        val_loss = val_sum / (len(self.val_tokens) - 1)
        return {"train_loss": train_sum / (len(self.train_eval_starts) * self.context),
                "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}

    def generate(self, model, length: int = SAMPLE_LENGTH, prompt: str = "\n", seed: int = 0) -> str:
        """``prompt`` followed by ``length`` characters sampled from the model's softmax (seeded);
        ValueError if ``prompt`` is empty or has a character outside the vocabulary.  A model whose
        output is not finite (a diverged run) ends the sample early, so a run still ends cleanly."""
        unknown = sorted(set(prompt) - set(self.stoi))
        if not prompt or unknown:
            raise ValueError(f"the prompt must be non-empty text of the vocabulary; got {prompt!r}")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.tensor([[self.stoi[c] for c in prompt]], device=self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for _ in range(length):
                logits = model(ids[:, -self.context:])[0, -1]
                probs = torch.softmax(logits.double(), dim=-1).cpu()
                if not torch.isfinite(probs).all():
                    break
                nxt = torch.multinomial(probs, 1, generator=generator).to(self.device)
                ids = torch.cat([ids, nxt[None]], dim=1)
        model.train(was_training)
        return "".join(self.chars[i] for i in ids[0].tolist())

    def artifacts(self, model):
        """``{"sample": ...}``: a newline (the first character of the vocabulary if the text has
        none) and 200 characters sampled from the model, seeded by the config's seed."""
        prompt = "\n" if "\n" in self.stoi else self.chars[0]
        return {"sample": self.generate(model, prompt=prompt, seed=self.cfg["seed"])}
