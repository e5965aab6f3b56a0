"""tests/fixtures is complete and unchanged: SHA256SUMS lists exactly the files there (bar itself
and README.md), each matches its recorded sha256, and each agrees with its folder's original MANIFEST."""
import hashlib
import json

import pytest

from conftest import FIXTURES

UNLISTED = {"README.md", "SHA256SUMS"}


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def listed(fixtures_dir) -> dict[str, str]:
    """SHA256SUMS as {relative path: sha256}; `sha256sum` format, text mode (two spaces)."""
    entries = {}
    for line in (fixtures_dir / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert name not in entries, f"{name} listed twice"
        entries[name] = digest
    return entries


def test_fixtures_dir_is_inside_the_checkout(fixtures_dir):
    assert fixtures_dir == FIXTURES and fixtures_dir.parent.name == "tests"


def test_every_listed_file_exists_and_matches(fixtures_dir, listed):
    assert listed
    missing = [name for name in listed if not (fixtures_dir / name).is_file()]
    assert not missing, f"listed in SHA256SUMS but missing from {fixtures_dir}: {missing}"
    changed = [name for name, digest in listed.items() if sha256(fixtures_dir / name) != digest]
    assert not changed, f"sha256 differs from SHA256SUMS: {changed}"


def test_every_file_is_listed(fixtures_dir, listed):
    present = {p.relative_to(fixtures_dir).as_posix() for p in fixtures_dir.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(listed) - UNLISTED)
    assert not unlisted, f"files in {fixtures_dir} not in SHA256SUMS (add them): {unlisted}"


def test_copies_match_the_original_manifests(fixtures_dir, listed):
    """Each copied data file has the size and sha256 the original folder's MANIFEST.json records."""
    checked = 0
    for manifest in sorted(fixtures_dir.glob("*/MANIFEST.json")):
        files = json.loads(manifest.read_text())["files"]
        records = files.items() if isinstance(files, dict) else ((f["file"], f) for f in files)
        for name, record in records:
            path = manifest.parent / name
            if not path.exists():
                continue  # not every original file was copied (see README.md)
            assert path.stat().st_size == record["bytes"], name
            assert listed[path.relative_to(fixtures_dir).as_posix()] == record["sha256"], name
            checked += 1
    assert checked == len(listed) - len(list(fixtures_dir.glob("*/MANIFEST.json")))
