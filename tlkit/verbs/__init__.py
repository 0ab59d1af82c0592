"""Verbs: one thin module per command (finetune, evaluate, lr_find, tune, export, predict, distill, prune)."""
