"""The benchmark: the package's training path beside a plain-TensorFlow floor, in one process.

    python -m fedmnist.bench [--workload tutorial|cnn|scale|paper-round|startup ...] [--json FILE]
    (or `fedmnist bench`)

For each workload it runs the package's round loop (`fedmnist.loop.train`) and a floor that performs
the same SGD steps on the same batches in plain TensorFlow (no FL framework), and prints for each:
median steady-state seconds per round (rounds after the first, the evaluating last round excluded),
round-1 seconds, training examples per second, the peak RSS of the whole process tree (this process
and its TFF workers, sampled), and the final training accuracy; then the ratio package/floor and
whether their final accuracies agree. `tutorial` also times the whole default run
(`python -m fedmnist.train`) against the bare TFF tutorial script on the same data, both as fresh
processes; `cnn` also runs the package under one core (affinity) and under all cores. `startup` (opt-in)
times the phases of the default run (imports, data, build, first round, rounds, evaluation, outputs) and
the whole run against the bare script, alternating fresh processes.

Modules: `main` (the command line), `workloads` (what each workload runs; the package's path),
`floor` (the plain-TensorFlow floor), `population` (the `scale` workload's clients), `memory`
(RSS of a process tree), `whole_runs` (fresh processes; `bare_tutorial` is the article's script),
`startup` (`--workload startup`; `startup_run` is the phased default run it starts),
`explore` (TFF's options, `--explore`), `figures` and `report` (the numbers and the printed lines).
"""
