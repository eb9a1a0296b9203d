"""Interoperability with Hugging Face transformers' GPT-2."""

from .hf import from_hf_state_dict, load_hf_dir, model_config_from_hf, save_hf_dir, to_hf_config, to_hf_state_dict

__all__ = [
    "to_hf_config",
    "model_config_from_hf",
    "to_hf_state_dict",
    "from_hf_state_dict",
    "save_hf_dir",
    "load_hf_dir",
]
