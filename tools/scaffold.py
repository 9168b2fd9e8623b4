"""``python -m tools new --arxiv ID``: write a new entry for a contributor to finish.

Title, authors and release month come from the arXiv API through the ``arxiv``
client library when the network answers; otherwise the template marks them as
unknown. Every field that needs a person's judgement is marked ``TODO``, so the
entry fails validation until it has been filled in.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import requests

ARXIV_INPUT = re.compile(
    r"^(?:https?://arxiv\.org/(?:abs|pdf)/)?(?P<id>[0-9]{4}\.[0-9]{4,5})(?:v[0-9]+)?(?:\.pdf)?$"
)
TIMEOUT_S = 15


class ScaffoldError(ValueError):
    pass


@dataclass(frozen=True)
class ArxivMetadata:
    title: str
    authors: list[str]
    released: str  # YYYY-MM of version 1
    comment: str | None


def parse_arxiv_id(text: str) -> str:
    """Accept ``2210.09461``, ``2210.09461v3`` or an abs/pdf URL; return the bare id."""
    match = ARXIV_INPUT.match(text.strip())
    if not match:
        raise ScaffoldError(f"{text!r} is not a new-style arXiv id such as 2210.09461")
    return match.group("id")


class _TimeoutSession(requests.Session):
    """A session that never waits forever: the arxiv client sets no timeout."""

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(*args, **kwargs)


def fetch_arxiv(arxiv_id: str, session: requests.Session | None = None) -> ArxivMetadata | None:
    """Metadata from the arXiv API, or None when it cannot be reached or has no such paper."""
    import arxiv

    client = arxiv.Client(num_retries=1, delay_seconds=0)
    client._session = session or _TimeoutSession()  # the library exposes no hook for this
    try:
        result = next(client.results(arxiv.Search(id_list=[arxiv_id])), None)
    except (requests.RequestException, arxiv.ArxivError, OSError):
        return None
    if result is None:
        return None
    return ArxivMetadata(
        title=" ".join(result.title.split()),
        authors=[author.name for author in result.authors],
        released=result.published.strftime("%Y-%m"),
        comment=" ".join(result.comment.split()) if result.comment else None,
    )


def slug_for(title: str | None, arxiv_id: str) -> str:
    """``ToMe: ...`` -> ``tome``; without a short name, ``arxiv_2210_09461``."""
    if title and ":" in title:
        head = re.sub(r"[^a-z0-9]+", "_", title.split(":", 1)[0].lower()).strip("_")
        if head and head[0].isalpha() and len(head) <= 24:
            return head
    return "arxiv_" + arxiv_id.replace(".", "_")


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_template(
    paper_id: str, arxiv_id: str, meta: ArxivMetadata | None, today: dt.date
) -> str:
    unknown = "null  # TODO unknown: the arXiv API could not be reached"
    if meta:
        authors = "\n".join(f"  - {_q(a)}" for a in meta.authors)
        title, released = _q(meta.title), _q(meta.released)
        name = _q(meta.title.split(":", 1)[0]) if ":" in meta.title else "null  # TODO short name"
    else:
        authors, title, name = None, unknown, "null  # TODO short name"
        released = _q(f"20{arxiv_id[:2]}-{arxiv_id[2:4]}") + "  # from the arXiv id; check"
    comment = f"\n# arXiv comment: {meta.comment}" if meta and meta.comment else ""
    return f"""# yaml-language-server: $schema=../paper.schema.json{comment}
id: {paper_id}
name: {name}
title: {title}
authors:{chr(10) + authors if authors else " " + unknown}
arxiv: {_q(arxiv_id)}
openreview: null
released: {released}
venue: arXiv  # TODO "<SERIES> <YEAR>" once a source confirms acceptance
modality: []  # TODO image / video / document
target: null  # TODO ViT or VLM
stage: []  # TODO vision-encoder / projector / llm
mechanism: []  # TODO terms from catalog/taxonomy.yaml, main one first
training: null  # TODO training-free / fine-tuned / from-scratch
links:
  abstract: https://arxiv.org/abs/{arxiv_id}
  pdf: https://arxiv.org/pdf/{arxiv_id}
  code: null  # TODO official repository, if any
  project: null
orgs: []
summary: null  # TODO one sentence in your own words
added: {today.isoformat()}
reference: null
errata: []
sources:
  - https://arxiv.org/abs/{arxiv_id}
"""
