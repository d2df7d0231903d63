"""Similar-tissue and knowledge search.

It will own patch encoders (open_clip, Hugging Face, timm and an offline encoder), FAISS patch
and slide indexes with their metadata, and the knowledge-base index.
"""
