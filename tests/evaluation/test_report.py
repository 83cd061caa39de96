from florence.evaluation.report import records_to_markdown


def _few_shot_record(seeds: list[int]) -> dict:
    return {
        "model": {"name": "florence-tiny"},
        "dataset": "cifar10",
        "task": "few_shot",
        "config": {"options": {"shots": [4], "seeds": seeds}},
        "metrics": {"4shot_top1_mean": 41.25, "4shot_top1_std": 0.0 if len(seeds) == 1 else 2.5},
    }


def test_few_shot_std_needs_several_seeds():
    one_seed = records_to_markdown([_few_shot_record([0])])
    three_seeds = records_to_markdown([_few_shot_record([0, 1, 2])])

    assert "| 41.2 |" in one_seed
    assert "±" not in one_seed
    assert "| 41.2 ± 2.5 |" in three_seeds
