"""Writer threads behind a bounded queue: the producer (extraction's forward pass, a reduction's arithmetic) encodes
samples and goes on while the threads write and fsync their shards. Shards of different images are independent
files, so the threads never contend for one."""

from __future__ import annotations

import queue
import threading
from typing import Any

from biomass_cache.store.handle import EncodedSample, TokenStore


THREADS = 2  # shards of different images are independent files: two writers keep up with a fast GPU


class Writer:
    """Writer threads, each behind its own bounded queue. The samples of one image always go to the same thread, so
    two views written apart never rewrite their shared shard file at once. A failure is kept and re-raised in the
    main thread; after one, the threads keep draining (without writing) so the producer never blocks."""

    def __init__(self, store: TokenStore, max_jobs: int, n_threads: int = THREADS):
        self.store, self.error = store, None
        self.queues: list[queue.Queue] = [queue.Queue(max(1, max_jobs // n_threads)) for _ in range(n_threads)]
        self.threads = [threading.Thread(target=self._run, args=(q,), daemon=True, name=f"store-writer-{k}")
                        for k, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    def _run(self, jobs: queue.Queue) -> None:
        while (job := jobs.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_encoded(job.ready())  # waits for a sample still on its way to the host
                except BaseException as e:  # re-raised by the main thread
                    self.error = e
            job.done()

    def put(self, sample: EncodedSample | Any) -> None:
        """Queue a sample (or a job whose `ready()` gives one, extract/transfer.py) for its image's thread."""
        self.check()
        self.queues[sample.index % len(self.queues)].put(sample)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued writes finish (they are complete images), then stop the threads."""
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
