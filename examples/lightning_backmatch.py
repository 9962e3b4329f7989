"""Back-matching rates in a Lightning fit: one callback, no change to the LightningModule.

    python examples/lightning_backmatch.py        # synthetic data, CPU, a few seconds
"""
import lightning.pytorch as L
import torch
import torch.nn.functional as F

from fxbackmatch.integrations import BackmatchCallback
from fxbackmatch.models import lenet_bn


class LitLeNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = lenet_bn()
        self.example_input_array = torch.randn(2, 3, 32, 32)  # BackmatchCallback prepares from it

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # weight decay goes to the callback (added before the rescale); the optimizer's stays 0
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


if __name__ == "__main__":
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,)))
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    # compile=False: no torch.compile of the per-step factor function (quick on CPU)
    backmatch = BackmatchCallback(weight_decay=5e-4, compile=False)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", gradient_clip_val=5.0,  # clips the raw gradients
        logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[backmatch],
    )
    trainer.fit(LitLeNet(), loader)
    print(backmatch.plan)  # per-layer factors at the final weights
