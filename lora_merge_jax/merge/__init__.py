"""Merging task LoRAs: PEFT's static combinations (``static``) and the LoraHub coefficient search (``lorahub``)."""
