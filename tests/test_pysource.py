"""The offline character corpus (the standard library's Python sources) and the small causal transformer."""

from __future__ import annotations

import socket

import pytest
import torch

from effilab import datasets as D


@pytest.fixture(scope="module")
def corpus():
    return D.pysource(seq_len=64, max_bytes=200_000)


def test_corpus_is_deterministic_offline_and_shaped(corpus, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("pysource touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = D.get_task("pysource", seq_len=64, max_bytes=200_000)
    assert torch.equal(corpus.train.tokens, again.train.tokens) and torch.equal(corpus.valid.tokens,
                                                                                again.valid.tokens)
    assert len(corpus.train.tokens) + len(corpus.valid.tokens) == 200_000
    assert corpus.n_classes == 128 and corpus.input_shape == (64,) and corpus.kind == "language_model"
    x, y = corpus.train[5]
    assert x.shape == y.shape == (64,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])  # y is x shifted by one
    assert int(corpus.train.tokens.max()) < 128
    text = bytes(corpus.train.tokens[:20_000].tolist()).decode("ascii")
    assert "def " in text and "import " in text
    assert len(corpus.valid) > 0 and len(corpus.train) > 9 * len(corpus.valid) - 10


def test_bad_corpus_parameters():
    with pytest.raises(ValueError):
        D.pysource(seq_len=64, max_bytes=100)
    with pytest.raises(ValueError):
        D.pysource(valid_frac=1.0)


def test_transformer_is_causal_and_takes_any_length():
    torch.manual_seed(0)
    model = D.char_transformer(128, d_model=32, n_layer=2, n_head=4, max_len=16).eval()
    x = torch.randint(0, 128, (2, 16))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 128
    with torch.no_grad():
        a, b = model(x), model(changed)
        assert a.shape == (2, 16, 128)
        assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)  # earlier positions do not see token 10
        assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-5)
        assert torch.allclose(model(x[:, :8]), a[:, :8], atol=1e-5)  # a shorter sequence: same prefix logits
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_small_model_for_the_corpus_learns_next_characters(corpus):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    torch.manual_seed(0)
    small = D.pysource(seq_len=32, max_bytes=60_000)
    model = D.small_model(small, width=32)
    assert isinstance(model, D.CharTransformer)
    learn = Learner(small.dataloaders(bs=32, seed=0), model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    before, _ = learn.validate()
    with learn.no_logging(), learn.no_bar():
        learn.fit_one_cycle(1, 1e-2)
    after, acc = learn.validate()
    assert after < before - 1.0 and acc > 0.15  # next-character accuracy over (bs, T) flattened
