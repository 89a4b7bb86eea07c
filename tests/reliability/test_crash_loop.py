"""A short crash loop in `make test` (the 100-kill one runs in `make soak`): random SIGKILLs
of real `clipdex index build` / `index add` processes never lose or duplicate an item."""

from __future__ import annotations

from tests.reliability.crash_loop import CrashLoopConfig, crash_loop


def test_random_kills_of_build_and_add_lose_nothing_and_resume_to_exactly_n(tmp_path):
    config = CrashLoopConfig(tmp_path, kills=2, folders=3, images_per_folder=12, shard_size=4,
                             fault_share=0.25, seed=1, kill_window=(0.2, 0.6))
    report = crash_loop(config)
    assert report.violations == []
    assert (report.losses, report.duplicates, report.failed) == (0, 0, 0)
    assert report.killed_at_random_time >= 1 and report.checks == report.runs + 1
    assert report.final_images == report.expected_images == 36
