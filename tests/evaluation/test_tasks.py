from pathlib import Path

from florence.data import ClassificationDataset
from florence.evaluation.tasks import subset_indices

DATA = Path(__file__).resolve().parents[2] / "data" / "cifar10_quickstart"


def test_subset_indices_cover_every_class():
    dataset = ClassificationDataset(DATA / "test", None, classes_file=DATA / "classes.txt")

    indices = subset_indices(len(dataset), 200)
    classes = {dataset.targets[index] for index in indices}

    assert len(indices) == 200
    assert len(set(indices)) == 200
    assert indices == sorted(indices)
    assert classes == set(range(10))


def test_subset_indices_repeat_for_a_seed():
    assert subset_indices(1000, 10, seed=3) == subset_indices(1000, 10, seed=3)
    assert subset_indices(1000, 10, seed=3) != subset_indices(1000, 10, seed=4)
