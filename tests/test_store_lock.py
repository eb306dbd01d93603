"""One download per machine: processes sharing the cache (the ranks of a training pod) fetch an artefact once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from spin_core.store import LocalBackend, Store


class RemoteLike(LocalBackend):
    """A file backend that pretends to be remote (no local path: fetch downloads) and counts slow downloads."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.downloads: list[str] = []
        self.guard = threading.Lock()

    def local_path(self, key: str) -> None:
        return None

    def get_file(self, key: str, path: Path, size: int | None = None) -> None:
        with self.guard:
            self.downloads.append(key)
        time.sleep(0.3)  # long enough for every other fetcher to arrive while this one downloads
        super().get_file(key, path, size)


def test_concurrent_fetches_download_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIN_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "model"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        (source / name).write_bytes(name.encode() * 1000)
    backend = RemoteLike(tmp_path / "store")
    store = Store(backend)
    store.publish("iter-1/checkpoint", source)
    results: list[Path] = []

    def fetch() -> None:
        results.append(store.fetch("iter-1/checkpoint"))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(backend.downloads) == 2  # each file once, not once per fetcher
    assert (results[0] / "model.safetensors").read_bytes() == b"model.safetensors" * 1000
