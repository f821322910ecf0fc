"""Post-hoc baselines on a small MLP over the digits pixels."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from kmem.unlearn import METHODS, posthoc, random_request


@dataclass
class Data:
    inputs: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def trained():
    """An MLP fitted to 600 digits until it memorises them; the forget set is 10% of them."""
    digits = load_digits()
    x = torch.tensor(digits.data[:600], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:600], dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    forget = random_request(torch.arange(600), 0.1, seed=0).mask(torch.arange(600))
    return model.eval(), Data(x[~forget], y[~forget]), Data(x[forget], y[forget])


def _acc(model, data):
    with torch.no_grad():
        return (model(data.inputs).argmax(1) == data.labels).float().mean().item()


def _loss(model, data):
    with torch.no_grad():
        return F.cross_entropy(model(data.inputs), data.labels).item()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_updates_a_copy_reproducibly(trained, method):
    model, retain, forget = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = posthoc.unlearn(method, model, retain, forget, num_classes=10, seed=1, epochs=2)
    b = posthoc.unlearn(method, model, retain, forget, num_classes=10, seed=1, epochs=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert a.model is not model and not a.model.training and a.seconds > 0
    assert any(not torch.equal(before[k], v) for k, v in a.model.state_dict().items())
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_forgetting_methods_raise_the_forget_loss(trained):
    model, retain, forget = trained
    assert _acc(model, forget) == 1.0
    for method in ("RL", "SalUn"):
        out = posthoc.unlearn(method, model, retain, forget, num_classes=10, seed=0)
        assert _loss(out.model, forget) > 2 * _loss(model, forget), method
    # Ascent barely moves a memorised set (its gradient is near zero) until it diverges.
    ga = posthoc.unlearn("GA", model, retain, forget, num_classes=10, lr=0.1, epochs=20)
    assert _acc(ga.model, forget) < 0.5


def test_fine_tune_and_scrub_keep_the_retain_set(trained):
    model, retain, forget = trained
    for method in ("FT", "SCRUB", "RL"):
        out = posthoc.unlearn(method, model, retain, forget, num_classes=10)
        assert _acc(out.model, retain) > 0.95, method


def test_scrub_moves_away_from_the_teacher_on_the_forget_set(trained):
    model, retain, forget = trained
    out = posthoc.unlearn("SCRUB", model, retain, forget, num_classes=10, lr=0.05)

    def kl(data):  # KL(teacher || student)
        with torch.no_grad():
            student, teacher = F.log_softmax(out.model(data.inputs), 1), F.log_softmax(model(data.inputs), 1)
            return F.kl_div(student, teacher, log_target=True, reduction="batchmean").item()

    # Max-steps push the student away on the forget set, min-steps pull it back on the retain set.
    assert kl(forget) > 2 * kl(retain) > 0


def test_saliency_mask_selects_the_largest_gradients(trained):
    model, _, forget = trained
    mask = posthoc.saliency_mask(model, forget, 0.25)
    grads = torch.autograd.grad(
        F.cross_entropy(model(forget.inputs), forget.labels), list(model.parameters())
    )
    flat_g = torch.cat([g.abs().flatten() for g in grads])
    flat_m = torch.cat([m.flatten() for m in mask.values()])
    assert flat_m.sum() == round(0.25 * len(flat_g))
    assert flat_g[flat_m].min() >= flat_g[~flat_m].max() - 1e-6  # one batch: the same gradient


def test_salun_only_moves_salient_weights(trained):
    model, retain, forget = trained
    mask = posthoc.saliency_mask(model, forget, 0.3)
    out = posthoc.unlearn("SalUn", model, retain, forget, num_classes=10, sparsity=0.3)
    for (name, p), q in zip(model.named_parameters(), out.model.parameters(), strict=True):
        assert torch.equal(p[~mask[name]], q[~mask[name]]), name
        assert not torch.equal(p[mask[name]], q[mask[name]]), name


def test_bad_calls(trained):
    model, retain, forget = trained
    with pytest.raises(ValueError, match="unknown method 'XX'"):
        posthoc.unlearn("XX", model, retain, forget, num_classes=10)
    with pytest.raises(ValueError, match="forget set is empty"):
        posthoc.unlearn("GA", model, retain, Data(forget.inputs[:0], forget.labels[:0]), num_classes=10)
    with pytest.raises(TypeError):
        posthoc.unlearn("GA", model, retain, forget, num_classes=10, no_such_field=1)
    with pytest.raises(ValueError, match="sparsity"):
        posthoc.saliency_mask(model, forget, 0.0)


def test_ga_early_stop_keeps_the_retain_probe_above_its_floor(trained):
    model, retain, forget = trained
    wild = posthoc.unlearn("GA", model, retain, forget, num_classes=10, lr=0.5, epochs=20)
    assert _acc(wild.model, retain) < 0.5  # without the stop, ascent destroys the model
    stopped = posthoc.unlearn("GA", model, retain, forget, num_classes=10, lr=0.5, epochs=20, stop_retain=0.9)
    probe = Data(retain.inputs[:1024], retain.labels[:1024])
    # It stopped at the first step that took the probe below 90% of its start, long before the end.
    assert _acc(stopped.model, probe) < 0.9 * _acc(model, probe)
    assert _acc(stopped.model, retain) > _acc(wild.model, retain)


def test_clip_norm_bounds_every_step(trained):
    model, retain, forget = trained
    kw = dict(num_classes=10, lr=1.0, epochs=1, momentum=0.0, weight_decay=0.0, batch_size=len(forget.labels))
    clipped = posthoc.unlearn("GA", model, retain, forget, clip_norm=1e-3, **kw)
    pairs = zip(clipped.model.parameters(), model.parameters(), strict=True)
    moved = torch.cat([(a - b).detach().flatten() for a, b in pairs])
    assert 0 < float(moved.norm()) <= 1e-3 + 1e-6  # one step of lr 1 on a gradient of norm <= 1e-3
