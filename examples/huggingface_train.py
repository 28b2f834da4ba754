"""Hugging Face ``Trainer`` with spectral gradient noise: one callback added, nothing downloaded.

A tiny ``PreTrainedModel`` (a LeNet on scikit-learn's 8x8 digits, built locally from a config) is trained
by an ordinary ``Trainer`` twice with the same seed: with ``GradientDefenseCallback(mechanism="monitor")``
(risk measured, no noise) and with the spectral defense at the chosen budget. The Trainer clips gradients
to ``max_grad_norm`` and calls ``on_pre_optimizer_step``; the callback adds its noise there, after the clip
and just before ``optimizer.step()``. The risk scalars join the Trainer's logs (``trainer.state.log_history``,
printed every ``logging_steps``); the script prints the predicted PSNR of the probe samples at every
spectrum refresh and both runs' test accuracy.

    python examples/huggingface_train.py            # about a minute on 2 CPU cores
    python examples/huggingface_train.py --budget 0.2
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from torch import nn

from invdefend.monitor import format_refreshes


def _classes():
    import transformers

    from invdefend.models import LeNet

    class DigitsConfig(transformers.PretrainedConfig):
        model_type = "invdefend-digits-lenet"

        def __init__(self, num_labels: int = 10, width: int = 12, **kwargs) -> None:
            super().__init__(num_labels=num_labels, **kwargs)
            self.width = width

    class DigitsLeNet(transformers.PreTrainedModel):
        """``forward(pixel_values, labels=None) -> {"loss", "logits"}`` like an image classifier of the Hub."""

        config_class = DigitsConfig

        def __init__(self, config: DigitsConfig) -> None:
            super().__init__(config)
            self.lenet = LeNet(in_channels=1, image_size=8, num_classes=config.num_labels, width=config.width,
                               activation="relu")
            self.post_init()

        def _init_weights(self, module: nn.Module) -> None:
            pass  # keep PyTorch's default initialisation of the LeNet layers

        def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
            logits = self.lenet(pixel_values)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    class DigitsDataset(torch.utils.data.Dataset):
        def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
            self.x, self.y = x, y

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict:
            return {"pixel_values": self.x[i], "labels": self.y[i]}

    return DigitsConfig, DigitsLeNet, DigitsDataset


def _run(args: argparse.Namespace, mechanism: str) -> tuple[float, list]:
    import transformers

    from invdefend.data import digits_split
    from invdefend.integrations.huggingface import GradientDefenseCallback

    DigitsConfig, DigitsLeNet, DigitsDataset = _classes()
    x, y, x_test, y_test = digits_split(seed=0)
    torch.manual_seed(args.seed)
    model = DigitsLeNet(DigitsConfig())
    callback = GradientDefenseCallback(input_key="pixel_values", label_key="labels", budget=args.budget,
                                       mechanism=mechanism, k=16, probes=2, refresh_every=args.refresh_every,
                                       seed=args.seed)
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="constant", optim="adamw_torch",
            max_grad_norm=args.clip, seed=args.seed, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="steps", logging_steps=args.logging_steps, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(model=model, args=training_args, train_dataset=DigitsDataset(x, y),
                                       callbacks=[callback])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            trainer.train()
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=x_test)["logits"].argmax(1) == y_test).float().mean().item()
    logged = [h for h in trainer.state.log_history if "invdefend/gradient/noise/relative_energy" in h]
    print(f"[{mechanism}] {trainer.state.global_step} optimizer steps, {len(callback.records)} protected releases, "
          f"{len(logged)} Trainer logs carrying invdefend scalars")
    return accuracy, callback.records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--clip", type=float, default=5.0, help="TrainingArguments.max_grad_norm")
    parser.add_argument("--budget", type=float, default=0.05, help="noise energy relative to ‖mean gradient‖²")
    parser.add_argument("--refresh-every", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {m: _run(args, m) for m in ("monitor", "spectral")}
    print("\n" + format_refreshes(results["spectral"][1]))
    print(f"test accuracy: monitor (no noise) {results['monitor'][0]:.3f}, "
          f"spectral budget {args.budget} {results['spectral'][0]:.3f}")


if __name__ == "__main__":
    main()
