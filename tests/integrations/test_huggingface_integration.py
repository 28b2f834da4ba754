"""The Hugging Face Trainer callback, exercised by real ``Trainer.train`` runs (tiny local models, no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from invdefend.data import digits_split  # noqa: E402
from invdefend import DefenseError  # noqa: E402
from invdefend.integrations.huggingface import GradientDefenseCallback  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 16
ENERGY_TAG = "invdefend/gradient/noise/relative_energy"


class DigitsConfig(transformers.PretrainedConfig):
    model_type = "invdefend-test-digits"

    def __init__(self, hidden: int = 32, num_labels: int = 10, vocab: int = 0, **kwargs) -> None:
        super().__init__(num_labels=num_labels, **kwargs)
        self.hidden = hidden
        self.vocab = vocab


class DigitsClassifier(transformers.PreTrainedModel):
    """A tiny image classifier in the Hugging Face shape: forward(pixel_values, labels) -> {loss, logits}."""

    config_class = DigitsConfig

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, config.hidden), nn.Tanh(),
                                 nn.Linear(config.hidden, config.num_labels))
        self.post_init()

    def forward(self, pixel_values=None, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TokenClassifier(transformers.PreTrainedModel):
    """A tiny sequence classifier over token ids: embedding, mean pooling, linear head."""

    config_class = DigitsConfig

    def __init__(self, config: DigitsConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab, 8)
        self.head = nn.Linear(8, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, labels=None):
        e = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        logits = self.head(torch.tanh(e).mean(dim=1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **columns: torch.Tensor) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


@pytest.fixture(scope="module")
def digits() -> DictDataset:
    x, y, _, _ = digits_split()
    return DictDataset(pixel_values=x[:256], labels=y[:256])


def _train(tmp_path, dataset, callbacks=(), model_cls=DigitsClassifier, config=None, **kwargs):
    torch.manual_seed(0)
    model = model_cls(config or DigitsConfig())
    start = [p.detach().clone() for p in model.parameters()]
    defaults = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=BATCH, report_to=[],
                    use_cpu=True, save_strategy="no", logging_strategy="steps", logging_steps=1,
                    disable_tqdm=True, learning_rate=0.1, seed=0, optim="sgd", lr_scheduler_type="constant",
                    dataloader_num_workers=0)
    defaults.update(kwargs)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**defaults),
                                   train_dataset=dataset, callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, model, start


def _callback(**kwargs) -> GradientDefenseCallback:
    defaults = dict(budget=0.2, k=8, probes=2, refresh_every=100, cold_sweeps=6, seed=3)
    defaults.update(kwargs)
    return GradientDefenseCallback(**defaults)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_train_protects_every_step_logs_and_changes_parameters(tmp_path, digits):
    _, plain, _ = _train(tmp_path / "plain", digits)
    monitor_cb = _callback(mechanism="monitor")
    _, monitored, _ = _train(tmp_path / "monitor", digits, [monitor_cb])
    cb = _callback()
    trainer, defended, _ = _train(tmp_path / "spectral", digits, [cb])

    assert trainer.state.global_step == 3
    assert len(cb.records) == 3 and [r.step for r in cb.records] == [0, 1, 2]
    assert all(not r.fallback and r.relative_energy > 0 for r in cb.records)
    first = cb.records[0]
    assert first.refreshed and max(first.predicted_psnr) < min(first.undefended_predicted_psnr)
    assert cb.last_batch_size == BATCH
    # the scalars are in the Trainer's log history, once per logged step
    logged = [h for h in trainer.state.log_history if ENERGY_TAG in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert logged[0][ENERGY_TAG] == pytest.approx(first.relative_energy)
    assert logged[-1]["invdefend/gradient/risk/predicted_psnr_max"] == pytest.approx(max(first.predicted_psnr))
    # monitor mode changes nothing; the spectral noise does
    assert len(monitor_cb.records) == 3 and all(r.relative_energy == 0 for r in monitor_cb.records)
    assert torch.equal(_flat(plain.parameters()), _flat(monitored.parameters()))
    diff = _flat(defended.parameters()) - _flat(plain.parameters())
    assert diff.norm() > 1e-4 * _flat(plain.parameters()).norm()


class _ClippedGradientProbe(transformers.TrainerCallback):
    """Records the gradient at ``on_pre_optimizer_step`` before the defense (after the Trainer's clip)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(_flat(p.grad for p in model.parameters()))


def test_noise_lands_after_the_trainers_gradient_clipping(tmp_path, digits):
    clip = 0.05
    probe = _ClippedGradientProbe()
    cb = _callback(budget=0.5)
    _, model, start = _train(tmp_path, digits, [probe, cb], max_steps=1, learning_rate=1.0, max_grad_norm=clip)
    released = _flat(start) - _flat(model.parameters())  # plain SGD, lr 1: the applied gradient
    clipped = probe.grads[0]
    assert clipped.norm().item() == pytest.approx(clip, rel=1e-4)  # the clip was active
    noise = released - clipped
    energy = cb.records[0].relative_energy
    assert energy > 0.1
    assert noise.pow(2).sum().item() == pytest.approx(energy * clip**2, rel=1e-3)


def test_gradient_accumulation_hands_the_full_effective_batch(tmp_path, digits):
    cb = _callback()
    trainer, _, _ = _train(tmp_path, digits, [cb], max_steps=2, gradient_accumulation_steps=2)
    assert trainer.state.global_step == 2 and len(cb.records) == 2
    assert cb.last_batch_size == 2 * BATCH


def test_token_ids_need_embeddings_and_work_through_prepare_inputs(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (64, 6), generator=g)
    data = DictDataset(input_ids=ids, labels=(ids[:, 0] % 2))
    config = DigitsConfig(vocab=20, num_labels=2)

    raw = _callback(input_key="input_ids")
    with pytest.raises(DefenseError, match="token ids"):
        _train(tmp_path / "raw", data, [raw], model_cls=TokenClassifier, config=config, max_steps=1)

    cb = _callback(input_key="input_ids",
                   prepare_inputs=lambda model, x: model.get_input_embeddings()(x),
                   forward_fn=lambda model, e: model(inputs_embeds=e), k=4)
    trainer, _, _ = _train(tmp_path / "embedded", data, [cb], model_cls=TokenClassifier, config=config, max_steps=2)
    assert trainer.state.global_step == 2 and len(cb.records) == 2
    assert all(not r.fallback and r.relative_energy > 0 for r in cb.records)


def test_capture_needs_the_configured_keys(tmp_path, digits):
    cb = _callback(input_key="images")
    with pytest.raises(DefenseError, match="'images'"):
        _train(tmp_path, digits, [cb], max_steps=1)
