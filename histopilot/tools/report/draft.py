"""Drafting a synoptic report from a slide analysis: which schema, and which elements it supports.

One slide read by the agents supports few of the elements a synoptic report asks for. The
measured (offline) draft states only the histologic type, and only from a confident leading
diagnosis that names a neoplasm, with the regions behind it as evidence. Staging, margins and
lymph nodes need the gross specimen, the other blocks and the nodes, so a single slide's
heuristics never state them: they stay "not stated" for the pathologist to fill.

A reporter model may state more, but each value must cite the visited regions it rests on;
:func:`grounded_elements` leaves every other value not stated, as the report agent does with
ungrounded statements.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import TypeVar

from histopilot.tools.report.schemas import GenericSite, Reported, SynopticBase, schema_named

Elements = TypeVar("Elements", bound=SynopticBase)

#: Words in a diagnosis that name a site, most specific first, with the schema they call for.
SITE_TERMS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), schema)
    for pattern, schema in (
        (r"\bductal carcinoma in situ\b|\bDCIS\b", "breast_dcis"),
        (r"\bbreast\b|\bmammary\b", "breast"),
        (r"\bcolo(?:n|nic|rectal)\b|\brect(?:um|al)\b", "colorectal"),
        (r"\bprostat", "prostate"),
        (r"\blung\b|\bpulmonary\b", "lung"),
        (r"\brenal\b|\bkidney\b", "kidney"),
        (r"\bthyroid\b", "thyroid"),
        (r"\bmelanoma\b", "melanoma"),
    )
)
#: A diagnosis naming one of these is a tumour the synoptic protocols are written for; tissue
#: classes such as "normal colon mucosa" or "cancer-associated stroma" are not.
NEOPLASM = re.compile(r"carcinoma|melanoma|sarcoma|lymphoma|blastoma|neoplasm", re.IGNORECASE)


def schema_for(diagnosis: str | None) -> type[SynopticBase]:
    """The schema for a leading diagnosis: the site's when it names a neoplasm of a known
    site, :class:`GenericSite` otherwise (and when the analysis is indeterminate: ``None``)."""
    if diagnosis is None or not NEOPLASM.search(diagnosis):
        return GenericSite
    for pattern, name in SITE_TERMS:
        if pattern.search(diagnosis):
            return schema_named(name)
    return GenericSite


def measured_elements(diagnosis: str | None, support: Sequence[str]) -> SynopticBase:
    """The elements one slide's measured analysis supports.

    ``diagnosis`` is the leading class's name when the analysis is confident (``None`` when it
    is indeterminate); ``support`` the visited regions that voted for it. Only the histologic
    type is stated, and only for a neoplasm with at least one supporting region.
    """
    schema = schema_for(diagnosis)
    if diagnosis is None or not NEOPLASM.search(diagnosis) or not support:
        return schema()
    return schema(histologic_type=Reported(value=diagnosis, region_ids=sorted(set(support))))


def cited_regions(elements: SynopticBase) -> list[str]:
    """Every region id the stated elements cite, sorted."""
    return sorted(
        {
            region
            for name in type(elements).model_fields
            if isinstance(reported := getattr(elements, name), Reported)
            for region in reported.region_ids
        }
    )


def grounded_elements(elements: Elements, visited: Collection[str]) -> tuple[Elements, list[str]]:
    """``elements`` with every value that cites no region, or a region not visited, left not
    stated; and the names of the elements so dropped.

    Drafted values rest on regions, not on text: any span a model adds is removed.
    """
    visited = set(visited)
    update: dict[str, Reported] = {}
    dropped = []
    for name in type(elements).model_fields:
        reported = getattr(elements, name)
        if not isinstance(reported, Reported) or not reported.stated:
            continue
        if reported.region_ids and set(reported.region_ids) <= visited:
            update[name] = reported.model_copy(
                update={"span": None, "region_ids": sorted(set(reported.region_ids))}
            )
        else:
            update[name] = Reported()
            dropped.append(name)
    values = elements.model_dump()
    values.update({name: reported.model_dump() for name, reported in update.items()})
    return type(elements).model_validate(values), dropped
