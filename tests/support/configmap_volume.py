"""A folder laid out and updated the way the kubelet mounts a ConfigMap (no subPath).

The kubelet writes every key into a new timestamped folder, points a ``..data_tmp`` symlink at
it and renames that over ``..data`` (one atomic step), then removes the old folder; each key is a
symlink ``<key> -> ..data/<key>``. A reader of ``<key>`` sees the old content or the new one,
never half of either, and the file's inode changes on every update.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._updates = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def write(self, files: Mapping[str, str | bytes]) -> None:
        """Publish ``files`` as the volume's whole content, as one atomic swap."""
        self._updates += 1
        folder = self.root / f"..2026_01_01_00_00_{self._updates:02d}.{os.getpid()}"
        folder.mkdir()
        for key, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (folder / key).write_bytes(data)
        data_link = self.root / "..data"
        old = data_link.resolve() if data_link.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.replace(tmp, data_link)  # the swap: readers see the old folder or the new one
        for key in files:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        for key in os.listdir(self.root):  # keys gone from the ConfigMap lose their link
            link = self.root / key
            if not key.startswith("..") and link.is_symlink() and key not in files:
                link.unlink()
        if old is not None and old != folder.resolve():
            shutil.rmtree(old)

    def unlink(self, key: str) -> None:
        """Make ``key`` vanish for a moment (as between a volume's unmount and remount)."""
        self.path(key).unlink()
