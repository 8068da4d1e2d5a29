"""Hyperparameter sweeps on top of Hydra's multirun.

    python launch.py --multirun optimizer.learning_rate=1e-5,5e-6 data.max_seq_len=1024,2048
    python launch.py --multirun hparams_search=lr_optuna                 # Optuna (extra `sweep`)
    python launch.py --multirun hydra/launcher=slurm hydra.launcher.partition=gpu ...   # SLURM (extra `sweep`)
    medsft sweep-report multirun_outputs/<date>/<time>

Modules (all imports lazy; optuna and submitit are only needed by their presets):
    job.py        what runs inside each job: per-job checkpoint folder, final.json, failures recorded
    callbacks.py  the Hydra callback that writes the report at the end of a multirun and sets the exit code
    report.py     the table (report.md, report.csv) and the PNG plots of a sweep folder
"""

FINAL_FILE = "final.json"
CHECKPOINT_LINK = "checkpoints"
REPORT_FILES = ("report.md", "report.csv", "loss_curves.png")
