"""Hyperparameter sweeps on top of Hydra's multirun.

    python launch.py --multirun optimizer.learning_rate=1e-5,5e-6 data.max_seq_len=1024,2048
    python launch.py --multirun hparams_search=lr_optuna                 # Optuna (extra `sweep`)
    python launch.py --multirun hydra/launcher=slurm hydra.launcher.partition=gpu ...   # SLURM (extra `sweep`)
    medsft sweep-report multirun_outputs/<date>/<time>

Modules (optuna and submitit are only needed by their presets, which Hydra imports itself):
    job.py        what runs inside each job: per-job checkpoint folder, final.json, failures recorded
    callbacks.py  the Hydra callback that writes the report at the end of a multirun and sets the exit code
    report.py     the table (report.md, report.csv) and the PNG plots of a sweep folder
"""

import hashlib
import re

from omegaconf import OmegaConf

from medsft.config.secrets import redact

FINAL_FILE = "final.json"
CHECKPOINT_LINK = "checkpoints"
REPORT_FILES = ("report.md", "report.csv", "loss_curves.png")

# A file name may not exceed 255 bytes (the job number and a few characters are added): Optuna trials
# (17-digit floats) with a few constant overrides get there.
MAX_DIRNAME = 200


def job_dirname(override_dirname: str, max_len: int = MAX_DIRNAME) -> str:
    """Hydra's override_dirname made safe as one folder name (the full overrides are always in the job's
    .hydra/overrides.yaml): token-like values redacted, `/` -> `_`; when longer than max_len bytes, long floats are
    shown with 4 significant digits, then keys by their last part (`optimizer.learning_rate` -> `learning_rate`),
    then the name is cut and a hash of the whole appended so it stays unique."""
    def fits(text: str) -> bool:
        return len(text.encode("utf-8")) <= max_len

    name = redact(str(override_dirname)).replace("/", "_")  # a secret never names a folder (config/secrets.py)
    if fits(name):
        return name
    short = re.sub(r"(?<==)-?\d+\.\d{5,}(?:[eE][-+]?\d+)?(?=,|$)", lambda m: f"{float(m.group(0)):.4g}", name)
    if not fits(short):
        short = re.sub(r"(^|,)[+~]*(?:[A-Za-z_][\w-]*[./])+([A-Za-z_][\w-]*)=", r"\1\2=", short)
    if fits(short):
        return short
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
    head = short.encode("utf-8")[: max_len - 12].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"


def register_resolvers() -> None:
    """`${medsft_dirname:${hydra.job.override_dirname}}` in conf/config.yaml's hydra.sweep.subdir."""
    if not OmegaConf.has_resolver("medsft_dirname"):
        OmegaConf.register_new_resolver("medsft_dirname", job_dirname)
