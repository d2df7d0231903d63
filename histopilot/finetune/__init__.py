"""Fine-tuning recipes, each a YAML file run by ``histopilot finetune KIND --config``.

``vlm`` trains a LoRA adapter for a vision-language role (served by vLLM), ``clip`` tunes the
open_clip patch encoder, ``mil`` trains the triage head, and ``diffusion`` the conditional
tile diffusion model. ``converters`` turns the field's data layouts into the conversation
dataset the ``vlm`` recipe reads; ``recipe`` holds what every recipe shares (loading,
overrides, the run card) and ``memory`` the memory estimate each prints before it starts.
"""
