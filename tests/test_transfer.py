"""The device-to-host path of extraction (extract/transfer.py) on the CPU: a sample sent and made ready is exactly
what `TokenStore.encode` gives, for every storage dtype and with prefix tokens; the checks that used to stop the
loop (non-finite tokens naming the image, float16 overflow) are raised where the writer thread takes the sample,
and a writer that meets one writes nothing of it. (The CUDA side stream and pinned buffers need a GPU: not run here.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biomass_cache.backbone.precision import finite_rows, non_finite_error
from biomass_cache.common.errors import NonFiniteError, StoreError
from biomass_cache.extract.transfer import InFlight, PinnedPool, Transfer
from biomass_cache.store.layout import create_store
from biomass_cache.store.writer import Writer
from toys import store_spec, store_tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_a_sent_sample_is_what_encode_gives(tmp_path, dtype):
    store = create_store(tmp_path / "s.zarr", store_spec(dtype=dtype, n_prefix=2))
    tokens = torch.from_numpy(store_tokens(2, seed=1))
    prefix = torch.randn(2, 3, 2, 16)
    sent = Transfer(torch.device("cpu")).send(store, 1, slice(None), tokens, prefix).ready()
    expected = store.encode(1, slice(None), tokens, prefix)
    assert (sent.index, sent.views) == (expected.index, expected.views) and len(sent.parts) == 2
    for (name, values, scales), (name2, values2, scales2) in zip(sent.parts, expected.parts):
        assert name == name2 and values.dtype == values2.dtype and np.array_equal(values, values2)
        assert (scales is None) == (scales2 is None) and (scales is None or np.array_equal(scales, scales2))


def test_the_checks_are_raised_by_the_writer_thread(tmp_path):
    store = create_store(tmp_path / "s.zarr", store_spec())
    transfer = Transfer(torch.device("cpu"))
    tokens = torch.from_numpy(store_tokens(2))
    bad = tokens.clone()
    bad[1, 2, 0, 0] = float("nan")  # view 1, third cached block (layer 7)
    on_bad = lambda f: non_finite_error(f, ["ID2"], [2], [2, 5, 7], "bf16")  # noqa: E731
    writer = Writer(store, 4)
    writer.put(transfer.send(store, 0, slice(None), tokens, None, finite_rows(tokens, tokens[..., :0]), on_bad))
    writer.put(transfer.send(store, 2, slice(None), bad, None, finite_rows(bad, bad[..., :0]), on_bad))
    writer.close()
    with pytest.raises(NonFiniteError, match=r"image 'ID2' at cached block 7 .*nothing of this image was written"):
        writer.check()
    assert store.done()[2].sum() == 0  # the bad image: nothing
    huge = transfer.send(store, 1, 0, torch.full((1, 3, 12, 16), 1e6), None)
    with pytest.raises(StoreError, match=r"tokens of image 'ID1' .*beyond the float16 range; use --dtype bfloat16"):
        huge.ready()


def test_pinned_buffers_are_reused_after_the_writer_is_done():
    pool = PinnedPool()
    pool.pinned = 1
    buffer = torch.zeros(3, 4)
    pool.give([buffer])  # as a writer thread's `done` does
    assert pool.take(torch.empty(3, 4)) is buffer and pool.pinned == 1
    sample = InFlight(0, 0, [], [], torch.ones(0, 2, dtype=torch.bool), None, "float16", "x", lambda f: None,
                      pool=pool, buffers=[buffer])
    sample.done()
    assert pool.free[((3, 4), torch.float32)] == [buffer] and sample.buffers == []
