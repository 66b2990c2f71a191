"""Class-parallel AMSoftmax: `torchrun --nproc_per_node=2 examples/sharded_demo.py` (gloo on CPU, NCCL on GPUs).

Each rank holds 1/world of the class weights and its own batch; a small backbone is replicated with DDP. After a few
steps the demo gathers the weight slices and checks the sharded loss against the single-process loss over the
concatenated batch.
"""

import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deepfense import functional as F
from deepfense.distributed import sum_comm_hook
from deepfense.losses import AMSoftmax

N_CLASSES, DIM, FEATURES, BATCH = 10_000, 64, 32, 48


def main():
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same backbone on every rank (DDP also broadcasts rank 0's)
    backbone = DDP(torch.nn.Sequential(torch.nn.Linear(FEATURES, DIM), torch.nn.ReLU(), torch.nn.Linear(DIM, DIM))
                   .to(device), device_ids=[device.index] if cuda else None)
    backbone.register_comm_hook(None, sum_comm_hook)  # the backbone gets the exact global gradient (see docs)
    torch.manual_seed(1 + rank)  # each rank initialises its own class slice
    head = AMSoftmax(DIM, N_CLASSES, m=0.2, s=30.0, process_group=dist.group.WORLD).to(device)  # NOT wrapped in DDP
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3)

    gen = torch.Generator().manual_seed(100 + rank)
    batch = BATCH + 8 * rank  # uneven batches are fine
    for step in range(5):
        feats = torch.randn(batch, FEATURES, generator=gen).to(device)
        targets = torch.randint(0, N_CLASSES, (batch,), generator=gen).to(device)  # global class indices
        loss = head(backbone(feats), targets)  # the same global loss on every rank
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    # check: gather the slices and compare with the non-sharded loss of the concatenated batch
    with torch.no_grad():
        emb = backbone(feats)
        sharded = head(emb, targets)
        parts = [None] * world  # uneven shapes: gather as objects (fine for a check, not for training)
        dist.all_gather_object(parts, (emb.cpu(), targets.cpu(), head.mapper.weight.cpu()))
        embs, tgts, slices = zip(*parts)
        full = F.am_softmax_loss(torch.cat(embs), torch.cat(slices, 1), torch.cat(tgts), m=0.2, s=30.0)
    if rank == 0:
        print(f"sharded {sharded.item():.6f}  single-process {full.item():.6f}  "
              f"rel. diff {abs(sharded.item() - full.item()) / abs(full.item()):.1e}  "
              f"(world {world}, {head.mapper.weight.shape[1]} of {N_CLASSES} classes on rank 0)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
