"""The Flower ClientApp: train one user's LoRA on the emulator and send it back.

Arrives with the federation (issue 4); nothing here yet imports or is imported by anything.
"""
