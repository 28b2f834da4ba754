"""Adapters of invdefend's defenses to training engines, installed as ``invdefend.integrations``.

Each submodule imports its framework lazily and is an optional extra of the package:
``flower`` (Flower client mods), ``ddp`` (torch.distributed communication hook), ``lightning`` (callback),
``huggingface`` (Trainer callback) and ``opacus`` (composition with ``PrivacyEngine``).
"""
