"""Write an evaluation run: predictions.jsonl, summary.json and summary.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

from medsft.eval.compat import COMPAT_LABEL


def append_predictions(path: Path, predictions: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion of `k` successes in `n` trials (z=1.96: 95%).

        centre = (p + z²/2n) / (1 + z²/n),  half-width = z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n),  p = k/n

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at
    0/n or n/n: 0/10 -> (0, 0.2775), 5/10 -> (0.2366, 0.7634), 50/100 -> (0.4038, 0.5962). n = 0 (no
    questions) -> (0, 1): nothing is known.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci95(n_correct: int, n: int) -> list[float]:
    """The 95% Wilson interval of an accuracy, as summary.json stores it: [lo, hi], 4 decimals."""
    lo, hi = wilson_interval(int(n_correct), int(n))
    return [round(lo, 4), round(hi, 4)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _acc(m: dict) -> str:
    """'12.0% [7.0, 19.8]': the accuracy and its 95% Wilson interval, in % (computed from n_correct and n
    for a summary written before the interval was stored)."""
    ci = m.get("accuracy_ci95")
    if ci is None and "n_correct" in m and m.get("n"):
        ci = accuracy_ci95(m["n_correct"], m["n"])
    text = _pct(m.get("accuracy"))
    return text if ci is None else f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _skipped(s: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in s.items() if v) or "-"


def decoding_label(gen: dict) -> str:
    """'greedy' / 'sampling (T=.., top_p=..)', plus the repetition penalty when there is one."""
    label = f"sampling (T={gen.get('temperature')}, top_p={gen.get('top_p')})" if gen.get("do_sample") else "greedy"
    penalty = gen.get("repetition_penalty", 1.0)
    return label if penalty in (None, 1.0) else f"{label}, repetition penalty {penalty}"


def render_markdown(summary: dict) -> str:
    """A human-readable table of summary.json."""
    lines = [f"# medsft eval: {summary.get('model', {}).get('label', '?')}", ""]
    model = summary.get("model", {})
    gen = summary.get("generation", {})
    lines.append(
        f"model `{model.get('path')}` · backend {gen.get('backend')} · "
        f"{decoding_label(gen)}"
        f" · max_new_tokens {gen.get('max_new_tokens')} · {summary.get('created', '')}"
    )
    lines += [
        "",
        "Accuracy = answers whose extracted option equals the gold one / questions; an answer naming no option "
        "(UNPARSED) counts as wrong; [lo, hi] = its 95% Wilson score interval (%). "
        "Format = `## Thinking` and `## Final Response` once each, in order, both non-empty.",
        "",
        "| benchmark | n | accuracy | unparsed | format compliance | mean chars | mean tokens | truncated | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    benches = summary.get("benchmarks", {})
    for name, m in benches.items():
        lines.append(
            f"| {name} | {m['n']} | {_acc(m)} | {_pct(m['unparsed_rate'])} ({m['unparsed']}) | "
            f"{_pct(m['format_compliance'])} | {m['mean_output_chars']:.0f} | "
            f"{m.get('mean_output_tokens', 0):.0f} | {_pct(m.get('truncated_rate'))} | {_skipped(m.get('skipped', {}))} |"
        )
    overall = summary.get("overall")
    if overall and len(benches) > 1:
        lines.append(
            f"| **all (micro)** | {overall['n']} | {_acc(overall)} | {_pct(overall['unparsed_rate'])} | "
            f"{_pct(overall['format_compliance'])} | {overall['mean_output_chars']:.0f} | "
            f"{overall.get('mean_output_tokens', 0):.0f} | {_pct(overall.get('truncated_rate'))} | |"
        )
    if any("compat_huatuo" in m for m in benches.values()):
        lines += [
            "",
            f"## {COMPAT_LABEL}",
            "",
            "HuatuoGPT-o1's own scorer, for comparison with the paper only: max(first-letter, last-letter) accuracy "
            "over the benchmark, an answer forced by string similarity when none is found, empty outputs dropped, "
            "and a loose letter regex (reads option I from \"I think\"). Not an accuracy of what the model answered.",
            "",
            "| benchmark | scored | dropped empty | compat accuracy | head | tail | honest accuracy | difference |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in benches.items():
            c = m.get("compat_huatuo")
            if not c:
                continue
            lines.append(
                f"| {name} | {c['n_scored']} | {c['n_dropped_empty']} | {_pct(c['accuracy'])} | {_pct(c['head'])} | "
                f"{_pct(c['tail'])} | {_acc(m)} | {100 * (c['accuracy'] - m['accuracy']):+.1f} pt |"
            )
    notes = [(name, n) for name, m in benches.items() for n in m.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {n}" for name, n in notes]
    lines.append("")
    return "\n".join(lines)


def write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(render_markdown(summary), encoding="utf-8")
