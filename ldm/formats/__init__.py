"""Weight formats: safetensors I/O and component prefixes (``checkpoints``), original single files
and CompVis YAML (``single_file*``, ``compvis``), diffusers folders (``diffusers_folder``), the
key maps between our names and diffusers' (``*_keys``), and LoRA files (``lora``).

Formats use the models; the models never import formats.
"""
