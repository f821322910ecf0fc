"""Forget requests: seeded, by sample id."""

from __future__ import annotations

import pytest
import torch

from kmem.unlearn import requests


def test_random_request_is_seeded_and_by_id():
    ids = torch.arange(1000, 2000)
    a = requests.random_request(ids, 0.1, seed=3)
    assert len(a) == 100 and a.name == "random-10%" and a.kind == "random" and a.seed == 3
    assert torch.equal(a.ids, torch.sort(a.ids).values) and len(torch.unique(a.ids)) == 100
    assert bool(torch.isin(a.ids, ids).all())
    assert torch.equal(a.ids, requests.random_request(ids, 0.1, seed=3).ids)
    assert not torch.equal(a.ids, requests.random_request(ids, 0.1, seed=4).ids)
    assert len(requests.random_request(ids, 0.01)) == 10
    assert a.mask(ids).sum() == 100


def test_class_request():
    ids = torch.tensor([5, 7, 9, 11, 13])
    labels = torch.tensor([1, 0, 1, 2, 1])
    r = requests.class_request(ids, labels, 1)
    assert r.ids.tolist() == [5, 9, 13] and r.name == "class-1" and r.seed is None


def test_standard_requests_and_parse():
    ids, labels = torch.arange(200), torch.arange(200) % 10
    names = [r.name for r in requests.standard_requests(ids, labels, label=3)]
    assert names == ["random-1%", "random-10%", "class-3"]
    assert requests.parse_request("10%", ids, labels).name == "random-10%"
    assert torch.equal(requests.parse_request("random:0.1", ids, labels, seed=2).ids,
                       requests.random_request(ids, 0.1, seed=2).ids)  # fmt: skip
    assert len(requests.parse_request("class:4", ids, labels)) == 20


def test_bad_requests():
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="fraction"):
        requests.random_request(ids, 1.0)
    with pytest.raises(ValueError, match="distinct"):
        requests.random_request(torch.tensor([1, 1, 2]), 0.5)
    with pytest.raises(TypeError, match="int64"):
        requests.random_request(torch.arange(10).float(), 0.5)
    with pytest.raises(ValueError, match="no sample has label 7"):
        requests.class_request(ids, ids % 2, 7)
    with pytest.raises(ValueError, match="nothing would be retained"):
        requests.class_request(ids, torch.zeros(10, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="must look like"):
        requests.parse_request("some:thing", ids, ids % 2)
    with pytest.raises(ValueError, match="must look like"):
        requests.parse_request("class:x", ids, ids % 2)
