"""`edgemoe tune`: which expert budget, policy and prefetch setting run fastest on this machine
under a memory cap (docs/TUNE.md).

    sweep.py       the sweep: trace, replay every setting, predict, confirm the best for real
    cost_model.py  memory plan, cost model, recommendation rule (pure)
    runs.py        one measured run in a fresh process
    machine.py     the machine probe (cores, RAM, GPUs, read speeds)
    profile.py     profile.yaml, read by generate/chat/serve --profile
    report.py, plot.py   tables, summary, PNG and terminal plots
"""
