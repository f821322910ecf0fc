"""A label memory over the digits, sharded across the ranks torchrun starts.

    torchrun --standalone --nproc-per-node 4 examples/sharded_memory.py

Each rank adds its slice of the training rows (each row then moves to the rank that
owns its id), classifies its slice of the test split by top-k attention over every
shard, forgets its slice of 10% of the training ids, and checks on rank 0 that the
sharded memory equals one KeyMemory that never held the forgotten rows. Uses NCCL and
one GPU per rank where GPUs exist, gloo on CPU otherwise.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import kmem


def main() -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A rank that dies or hangs makes the others raise kmem.distributed.ShardError after this.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    data = kmem.load_dataset("digits")
    keys = torch.nn.functional.normalize(data.train.images.flatten(1), dim=1)
    test_keys = torch.nn.functional.normalize(data.test.images.flatten(1), dim=1)
    mem = kmem.ShardedKeyMemory(keys.shape[1], num_classes=data.num_classes, device=device)
    mine = slice(rank, None, world)  # this rank's share of the inputs, whoever owns the rows
    mem.add(data.train.ids[mine].to(device), keys[mine].to(device), data.train.labels[mine].to(device))

    def accuracy() -> float:
        probs = mem.attend(test_keys[mine].to(device), k=10, scale=20.0)
        right = torch.tensor([(probs.argmax(1).cpu() == data.test.labels[mine]).sum(), probs.shape[0]])
        right = right.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(right)
        return float(right[0] / right[1])

    before = accuracy()
    forget = data.train.ids[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))]
    forget = forget[: len(forget) // 10]
    mem.delete(forget[mine])
    after = accuracy()
    fingerprint = mem.fingerprint()  # collective: gathers the whole (small) memory
    if rank == 0:
        single = kmem.KeyMemory(keys.shape[1], num_classes=data.num_classes)
        for r in range(world):  # the order the sharded adds define: rank by rank
            s = slice(r, None, world)
            single.add(data.train.ids[s], keys[s], data.train.labels[s])
        single.delete(forget)
        print(f"{world} shards, {len(mem)} rows after forgetting {len(forget)}; shard sizes vary by id hash")
        print(f"accuracy before {100 * before:.2f}%, after {100 * after:.2f}%")
        print(f"equals one KeyMemory without the forgotten rows: {fingerprint == single.fingerprint()}")
        print(f"bytes sent by rank 0 so far: {mem.bytes_sent:,}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
