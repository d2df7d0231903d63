"""Fine-tuning recipes.

``diffusion`` trains the conditional tile diffusion model. LoRA supervised fine-tuning of the
vision-language backbones, contrastive CLIP tuning and the multiple-instance triage head will
join it.
"""
