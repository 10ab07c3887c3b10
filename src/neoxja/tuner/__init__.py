"""Fine-tuning: data (:mod:`.data`), the loop (:mod:`.trainer`), LoRA (:mod:`.lora`), checkpoints,
distribution over ``torchrun`` processes; :func:`neoxja.train` (:mod:`.run`) puts them together.

The names below need no torch, so that the command line can offer them as choices cheaply.
"""

# The learning-rate schedules after warm-up, as transformers names them.
SCHEDULES = ("cosine", "linear", "constant")
# The linear layers of GPT-NeoX-Japanese that LoRA may adapt (the same names in transformers).
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
