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


def test_stream_request_is_disjoint_steps_in_order():
    ids = torch.arange(1000) * 3
    stream = requests.stream_request(ids, steps=10, fraction=0.01, seed=4)
    assert stream.kind == "stream" and stream.name == "stream-10x1%" and len(stream.steps) == 10
    assert all(len(s) == 10 for s in stream.steps)
    union = torch.cat(stream.steps)
    assert len(torch.unique(union)) == 100 and torch.equal(torch.sort(union).values, stream.ids)
    assert bool(torch.isin(union, ids).all())
    assert torch.equal(requests.parse_request("stream", ids, ids % 2, seed=4).ids, stream.ids)
    three = requests.parse_request("stream:3x2%", ids, ids % 2, seed=4)
    assert [len(s) for s in three.steps] == [20, 20, 20]
    other = requests.stream_request(ids, seed=5)
    assert not torch.equal(other.ids, stream.ids)


def test_bad_stream_requests_name_the_request():
    ids = torch.arange(100)
    with pytest.raises(ValueError, match="nothing would be retained"):
        requests.stream_request(ids, steps=10, fraction=0.1)
    with pytest.raises(ValueError, match="steps"):
        requests.stream_request(ids, steps=0)
    with pytest.raises(ValueError, match="request 'stream:200x1%'"):
        requests.parse_request("stream:200x1%", ids, ids % 2)
    with pytest.raises(ValueError, match="request 'class:12': no sample has label 12"):
        requests.parse_request("class:12", ids, ids % 10)
    with pytest.raises(ValueError, match="request '150%'"):
        requests.parse_request("150%", ids, ids % 10)
