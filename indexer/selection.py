"""What a folder source leaves out: hidden files and folders (unless asked for), `--exclude`
globs, and the gitignore-style patterns of a `.clipdexignore` file at the source's top.

Patterns match the path relative to the source folder, as git matches them (`raw/`, `*.tmp`,
`**/thumbnails/`), through pathspec, a well-kept parser of that syntax. An excluded folder is
not walked at all, so a large ignored tree costs nothing; each left-out entry is counted once
(a folder counts as one), and reports give the count, not a list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pathspec

IGNORE_FILE = ".clipdexignore"


@dataclass(frozen=True)
class Selection:
    """Which files of a folder source are indexed."""

    exclude: tuple[str, ...] = ()  # gitignore-style patterns, relative to the source folder
    include_hidden: bool = False  # names starting with "." (files and folders)
    hash_files: bool = True  # hash each image's bytes (a sync hashes only what it must)

    def spec(self, folder: Path) -> pathspec.GitIgnoreSpec:
        """The exclude patterns and the folder's own .clipdexignore, as one matcher."""
        lines = list(self.exclude)
        ignore = folder / IGNORE_FILE
        if ignore.is_file():
            lines += ignore.read_text(errors="replace").splitlines()
        return pathspec.GitIgnoreSpec.from_lines(lines)

    def walk(self, folder: Path) -> tuple[list[Path], int]:
        """The files under `folder` this selection keeps, sorted, and how many entries it
        left out."""
        spec, kept, excluded = self.spec(folder), [], 0
        for top, dirs, files in os.walk(folder):
            relative = Path(top).relative_to(folder)
            for name in sorted(dirs):
                if self._leaves_out(spec, (relative / name).as_posix() + "/", name):
                    dirs.remove(name)
                    excluded += 1
            for name in files:
                if name == IGNORE_FILE and top == str(folder):
                    continue
                if self._leaves_out(spec, (relative / name).as_posix(), name):
                    excluded += 1
                else:
                    kept.append(Path(top) / name)
        return sorted(kept), excluded

    def _leaves_out(self, spec: pathspec.GitIgnoreSpec, relative: str, name: str) -> bool:
        return (not self.include_hidden and name.startswith(".")) or spec.match_file(relative)


EVERYTHING_VISIBLE = Selection()
