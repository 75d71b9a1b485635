"""What a run leaves behind, one small piece each, behind one sink (`sink.RunOutputs`):

- `records`: `RoundRecord`, the round as one typed record; `metrics_log`: `metrics.jsonl` and `summary.json`;
- `tensorboard`: event files; `checkpoint`: server state (`tff.program.FileProgramStateManager`);
- `console`: the printed lines; `plots`: `curves.png`; `report`: `python -m fedmnist.report`;
- `dashboard`: a TensorBoard server for `--tensorboard`.
"""
