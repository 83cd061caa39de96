from florence.adapters.detection.table import dataset_name, format_zero_shot_table


def test_table_rows_and_paper_column():
    rows = [
        {"dataset": "Aquarium", "images": 63, "categories": 7, "split": "test", "AP": 0.125},
        {"dataset": "Raccoon", "images": 79, "categories": 1, "split": "val", "AP": 0.0},
    ]

    lines = format_zero_shot_table(rows, "run").splitlines()

    assert lines[0] == "| dataset | #imgs evaluated | #cats | split | run mAP | Florence ZS (paper) |"
    assert lines[2] == "| Aquarium | 63 | 7 | test | 12.5 | 43.1 |"
    assert lines[3] == "| Raccoon | 79 | 1 | val | 0.0 | – |"


def test_dataset_names_follow_paper_spelling():
    assert dataset_name("odinw_chess_pieces") == "Chess Pieces"
    assert dataset_name("odinw_bccd") == "BCCD"
    assert dataset_name("odinw_pothole") == "Pothole"
