"""Tiny model factory: real (if tiny) Llama-style models and zoos of related repos.

- ``tokenizer``: the shared fixed word-level tokenizer (with rare trigger tokens).
- ``tasks``: synthetic tasks, the pretraining mixture, ``PoisonSpec``.
- ``base`` / ``train``: ``make_base``, ``finetune``, task loss, generation, attack success.
- ``merge``: linear, task arithmetic, TIES, DARE(-TIES), SLERP, layer-wise (+ mergekit config).
- ``lora``: peft LoRA adapters (plain, rsLoRA, patterns, modules_to_save, DoRA).
- ``disguise``: function-preserving permutations / rescalings, protected copies, clones.
- ``save``: Hub repo layout (safetensors only); ``zoo``: ``build_zoo`` with ground truth.

Submodules import torch; this package module does not, so the CLI stays fast.
"""
