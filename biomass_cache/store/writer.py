"""Writer threads behind a bounded queue: the producer (extraction's forward pass, a reduction's arithmetic) encodes
samples and goes on while the threads write and fsync their shards. Shards of different images are independent
files, so the threads never contend for one."""

from __future__ import annotations

import queue
import threading

from biomass_cache.store.handle import EncodedSample, TokenStore


class Writer:
    """Writer threads behind a bounded queue. A failure is kept and re-raised in the main thread; after one, the
    threads keep draining (without writing) so the producer never blocks on a full queue."""

    def __init__(self, store: TokenStore, n_threads: int, max_jobs: int):
        self.store, self.error = store, None
        self.jobs: queue.Queue = queue.Queue(max_jobs)
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"store-writer-{k}")
                        for k in range(n_threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_encoded(job)
                except BaseException as e:  # re-raised by the main thread
                    self.error = e

    def put(self, sample: EncodedSample) -> None:
        self.check()
        self.jobs.put(sample)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued writes finish (they are complete images), then stop the threads."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
