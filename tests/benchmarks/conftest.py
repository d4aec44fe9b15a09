import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test: the benchmarks' tiny tensors run fastest so and are immune to
    contention on shared machines; the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
