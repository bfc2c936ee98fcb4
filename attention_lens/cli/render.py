"""Human output of `eval` and `specialize` for the CLI: rich tables of the results and a token progress bar."""

from __future__ import annotations

import time
from typing import Callable

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..evaluate import BASELINES, Evaluation
from ..notebook import visible
from ..results import HeadScore
from ..specialize import Specialization

HEADS_SHOWN = 10
"""Best and worst heads listed in the eval table; --json and --out hold every head."""


class TokenBar:
    """A progress bar on stderr, in tokens, that appears with the first report so set-up errors stay one line.
    Where stderr is not a terminal (a log file, CI) a bar would only be drawn at the end: it prints a plain line
    at most every LOG_EVERY seconds, and at the last report, instead."""

    LOG_EVERY = 30.0

    def __init__(self, console: Console, label: str):
        self.console = console
        self.label = label
        self.started = time.perf_counter()
        self.reported = self.started  # when the last report came: a later stage's clock starts there
        self.bar: Progress | None = None
        self.logged: float | None = None

    def update(self, done: int, total: int) -> None:
        self._report(done, total, time.perf_counter())

    def _report(self, done: int, total: int, now: float) -> None:
        self.reported = now
        total = max(total, done)  # work done in whole batches may pass the budget; never show "248/64 tokens"
        if not self.console.is_terminal:
            self._log(done, total, now)
            return
        if self.bar is None:
            self.bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total} tokens"),
                                TextColumn("{task.fields[rate]:.0f} tok/s"), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=self.console)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total, rate=0.0)
        rate = done / max(1e-9, now - self.started)
        self.bar.update(self.task, completed=done, total=total, rate=rate)

    def stage(self, label: str) -> Callable[[int, int], None]:
        """An `update` for a later stage of the same work: at its first report this bar ends and one labelled
        `label`, with its own clock, takes its place (one live display at a time). The stage's clock starts at the
        earlier stage's last report: its own first report comes after some of its work."""
        def update(done: int, total: int) -> None:
            now = time.perf_counter()
            if self.label != label:
                if self.bar is not None:
                    self.bar.stop()
                    self.bar = None
                self.label, self.started, self.logged = label, self.reported, None
            self._report(done, total, now)

        return update

    def _log(self, done: int, total: int, now: float) -> None:
        if done < total and self.logged is not None and now - self.logged < self.LOG_EVERY:
            return
        self.logged = now
        elapsed = now - self.started
        self.console.print(f"{self.label}: {done}/{total} tokens, {done / max(1e-9, elapsed):.0f} tok/s, "
                           f"{elapsed:.0f} s", highlight=False, soft_wrap=True)

    def __enter__(self) -> "TokenBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def print_whole(table: Table) -> None:
    """A terminal gets the table fitted to its width; a file or pipe gets it whole, as wide as its cells need (a
    table cut at 80 columns would hide intervals behind "…")."""
    terminal = Console()
    if terminal.is_terminal:
        terminal.print(table)
        return
    needed = Console(width=10_000).measure(table).maximum
    Console(width=max(needed, 80)).print(table)


def eval_tables(result: Evaluation) -> list[Table]:
    """The summary (lens vs each baseline), then the best and worst heads by KL."""
    s = result.summary
    summary = Table(title=f"{result.setup['lens']} lens on {result.setup['data']} (held-out): {s['tokens']} tokens "
                          f"scored, {s['sink_tokens']} sink positions apart; {s['heads']} heads")
    summary.add_column("scored by")
    summary.add_column("KL mean", justify="right")
    summary.add_column(f"heads it beats by > {result.setup['margin']} nats", justify="right")
    summary.add_row("this lens", _number(s["kl_mean"]), "")
    for name in BASELINES:
        summary.add_row(name, _number(s[f"{name}_kl_mean"]), f"{s[f'frac_beats_{name}']:.0%}")
    summary.caption = (f"median KL {_number(s['kl_median'])}; top-1 agreement {s['top1_mean']:.1%}, top-10 overlap "
                       f"{s['top10_mean']:.1%}; cross-entropy {_number(s['cross_entropy_mean'])} (model "
                       f"{_number(s['model_cross_entropy'])}); lens entropy {_number(s['entropy_mean'])}; "
                       f"sink positions: KL {_number(s['sink_kl_mean'])}, top-1 {_percent(s['sink_top1_mean'])}")
    ranked = sorted(result.heads, key=lambda h: h.kl)
    tables = [summary, _heads_table("best heads", ranked[:HEADS_SHOWN])]
    if len(ranked) > HEADS_SHOWN:
        tables.append(_heads_table("worst heads", ranked[::-1][:min(HEADS_SHOWN, len(ranked) - HEADS_SHOWN)]))
    return tables


def _heads_table(title: str, heads: list[HeadScore]) -> Table:
    table = Table(title=f"{title}: KL ± half its 95% interval, each baseline's KL (* beaten by the margin)",
                  box=box.SIMPLE_HEAD)
    for name in ("layer", "head", "KL", "logit", "dla", "constant", "top-1", "top token"):
        table.add_column(name, justify="left" if name == "top token" else "right", no_wrap=True)
    for h in heads:
        spread = "" if h.kl_low is None else f"±{(h.kl_high - h.kl_low) / 2:.3f}"
        baselines = [_number(h.baselines[n].kl) + ("*" if h.baselines[n].beats else "")
                     for n in ("logit", "dla", "constant")]
        table.add_row(str(h.layer), str(h.head), f"{_number(h.kl)}{spread}", *baselines,
                      _percent(h.top1), f"{visible(h.top_token.token)} {h.top_token.share:.0%}")
    return table


def specialize_tables(result: Specialization, compare_layers: bool) -> list[Table]:
    """The most specialized heads, the groups of similar heads, and (optionally) specialization by layer."""
    s = result.summary
    heads = Table(title=f"most specialized heads of {s['heads']} ({result.setup['lens']} lens, {s['positions']} "
                        f"positions): entropy of the promoted-token histogram (bits; 0 = one token)")
    for name in ("layer", "head", "entropy", f"top-{result.setup['top']} mass", "promoted tokens", "description"):
        heads.add_column(name, justify="right" if name in ("layer", "head", "entropy") else "left")
    for h in s["most_specialized"]:
        heads.add_row(str(h["layer"]), str(h["head"]), f"{h['entropy_bits']:.2f}", f"{h['top_mass']:.0%}",
                      " ".join(visible(t) for t in h["tokens"]), h["description"])
    tables = [heads]
    if result.groups:
        groups = Table(title=f"{s['groups']} groups of heads with similar promoted tokens (average Jaccard)")
        for name in ("group", "heads", "similarity", "shared tokens"):
            groups.add_column(name)
        for g in result.groups:
            groups.add_row(str(g["id"]), " ".join(f"{m['layer']}.{m['head']}" for m in g["heads"]),
                           f"{g['similarity']:.2f}", " ".join(visible(t) for t in g["shared_tokens"]))
        tables.append(groups)
    if compare_layers:
        layers = Table(title="specialization by depth")
        for name in ("layer", "heads", "entropy (bits)", "top mass", "described", "Jaccard within layer"):
            layers.add_column(name, justify="right")
        for row in result.layers:
            within = "" if row["jaccard_within"] is None else f"{row['jaccard_within']:.2f}"
            layers.add_row(str(row["layer"]), str(row["heads"]), f"{row['entropy_bits_mean']:.2f}",
                           f"{row['top_mass_mean']:.0%}", f"{row['described']:.0%}", within)
        tables.append(layers)
    return tables


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def effect_table(document: dict) -> Table:
    """Effect fidelity: median share of the measured effect each reading recovers, over all heads and over the 10%
    with the largest effect, and how often this lens beats dla there."""
    s = document["summary"]
    table = Table(title=f"effect fidelity ({document['effects']['mode']} ablation, {document['effects']['tokens']} "
                        "positions): share of each head's measured effect its reading recovers")
    for name in ("reading", "recovered, median", "top-10% heads", "top-10 agreement (top-10%)"):
        table.add_column(name, justify="left" if name == "reading" else "right")
    table.add_row("this lens", _number(s.get("effect_recovered_median")),
                  _number(s.get("effect_recovered_median_top10pct")), _number(s.get("top10_agreement_median_top10pct")))
    names = sorted({key[:-len("_effect_recovered_median")] for key in s if key.endswith("_effect_recovered_median")})
    for name in names:
        table.add_row(name, _number(s.get(f"{name}_effect_recovered_median")),
                      _number(s.get(f"{name}_effect_recovered_median_top10pct")),
                      _number(s.get(f"{name}_top10_agreement_median_top10pct")))
    if "ceiling_recovered_median" in s:
        table.add_row("linear ceiling (in hindsight)", _number(s["ceiling_recovered_median"]),
                      _number(s.get("ceiling_recovered_median_top10pct")), "")
    table.caption = (f"this lens beats dla (interval of the difference above 0) on "
                     f"{_percent(s.get('frac_beats_dla_effect_top10pct'))} of the top-10% heads "
                     f"({', '.join(s['effect_top10pct_heads'][:8])}, ...); median ratio to the ceiling there: "
                     f"{_number(s.get('ceiling_ratio_median_top10pct'))}")
    return table
