"""train.mixed_precision=auto: bf16 autocast on a CPU with native bf16 units, fp32 elsewhere; fp32 master weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_utils import train_in_process  # noqa: E402

from medsft import hardware  # noqa: E402
from medsft.runtime import accelerator as acc  # noqa: E402

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.mark.parametrize("text,found", [(ZEN4, ("avx512_bf16",)), (SAPPHIRE, ("amx_bf16", "avx512_bf16")),
                                        (OLD, ())])
def test_native_bf16_units_are_read_from_cpuinfo(tmp_path, text, found):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert hardware.cpu_bf16_flags.__wrapped__(str(path)) == found
    assert hardware.cpu_bf16_flags.__wrapped__(str(tmp_path / "absent")) == ()


@pytest.mark.parametrize("flags,wanted,resolved", [
    (("avx512_bf16",), "auto", "bf16"), ((), "auto", "no"), (("amx_bf16",), "no", "no"), ((), "bf16", "bf16"),
])
def test_auto_picks_bf16_only_where_the_cpu_has_it(compose_config, monkeypatch, flags, wanted, resolved):
    monkeypatch.setattr(acc, "cpu_bf16_flags", lambda: flags)
    cfg = compose_config(f"train.mixed_precision={wanted}")
    assert acc.resolve_mixed_precision(cfg, cpu=True) == resolved
    line = acc.describe_mixed_precision(cfg, cpu=True)
    assert line.startswith("bf16 autocast" if resolved == "bf16" else "fp32")
    if wanted == "auto":
        assert (", ".join(flags) in line) if flags else "no native bf16 units" in line


def test_bf16_autocast_training_on_cpu_keeps_fp32_master_weights(tmp_path):
    """A real tiny run in bf16 autocast: finite falling loss; checkpoints and optimizer state stay fp32."""
    _, run_dir = train_in_process(tmp_path, "train.mixed_precision=bf16", "train.n_epochs=2",
                                  "checkpoint.save_at_epoch_end=false")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    (ckpt,) = sorted((tmp_path / "ckpts" / "tiny").glob("checkpoint-*"))
    from safetensors.torch import load_file

    weights = load_file(ckpt / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
