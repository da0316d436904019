"""``bft status``: a run's progress (:mod:`snapshot`) as text."""

from __future__ import annotations

from bft.progress.snapshot import RunProgress
from bft.progress.view import duration, headline
from bft.stages import ORDER


def format_status(p: RunProgress) -> str:
    lines = [f"run {p.run_uri}: {p.state} ({p.detail})", headline(p),
             f"{'stage':<10}{'done':>10}{'kept':>10}{'dropped':>9}{'tokens':>12}  drop reasons"]
    for name in ORDER:
        s = p.stages[name]
        done = f"{p.files_read}/{p.files_total if p.files_total is not None else '?'}f" if name == "read" \
            else str(s.done)
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(s.dropped.items()))
        lines.append(f"{name:<10}{done:>10}{s.out:>10}{sum(s.dropped.values()):>9}"
                     f"{(str(s.tokens) if s.tokens else ''):>12}  {reasons}")
    rate = f"{p.rows_per_s:.2f} rows/s" if p.rows_per_s else "no rows finished yet"
    lines.append(f"throughput: {rate}" + (f", {p.tokens_per_s:,.1f} tokens/s" if p.tokens_per_s else "")
                 + f" over {duration(p.elapsed_s)}")
    if p.state == "running":
        estimate = "" if p.files_total is not None and p.files_read == p.files_total else \
            " (estimated from the input files read so far)"
        lines.append(f"ETA: {duration(p.eta_s)}{estimate}")
    return "\n".join(lines)
