"""The slowest tests (torchrun runs and long in-process runs, 10-90 s each) are collected first, so that under `pytest -n auto`
no worker starts one of them while the other has nothing left to run (longest first: the suite's wall time drops)."""

SLOW_FIRST = (
    "test_torchrun_two_processes",
    "test_two_processes_equal_one",
    "test_every_flag_changes_the_run",
    "test_p8_p9_stage1_cache_and_world_size",
    "test_p10_sigterm_in_stage1",
    "test_t16_reward_placement_converges",
    "test_q12_dataset_is_independent_of_world_size",
    "test_t18_reward_to_go",
    "test_kill_then_resume_equals_uninterrupted_run",
    "test_torchrun_one_run_name_and_one_stop_line",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, name in enumerate(SLOW_FIRST):
            if item.name.startswith(name):
                return i
        return len(SLOW_FIRST)

    items.sort(key=rank)  # (a stable sort: the rest keep their order)
