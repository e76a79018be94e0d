"""The server's one worker thread: requests that arrive while it is busy are answered together."""

from __future__ import annotations

import queue
import threading


class Batcher:
    """One worker thread that runs the model's searches and embeddings; what queued up while it was busy is done
    as one call per kind of job (same k and mode, or same tower), so 16 waiting clients cost about one search.

    Why: each search is a pass over the whole index (memory-bound). Sixteen handler threads each doing their own
    pass, each NumPy call itself threaded, made a 2-core machine 7x slower than one search at a time."""

    MAX_QUERIES = 256  # per combined call: bounds the memory of one pass (queries x index chunk)

    def __init__(self, model):
        self.model = model
        self.jobs: queue.Queue = queue.Queue()
        self.calls = 0  # model calls made: fewer than jobs when requests were combined
        threading.Thread(target=self.work, name="twotower-batcher", daemon=True).start()

    def submit(self, key: tuple, texts: list[str]):
        """Queue a job; returns a concurrent Future of its answer (one item per text)."""
        from concurrent.futures import Future

        done: Future = Future()
        self.jobs.put((key, texts, done))
        return done

    def work(self) -> None:
        while True:
            batch = [self.jobs.get()]
            n = len(batch[0][1])
            while n < self.MAX_QUERIES:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
                n += len(batch[-1][1])
            # a request whose client went away was cancelled: skip it; the rest can no longer be cancelled, so
            # answering them cannot fail (an answer to a cancelled future would raise and end this thread)
            batch = [job for job in batch if job[2].set_running_or_notify_cancel()]
            groups: dict[tuple, list] = {}
            for job in batch:
                groups.setdefault(job[0], []).append(job)
            for key, jobs in groups.items():
                self.answer(key, jobs)

    def answer(self, key: tuple, jobs: list) -> None:
        try:
            out = self.run(key, [t for _, texts, _ in jobs for t in texts])
        except Exception as exc:
            if len(jobs) > 1:  # one job's failure must not fail the others: answer each alone
                for job in jobs:
                    self.answer(key, [job])
                return
            jobs[0][2].set_exception(exc)
            return
        start = 0
        for _, texts, done in jobs:
            done.set_result(out[start:start + len(texts)])
            start += len(texts)

    def run(self, key: tuple, texts: list[str]):
        self.calls += 1
        if key[0] == "search":
            return self.model.search(texts, k=key[1], mode=key[2])
        return self.model.encode_queries(texts) if key[1] == "query" else self.model.encode_documents(texts)
