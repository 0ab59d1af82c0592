"""The engine: run setup shared by the verbs (`setup`) and the ONE stage loop (`loop`).

`finetune`, each `tune` trial, the `distill` student, `prune` and `lr-find` all train through
`loop.run_stages`, passing only what differs (a compile function, extra callbacks, a checkpointer or none).
"""
