"""lightning_cit/loss.py: the chunked per-sample loss equals the unchunked one, and its memory is a fixed multiple
of one chunk (live tensor bytes counted by a dispatch mode over every op of forward and backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_cit.collate import IGNORE_INDEX
from lightning_cit.loss import per_sample_loss, per_sample_loss_from_hidden


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The former implementation: one cross_entropy over the full float32 logits."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="none").view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token.sum(dim=1) / counts.clamp(min=1), counts


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive, checked after every op."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                self.refs.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def batch(vocab: int, seq: int, n: int = 3, d: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, seq, d, generator=g)
    head = torch.nn.Linear(d, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.5, generator=g)
    labels = torch.randint(0, vocab, (n, seq), generator=g)
    labels[0, : seq // 3] = IGNORE_INDEX  # a prompt
    labels[1, -5:] = IGNORE_INDEX  # padding
    if n > 2:
        labels[2, :] = IGNORE_INDEX  # prompt only: loss 0, count 0
    return hidden, head, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_losses_equal_the_unchunked_loss_and_its_gradients(chunk):
    hidden, head, labels = batch(vocab=300, seq=40)
    hidden.requires_grad_()
    ref, ref_counts = reference_loss(head(hidden), labels)
    (ref_grad,) = torch.autograd.grad((ref * ref_counts).sum(), hidden)
    for fn in (lambda: per_sample_loss(head(hidden), labels, chunk, unchunked_max_bytes=0), lambda: per_sample_loss_from_hidden(hidden, head, labels, chunk)):
        losses, counts = fn()
        assert torch.equal(counts, ref_counts) and losses[2] == 0
        torch.testing.assert_close(losses, ref, rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad((losses * counts).sum(), hidden)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)  # matmul blocking differs per chunk
    # in bf16 (the logits under autocast) the chunked loss equals the float32 cross-entropy of those bf16 logits
    logits16 = head(hidden).detach().bfloat16()
    torch.testing.assert_close(per_sample_loss(logits16, labels, 7, 0)[0], reference_loss(logits16, labels)[0], rtol=1e-6, atol=1e-6)
    # small logits: computed in one piece, bit for bit the former loss and its gradient
    losses, counts = per_sample_loss(head(hidden), labels, chunk)
    assert torch.equal(losses, ref) and torch.equal(torch.autograd.grad((losses * counts).sum(), hidden)[0], ref_grad)


def test_loss_memory_is_a_fixed_multiple_of_one_chunk_whatever_the_sequence():
    """Large-vocabulary toy (vocab 32k): forward + backward of the fused loss keeps a few chunks' worth of live
    bytes, the same at 256 and 1,024 tokens, while the former loss holds several full float32 logits."""
    vocab, chunk = 32_768, 32
    chunk_bytes = chunk * vocab * 4  # one chunk's float32 logits
    peaks = {}
    for seq in (256, 1024):
        hidden, head, labels = batch(vocab, seq, n=2)
        head.weight.requires_grad_(False)  # a frozen head, as under LoRA
        hidden.requires_grad_()
        for name, fn in (("fused", lambda: per_sample_loss_from_hidden(hidden, head, labels, chunk)),
                         ("logits", lambda: per_sample_loss(head(hidden), labels, chunk, unchunked_max_bytes=0)),
                         ("reference", lambda: reference_loss(head(hidden), labels))):
            with LiveBytes() as tracker:
                losses, counts = fn()
                (losses * counts).sum().backward()
            peaks[name, seq] = tracker.peak
            hidden.grad = None
    full_fp32_logits = 2 * 1024 * vocab * 4
    assert peaks["fused", 1024] <= 6 * chunk_bytes, peaks
    assert peaks["fused", 1024] <= 1.25 * peaks["fused", 256], peaks  # independent of the sequence length
    assert peaks["reference", 1024] >= 2 * full_fp32_logits, peaks  # the float copy and its log-softmax
    # from logits: the logits and their gradient (model outputs) plus a few chunks, no float32 copy of them all
    logits_bytes = full_fp32_logits  # float32 logits on this toy
    assert peaks["logits", 1024] <= 2 * logits_bytes + 6 * chunk_bytes, peaks  # logits, their gradient, a few chunks
