"""Packaging metadata: the license file matches what pyproject.toml declares, the supported
Pythons are listed, and the image build has every file the wheel needs. (.ci/run builds the
sdist and wheel and runs `twine check` on them.)"""

from __future__ import annotations

import re
import tomllib
from typing import Any
from urllib.parse import urlsplit

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


# Reserved for examples and tests (RFC 2606, RFC 6761): a link there points nowhere.
_PLACEHOLDER = re.compile(r"(^|\.)(example(\.(com|net|org))?|invalid|test|localhost)$")


def test_the_project_lists_no_url_that_points_nowhere() -> None:
    """A package index shows project URLs as the project's own links: none may be a
    placeholder. (There is no public home yet, so there are none; once there is, every
    link must be on one host.)"""
    urls: dict[str, str] = project().get("urls", {})
    for label, url in urls.items():
        host = urlsplit(url).hostname or ""
        assert url.startswith("https://") and not _PLACEHOLDER.search(host), (label, url)
    assert len({urlsplit(url).hostname for url in urls.values()}) <= 1


def test_the_placeholder_rule_knows_a_placeholder() -> None:
    assert _PLACEHOLDER.search("git.example.com")
    assert _PLACEHOLDER.search("example.org")
    assert not _PLACEHOLDER.search("github.com")
    assert not _PLACEHOLDER.search("example.company.com")


def test_the_image_build_copies_every_file_the_wheel_needs() -> None:
    copied = " ".join(
        re.findall(r"^COPY (?!--from)(.*) \./$", (ROOT / "Dockerfile").read_text(), re.M)
    )
    for needed in ["pyproject.toml", project()["readme"], *project()["license-files"]]:
        assert needed in copied.split(), needed
