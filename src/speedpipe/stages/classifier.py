"""Stage `classifier`: the demo's digit classifier (feature extractor for FID/KID/PR and IS logits).

Trains on the dataset minus every 10th image and reports accuracy on those held-out images. Images are read batch
by batch (memory independent of the dataset size); unreadable files met (every held-out one, the training ones the
batches drew) are skipped and counted in metrics.json.
Writes {output_dir}/{experiment}/classifier/model.safetensors and metrics.json.
"""
import json

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from speedpipe.config import save_config
from speedpipe.data.images import BatchReader, held_out, open_image_dataset
from speedpipe.data.order import EpochBatches
from speedpipe.io import atomic_path, atomic_write_text
from speedpipe.layout import Layout
from speedpipe.models.classifier import DigitClassifier
from speedpipe.stages import STAGES


@STAGES["classifier"].entry
def run(cfg, provenance):
    e = cfg.eval
    out = Layout.of(cfg).classifier_dir()
    torch.manual_seed(cfg.seed)
    dataset = open_image_dataset(cfg.data)
    read = BatchReader(dataset)
    train_idx, test_idx = (torch.tensor(ix) for ix in held_out(len(dataset)))

    net = DigitClassifier(num_classes=dataset.num_classes).train()
    opt = torch.optim.AdamW(net.parameters(), lr=e.classifier_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=e.classifier_lr, total_steps=e.classifier_steps)
    order = EpochBatches(len(train_idx), e.classifier_batch_size, cfg.seed, key="eval.classifier_batch_size")
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(e.classifier_steps):
        x, y = read(train_idx[order.next_global_batch()])
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # small translations
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(net(x)[1], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    net.eval()
    correct = seen = 0
    with torch.no_grad():
        for x, y in read.batches(test_idx, 100):  # a small batch: the held-out pass is a constant in memory
            correct, seen = correct + (net(x)[1].argmax(1) == y).sum().item(), seen + len(y)
    accuracy = correct / seen
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    save_config(provenance, out / "config.yaml")
    atomic_write_text(out / "metrics.json", json.dumps({"heldout_accuracy": accuracy, "heldout_images": seen,
                                                        "skipped_images": len(read.skipped), "steps": e.classifier_steps}, indent=2))
    return out
