"""The slowest tests (torchrun runs and long in-process runs, 10-90 s each) are collected first, and pytest-xdist hands
out tests one or two at a time (--maxschedchunk 1), so that under `pytest -n auto` the longest start first, spread over
the workers, and no worker idles while another still has a queue (by default xdist gives each worker a block of a
quarter of its share of CONSECUTIVE tests at once: the slow tests, collected first, all went to one worker, which ran
them one after another while the other finished the rest and waited, 100 s and more)."""

SLOW_FIRST = (
    "test_torchrun_two_processes",
    "test_two_processes_equal_one",
    "test_every_flag_changes_the_run",
    "test_p8_p9_stage1_cache_and_world_size",
    "test_q12_dataset_is_independent_of_world_size",
    "test_kill_then_resume_equals_uninterrupted_run",
    "test_torchrun_one_run_name_and_one_stop_line",
    "test_gpu_check_runs_on_cpu",
    "test_p10_sigterm_in_stage1",
    "test_script_reports_a_tokenizer_mismatch_in_one_line",
    "test_q5_labels_are_unbiased_under_guided_roll_in",
    "test_ctrl_c",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, name in enumerate(SLOW_FIRST):
            if item.name.startswith(name):
                return i
        return len(SLOW_FIRST)

    items.sort(key=rank)  # (a stable sort: the rest keep their order)


def pytest_configure(config):
    xdist_default = getattr(config.option, "maxschedchunk", "absent") is None  # (installed, not set by the caller)
    if xdist_default:
        config.option.maxschedchunk = 1
