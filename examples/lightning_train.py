"""Lightning training with spectral gradient noise: one callback added to an ordinary ``Trainer``.

A LeNet on scikit-learn's 8x8 digits is fitted twice with the same seed: once with
``GradientDefenseCallback(mechanism="monitor")`` (risk measured, no noise) and once with the spectral
defense at the chosen budget. Lightning clips gradients (``gradient_clip_val``) and the callback adds its
noise after the clip, immediately before each optimizer update. The risk scalars go to Lightning's logger
(a CSVLogger under ``--out``); the script prints the predicted PSNR of the probe samples at each spectrum
refresh and the test accuracy of both runs.

    python examples/lightning_train.py              # about a minute on 2 CPU cores
    python examples/lightning_train.py --budget 0.2 --epochs 5
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from invdefend.monitor import format_refreshes


def _module(lr: float):
    import lightning.pytorch as pl

    from invdefend.models import LeNet

    class DigitsLeNet(pl.LightningModule):
        """LeNet (ReLU) on 8x8 digits, trained with Adam."""

        def __init__(self) -> None:
            super().__init__()
            self.net = LeNet(in_channels=1, image_size=8, activation="relu")
            self.criterion = nn.CrossEntropyLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.criterion(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr)

    return DigitsLeNet()


def _run(args: argparse.Namespace, mechanism: str) -> tuple[float, list]:
    import lightning.pytorch as pl

    from invdefend.data import digits_split
    from invdefend.integrations.lightning import GradientDefenseCallback

    x, y, x_test, y_test = digits_split(seed=0)
    pl.seed_everything(args.seed, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model = _module(args.lr)
    callback = GradientDefenseCallback(
        nn.CrossEntropyLoss(), budget=args.budget, mechanism=mechanism, k=16, probes=2,
        refresh_every=args.refresh_every, seed=args.seed,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, gradient_clip_val=args.clip,
        logger=pl.loggers.CSVLogger(args.out, name=mechanism), log_every_n_steps=5,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"[{mechanism}] {trainer.global_step} optimizer steps, {len(callback.records)} protected releases, "
          f"metrics in {trainer.logger.log_dir}/metrics.csv")
    return accuracy, callback.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=5.0, help="Lightning's gradient_clip_val (norm)")
    parser.add_argument("--budget", type=float, default=0.05, help="noise energy relative to ‖mean gradient‖²")
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args()

    results = {m: _run(args, m) for m in ("monitor", "spectral")}
    print("\n" + format_refreshes(results["spectral"][1]))
    print(f"test accuracy: monitor (no noise) {results['monitor'][0]:.3f}, "
          f"spectral budget {args.budget} {results['spectral'][0]:.3f}")


if __name__ == "__main__":
    main()
