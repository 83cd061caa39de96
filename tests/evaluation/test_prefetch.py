import threading

import pytest

from florence.evaluation._common import prefetch


def test_prefetch_keeps_order_in_thread():
    reader_threads = []

    def batches():
        for index in range(5):
            reader_threads.append(threading.current_thread().name)
            yield index

    assert list(prefetch(batches())) == [0, 1, 2, 3, 4]
    assert all(name.startswith("florence-prefetch") for name in reader_threads)


def test_prefetch_reads_one_batch_ahead():
    read = []

    def batches():
        for index in range(4):
            read.append(index)
            yield index

    iterator = prefetch(batches())
    first = next(iterator)
    iterator.close()

    assert first == 0
    assert read == [0, 1]


def test_prefetch_raises_read_error_in_order():
    def batches():
        yield 0
        raise OSError("truncated image: cifar10/test/00042.png")

    iterator = prefetch(batches())

    assert next(iterator) == 0
    with pytest.raises(OSError, match="00042.png"):
        next(iterator)


def test_prefetch_of_an_empty_iterable_yields_nothing():
    assert list(prefetch([])) == []
