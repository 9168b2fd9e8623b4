"""MkDocs hooks (``hooks:`` in mkdocs.yml): publishing settings and the navigation file.

One setting says where the site is published: ``ATC_REPOSITORY``, the GitHub
repository (``https://github.com/<org>/<repo>``), read into ``extra.repository``.
From it come

- ``site_url``: the repository's GitHub Pages address, ``https://<org>.github.io/<repo>/``,
  unless ``SITE_URL`` is set (a custom domain). Canonical links, the sitemap and
  the feed's absolute links use it.
- ``extra.edit_base``: ``<repo>/edit/main/``, so "Edit this page" on a paper page
  opens ``catalog/papers/<id>.yaml`` in GitHub's editor.

Without ``ATC_REPOSITORY`` (and ``SITE_URL``) the site is built with no absolute
address rather than a wrong one: no canonical links, relative links in the feed,
and "Edit this page" opens the copy of the entry shipped with the site.

This file is loaded by MkDocs on its own, so it imports nothing from ``tools``.
"""

from __future__ import annotations

import re

from mkdocs.exceptions import ConfigurationError
from mkdocs.plugins import event_priority

GITHUB_REPOSITORY = re.compile(
    r"^https://github\.com/([A-Za-z0-9-]+)/([A-Za-z0-9._-]+?)(\.git)?/?$"
)
BRANCH = "main"
NAV_FILE = "SUMMARY.md"


def github_pages_url(repository: str) -> str:
    """``https://github.com/Org/repo`` -> ``https://org.github.io/repo/``."""
    owner, name = parse_repository(repository)
    host = f"{owner.lower()}.github.io"
    return f"https://{host}/" if name.lower() == host else f"https://{host}/{name}/"


def parse_repository(repository: str) -> tuple[str, str]:
    match = GITHUB_REPOSITORY.match(repository)
    if not match:
        raise ConfigurationError(
            f"ATC_REPOSITORY={repository!r}: expected a GitHub repository URL, "
            "https://github.com/<org>/<repo>"
        )
    return match.group(1), match.group(2)


def on_config(config):
    repository = (config.extra.get("repository") or "").strip()
    if not repository:
        config.extra["repository"] = ""
        config.extra["edit_base"] = ""
        return config
    owner, name = parse_repository(repository)
    repository = f"https://github.com/{owner}/{name}"
    config.extra["repository"] = repository
    config.extra["edit_base"] = f"{repository}/edit/{BRANCH}/"
    if not config.site_url:
        config.site_url = github_pages_url(repository)
    return config


@event_priority(-200)  # after literate-nav (-100) has read the navigation file
def on_files(files, config):
    """literate-nav's ``SUMMARY.md`` is the navigation, not a page: do not build it."""
    nav_file = files.get_file_from_path(NAV_FILE)
    if nav_file is not None:
        files.remove(nav_file)
    return files
