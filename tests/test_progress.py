"""Progress where stderr is a log file: plain lines, not a bar drawn only at the end."""

import io

from rich.console import Console

from attention_lens.cli.render import TokenBar


def test_token_bar_logs_plain_lines_when_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=200)
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0])
    monkeypatch.setattr("attention_lens.cli.render.time.perf_counter", lambda: next(clock))
    with TokenBar(console, "measure") as bar:  # started at 0 s
        bar.update(128, 512)  # 1 s: the first report is logged
        bar.update(256, 512)  # 2 s: too soon after it
        bar.update(384, 512)  # 40 s: logged
        bar.update(512, 512)  # 41 s: the last report always is
    lines = stream.getvalue().splitlines()
    assert lines == ["measure: 128/512 tokens, 128 tok/s, 1 s", "measure: 384/512 tokens, 10 tok/s, 40 s",
                     "measure: 512/512 tokens, 12 tok/s, 41 s"]


def test_a_later_stage_replaces_the_bar_with_its_own_label_and_clock(monkeypatch):
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=200)
    clock = iter([0.0, 10.0, 26.0])
    monkeypatch.setattr("attention_lens.cli.render.time.perf_counter", lambda: next(clock))
    with TokenBar(console, "measured") as bar:
        bar.update(64, 64)  # 10 s: the first stage's last report
        scored = bar.stage("scored")
        scored(32, 64)  # 26 s: the stage's work began where the first stage's ended, 16 s ago
    assert stream.getvalue().splitlines() == ["measured: 64/64 tokens, 6 tok/s, 10 s",
                                             "scored: 32/64 tokens, 2 tok/s, 16 s"]


def test_stages_on_a_terminal_show_one_live_bar_at_a_time():
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with TokenBar(console, "measured") as bar:
        bar.update(10, 20)
        later = bar.stage("scored")
        later(5, 20)  # rich refuses a second live display while one is active: this must not raise
        later(20, 20)
