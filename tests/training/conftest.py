import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Run training tests on one thread, so results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
