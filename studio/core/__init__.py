"""The ground floor: families and key names, the block map, file I/O, LoRA files, base models, peft glue.

Imports nothing of the studio above it. Modules that need torch or diffusers import them themselves;
keys, blocks and io stay light so the command line can answer at once.
"""
