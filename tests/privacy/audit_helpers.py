"""Helpers shared by the audit tests."""

import contextlib


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and threads spin badly on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
