"""The slowest tests (torchrun runs and long in-process runs, 10-90 s each) are collected first, so that under `pytest -n auto`
no worker starts one of them while the other has nothing left to run (longest first: the suite's wall time drops)."""

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
