"""Back-matching rates in a Hugging Face Trainer run: one callback.

    python examples/hf_trainer_backmatch.py       # synthetic data, CPU, a few seconds

Any ``nn.Module`` whose forward returns a dict with "loss" trains in the Trainer; the callback
prepares the plan from the first batch (forward's first argument, here ``x``).
"""
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainingArguments

from fxbackmatch.integrations import BackmatchTrainerCallback


class MLPClassifier(nn.Module):
    def __init__(self, d_in=32, width=128, classes=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Blobs(torch.utils.data.Dataset):
    def __init__(self, n=1024, d=32, classes=4):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(classes, d, generator=g) * 0.3
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, d, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


if __name__ == "__main__":
    model = MLPClassifier()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # × scales of ~10–300 here
    # SGD: mode "grad" with weight decay before the rescale. With the Trainer's default AdamW
    # (no optimizers=...) the callback picks mode="length"; give AdamW its own weight decay.
    backmatch = BackmatchTrainerCallback(weight_decay=5e-4, compile=False)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=64, num_train_epochs=2,
        max_grad_norm=1.0,  # clips the raw gradients, before the rescale
        lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to=[],
        save_strategy="no", logging_steps=8, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blobs(), optimizers=(sgd, None), callbacks=[backmatch])
    trainer.train()
    print({n: round(s, 3) for n, s in backmatch.scales().items()})
