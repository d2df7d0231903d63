"""Fine-tuning recipes.

It will own LoRA supervised fine-tuning of the vision-language backbones, contrastive CLIP
tuning, diffusion training and the multiple-instance triage head.
"""
