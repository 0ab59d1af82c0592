"""The engine: everything that runs a model, shared by the verbs.

`setup` (one run setup for every verb), `loop` (the ONE stage loop), `run` (a whole fine-tuning run), `features`
(the frozen backbone's features, computed once), `resume` (checkpoints and `--resume`), `lr_range` (the learning-rate
finder), `metrics` and `plots` (what a run reports), `predictors` (`tlkit.load` for every export format), `adapt`
(what `strategy: auto` and `augment: auto` decide from the validation split).

`finetune`, each `tune` trial, the `distill` student, `prune` and `lr-find` all train through `loop.run_stages`,
passing only what differs (a compile function, extra callbacks, a checkpointer or none).
"""
