"""Packaging metadata: the license file matches what pyproject.toml declares, the supported
Pythons are listed, and the image build has every file the wheel needs. (.ci/run builds the
sdist and wheel and runs `twine check` on them.)"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from deploy_support import DEPLOY

ROOT = DEPLOY.parent


def project() -> dict[str, Any]:
    loaded: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return loaded


def test_the_license_file_matches_the_declared_license() -> None:
    assert project()["license"] == "MIT"
    assert project()["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text
    # PEP 639: with a license expression, License :: classifiers are an error.
    assert not any(c.startswith("License ::") for c in project()["classifiers"])


def test_the_classifiers_list_every_supported_python() -> None:
    assert project()["requires-python"] == ">=3.11"
    versions = {
        c.rsplit(" ", 1)[1]
        for c in project()["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert versions == {"3.11", "3.12", "3.13"}


def test_the_project_urls_point_at_its_home() -> None:
    urls = project()["urls"]
    assert set(urls) >= {"Homepage", "Documentation", "Issues"}
    home = urls["Homepage"]
    assert all(url.startswith(home) for url in urls.values())


def test_the_image_build_copies_every_file_the_wheel_needs() -> None:
    copied = " ".join(
        re.findall(r"^COPY (?!--from)(.*) \./$", (ROOT / "Dockerfile").read_text(), re.M)
    )
    for needed in ["pyproject.toml", project()["readme"], *project()["license-files"]]:
        assert needed in copied.split(), needed
