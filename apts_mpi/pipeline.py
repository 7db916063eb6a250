"""The point-to-point pipe of model-parallel APTS: rank d holds block d of an ``nn.Sequential``.

Activations travel down the pipe (rank d -> d + 1) and output-gradients back up (d + 1 -> d) with
blocking ``Send``/``Recv`` on flat buffers; a small pickled header before each group of tensors
says their shapes and dtypes.  Two kinds of traffic, both for a list of micro-batches (*pieces*):

``full_pass``
    one forward of every piece through all blocks at their current parameters, the loss summed on
    the last rank in piece order, then (with gradients) one backward of every piece in piece order,
    each rank accumulating its block's gradient.  The loss is broadcast from the last rank.
``probe_round``
    one lock-step round of the local phases: each rank that is still iterating sends its *probe*,
    its block at its trial iterate applied to its cached block input; a downstream rank applies
    every probe that reaches it to its block at theta_k (the ``frozen`` copy) and passes it on; the
    last rank sums each probe's loss over the pieces; the losses and (for probes that want one) the
    output-gradients travel back, each rank taking what is its own.

On every link all forward messages of a pass precede all backward ones, in the same order at both
ends, so blocking point-to-point messages cannot deadlock.  Everything an evaluation sums runs in
piece order, as in the one-process evaluation of the same pieces: the values are those of the
serial emulation (docs/method.md, "Model-parallel APTS").
"""
from __future__ import annotations

import torch

LOSS, GRAD = 1, 2  # a probe that wants its loss, or its loss and gradient


class Pipe:
    """Messages between neighbouring ranks of ``comm`` (a :class:`~apts_mpi.comm.Comm`), with byte counts.

    ``block`` is this rank's block (current parameters), ``frozen`` its copy at theta_k (parameters
    without gradients), ``objective`` an Objective with ``sequential_inputs`` (the last rank calls
    ``objective(block, (activation, *targets))``).
    """

    def __init__(self, comm, block, frozen, objective):
        self.comm, self.block, self.frozen, self.objective = comm, block, frozen, objective
        self.rank, self.size = comm.rank, comm.size
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.bytes_down = self.bytes_up = 0  # sent by this rank to rank + 1 / rank - 1

    # -- messages ---------------------------------------------------------------------------------
    def _send(self, dest: int, header, tensors) -> None:
        self.comm.send(header, dest)
        sent = 0
        for t in tensors:
            t = t.detach().contiguous()
            if t.device.type != "cpu":
                t = t.cpu()
            self.comm.send_(t, dest)
            sent += t.numel() * t.element_size()
        if dest > self.rank:
            self.bytes_down += sent
        else:
            self.bytes_up += sent

    def _recv(self, source: int, shapes):
        """The header from ``source`` and the tensors it announces (``shapes(header)``: their
        (shape, dtype) list)."""
        header = self.comm.recv(source)
        out = []
        for shape, dtype in shapes(header):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            self.comm.recv_(t, source)
            out.append(t.to(self._device))
        return header, out

    @property
    def _device(self):
        return next(self.block.parameters()).device

    @staticmethod
    def _spec(t: torch.Tensor):
        return tuple(t.shape), str(t.dtype).removeprefix("torch.")

    def _apply(self, module, x, piece, grad: bool):
        """Block output (or, on the last rank, the piece's summed loss term)."""
        with torch.set_grad_enabled(grad):
            if self.last:
                return self.objective(module, (x, *piece[1:]))
            return module(x)

    # -- a full pass ------------------------------------------------------------------------------
    def full_pass(self, pieces, grad: bool, inputs: list | None = None):
        """Loss sum over ``pieces`` (0-dim tensor, every rank) at the current parameters; with
        ``grad`` the block's gradient (``.grad``, summed over the pieces) on every rank.
        ``inputs`` (a list) receives this rank's block input of every piece, detached."""
        outs, xs = [], []
        loss = None
        for piece in pieces:
            if self.first:
                x = piece[0]
            else:
                _, (x,) = self._recv(self.rank - 1, lambda h: [h])
            if inputs is not None:
                inputs.append(x.detach())
            if grad and not self.first and x.is_floating_point():
                x.requires_grad_(True)
            y = self._apply(self.block, x, piece, grad)
            if self.last:
                loss = y.detach() if loss is None else loss + y.detach()
            else:
                self._send(self.rank + 1, self._spec(y), [y])
            outs.append(y)
            xs.append(x)
        if grad:
            self.block.zero_grad(set_to_none=False)
            for x, y in zip(xs, outs):
                if self.last:
                    y.backward()
                else:
                    _, (g,) = self._recv(self.rank + 1, lambda h: [h])
                    y.backward(g)
                if not self.first:
                    self._send(self.rank - 1, self._spec(x.grad), [x.grad])
        return self._share_loss(loss, pieces)

    def _share_loss(self, loss, pieces):
        """The last rank's loss sum, on every rank (its dtype and bits kept)."""
        dtype = next(self.block.parameters()).dtype
        buf = torch.zeros(1, dtype=dtype)
        if self.last:
            buf[0] = (loss if loss is not None else torch.zeros((), dtype=dtype)).item()
        self.comm.bcast_(buf, root=self.size - 1)
        return buf[0].clone()

    # -- a round of the local phases --------------------------------------------------------------
    def probe_round(self, inputs, pieces, own: int):
        """One lock-step round; ``own`` is 0 (this rank sends no probe), LOSS or GRAD.

        ``inputs``: this rank's cached block inputs at theta_k (one per piece).  Returns this
        rank's probe loss sum (0-dim tensor, None without a probe); with GRAD the block's gradient
        (``.grad``) is that of its probe, summed over the pieces.
        """
        kept = []  # per piece: [(probe, flag, x, y)] in probe order
        losses = {}
        for m, piece in enumerate(pieces):
            probes = []
            if not self.first:
                header, acts = self._recv(self.rank - 1, lambda h: [(s, d) for _, _, s, d in h])
                for (j, flag, _, _), x in zip(header, acts):
                    if flag == GRAD and x.is_floating_point():
                        x.requires_grad_(True)
                    probes.append((j, flag, x, self._apply(self.frozen, x, piece, flag == GRAD)))
            if own:
                x = inputs[m]
                probes.append((self.rank, own, x, self._apply(self.block, x, piece, own == GRAD)))
            if self.last:
                for j, _, _, y in probes:
                    losses[j] = y.detach() if j not in losses else losses[j] + y.detach()
            else:
                self._send(self.rank + 1, [(j, flag, *self._spec(y)) for j, flag, _, y in probes],
                           [y for *_, y in probes])
            kept.append(probes)
        # backward: the losses first, then the output-gradients piece by piece
        if not self.last:
            losses, _ = self._recv(self.rank + 1, lambda h: [])
        if not self.first:
            self._send(self.rank - 1, {j: v for j, v in losses.items() if j < self.rank}, [])
        if own == GRAD:
            self.block.zero_grad(set_to_none=False)
        for probes in kept:
            wanted = [p for p in probes if p[1] == GRAD]
            if not wanted:
                continue
            if self.last:
                grads = [None] * len(wanted)
            else:
                _, grads = self._recv(self.rank + 1, lambda h: h)
            back = []
            for (j, _, x, y), g in zip(wanted, grads):
                y.backward(g)
                if j != self.rank:
                    back.append(x.grad)
            if back:
                self._send(self.rank - 1, [self._spec(g) for g in back], back)
        return losses.get(self.rank) if own else None
