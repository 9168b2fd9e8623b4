"""Pydantic models of one catalog entry; enums are built from the taxonomy.

``paper_model(taxonomy)`` returns the ``Paper`` class for a taxonomy, so adding a
term to ``catalog/taxonomy.yaml`` is a data change. Per-field rules live here;
rules that relate several fields or several entries live in ``tools.checks``.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    create_model,
)

from tools.taxonomy import Taxonomy
from tools.text import bad_character, plain_text_problem, url_problem

# [0-9], not \d: pydantic's regex engine counts every Unicode digit as \d ("２２１０...").
ARXIV_ID = r"^[0-9]{2}(0[1-9]|1[0-2])\.[0-9]{4,5}$"
OPENREVIEW_ID = r"^[A-Za-z0-9_-]{8,12}$"
YEAR_MONTH = r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])$"
SLUG = r"^[a-z][a-z0-9_]{0,63}$"

# A version suffix pins one version, for an id whose newest version is another paper.
_ARXIV_URL = re.compile(r"^https://arxiv\.org/(abs|pdf)/[0-9]{4}\.[0-9]{4,5}(v[1-9][0-9]*)?$")


def _plain_text(value: str) -> str:
    problem = plain_text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _verbatim(value: str) -> str:
    """Text quoted from elsewhere, line breaks included; no other control characters."""
    char = bad_character(value.replace("\n", " ").replace("\t", " "))
    if char:
        raise ValueError(f"contains the invisible or control character {char}")
    return value


def _url(value: str) -> str:
    problem = url_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _link(value: str) -> str:
    """A link we render: arXiv links must be the canonical abs/pdf form."""
    value = _url(value)
    if "arxiv.org" in value.split("/")[2] and not _ARXIV_URL.fullmatch(value):
        raise ValueError(
            f"malformed arXiv URL {value!r}: use https://arxiv.org/abs/<id> or "
            "https://arxiv.org/pdf/<id> (a version such as v1 only to pin one), "
            "without a .pdf suffix"
        )
    return value


def _folded(value: str) -> str:
    """YAML folded scalars (``>-``) may end with a newline; keep one clean line."""
    return " ".join(value.split())


PlainText = Annotated[str, StringConstraints(min_length=1), AfterValidator(_plain_text)]
Sentence = Annotated[
    str, StringConstraints(min_length=20), AfterValidator(_folded), AfterValidator(_plain_text)
]
Url = Annotated[str, AfterValidator(_url)]
Link = Annotated[str, AfterValidator(_link)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Links(_Strict):
    """Where to read and run the paper; ``None`` where there is none (or none known)."""

    abstract: Link
    pdf: Link | None = None
    code: Link | None = None
    # False when the official repository exists but holds no code yet ("coming soon"):
    # the link is still shown, but the paper does not count as having official code.
    code_released: bool = True
    project: Link | None = None


class Erratum(_Strict):
    """One place where the entry differs from the original list."""

    field: PlainText
    seed: Annotated[str, AfterValidator(_verbatim)] = Field(
        min_length=1, description="What the original list said, verbatim."
    )
    note: Sentence


class PaperBase(_Strict):
    """Fields whose type does not depend on the taxonomy."""

    id: Annotated[str, StringConstraints(pattern=SLUG)]
    name: PlainText
    title: PlainText
    authors: list[PlainText] | None = Field(min_length=1)
    arxiv: Annotated[str, StringConstraints(pattern=ARXIV_ID)] | None = None
    openreview: Annotated[str, StringConstraints(pattern=OPENREVIEW_ID)] | None = None
    released: Annotated[str, StringConstraints(pattern=YEAR_MONTH)]
    venue: PlainText
    links: Links
    summary: Sentence
    added: dt.date = Field(strict=False)
    reference: Annotated[str, StringConstraints(pattern=SLUG)] | None = None
    errata: list[Erratum] = []
    notes: list[Sentence] = []
    sources: list[Url] = []

    @property
    def year(self) -> int:
        return int(self.released[:4])

    @property
    def published(self) -> bool:
        """A peer-reviewed venue is confirmed (``venue`` is not the ``arXiv`` placeholder)."""
        return self.venue != "arXiv"

    @property
    def venue_label(self) -> str:
        """The venue as shown: ``ECCV 2024``; ``arXiv`` or ``OpenReview`` when unpublished."""
        if self.published:
            return self.venue
        return "arXiv" if self.arxiv else "OpenReview"

    @property
    def venue_series(self) -> str:
        """``ICLR`` for ``ICLR 2023``; ``arXiv`` (or ``OpenReview``) when unpublished."""
        return self.venue.rsplit(" ", 1)[0] if self.published else self.venue_label

    @property
    def has_code(self) -> bool:
        """Official code is linked and released (not an empty "coming soon" repository)."""
        return self.links.code is not None and self.links.code_released

    @property
    def display_title(self) -> str:
        """``Name: Title``, or the title alone when it already starts with the short name."""
        if self.title.casefold().startswith(self.name.casefold()):
            return self.title
        return f"{self.name}: {self.title}"


def _terms(taxonomy: Taxonomy, facet: str):
    return Literal[tuple(taxonomy.facet(facet))]  # type: ignore[misc]


@lru_cache(maxsize=8)
def paper_model(taxonomy: Taxonomy) -> type[PaperBase]:
    """The ``Paper`` model whose enum fields accept exactly the taxonomy's terms."""

    def unique_list(facet: str, unknown_allowed: bool = False):
        # ``[]``: no first-party source says (stage, mechanism); unknown stays unknown.
        least = 0 if unknown_allowed else 1
        return (Annotated[list[_terms(taxonomy, facet)], Field(min_length=least)], ...)

    return create_model(
        "Paper",
        __base__=PaperBase,
        __module__=__name__,
        modality=unique_list("modality"),
        target=(_terms(taxonomy, "target"), ...),
        stage=unique_list("stage", unknown_allowed=True),
        mechanism=unique_list("mechanism", unknown_allowed=True),
        training=(_terms(taxonomy, "training") | None, ...),
        orgs=(list[_terms(taxonomy, "orgs")], []),
    )


# Key order of an entry file: the order contributors write and `new` scaffolds.
FIELD_ORDER = [
    "id",
    "name",
    "title",
    "authors",
    "arxiv",
    "openreview",
    "released",
    "venue",
    "modality",
    "target",
    "stage",
    "mechanism",
    "training",
    "links",
    "orgs",
    "summary",
    "added",
    "reference",
    "errata",
    "notes",
    "sources",
]
