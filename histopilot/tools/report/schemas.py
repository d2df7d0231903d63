"""Synoptic report schemas: the required elements of a cancer resection or biopsy report.

Each site schema is a flat Pydantic model whose fields carry a value, and the evidence for it:
a character span in the source text (extraction) or region ids on the slide (drafting). A value
of ``None`` means "not stated". Fields follow the elements the CAP cancer protocols ask for and
the AJCC 8th edition categories; the names are shared across sites (``pT``, ``pN``,
``margin_status`` …) so that a cohort of mixed sites still makes one table.

The schemas are flat on purpose: a flat map from documented field name to value is what a
registry, a CSV and the evaluation compare, and one ``Reported`` type serves every field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

V = TypeVar("V")


# --- Value types -----------------------------------------------------------------------------

#: pT with its prefixes (c clinical, p pathologic, yp after therapy, rp recurrence) and the
#: suffix for multiple tumours, e.g. ``pT1c``, ``ypT2``, ``pT3a(m)``, ``pTis``, ``pT1mi``.
T_CATEGORY = (
    r"(?:c|p|yp|yc|rp|a)?T"
    r"(?:X|0|is(?:\((?:DCIS|Paget)\))?|1mi|[1-4](?:[a-e][1-3]?)?)(?:\((?:m|\d+)\))?"
)
N_CATEGORY = r"(?:c|p|yp|yc|rp)?N(?:X|0(?:\((?:i[+-]|mol[+-])\))?|1mi|[1-3][a-c]?)(?:\((?:sn|f)\))?"
M_CATEGORY = r"(?:c|p|yp)?M(?:X|0|1[a-d]?)(?:\([01]\))?"

TCategory = Annotated[str, StringConstraints(pattern=f"^{T_CATEGORY}$")]
NCategory = Annotated[str, StringConstraints(pattern=f"^{N_CATEGORY}$")]
MCategory = Annotated[str, StringConstraints(pattern=f"^{M_CATEGORY}$")]
ICDO3Morphology = Annotated[str, StringConstraints(pattern=r"^\d{4}/[0-3]$")]

Presence = Literal["present", "absent", "indeterminate"]
MarginStatus = Literal["negative", "positive", "close"]
ReceptorStatus = Literal["positive", "negative", "low positive"]
Her2Status = Literal["positive", "negative", "equivocal"]
Her2Score = Literal["0", "1+", "2+", "3+"]
StainIntensity = Literal["weak", "moderate", "strong"]
Laterality = Literal["left", "right", "bilateral"]
ResidualTumour = Literal["R0", "R1", "R2", "RX"]
Focality = Literal["unifocal", "multifocal"]
Percent = Annotated[float, Field(ge=0, le=100)]
Millimetres = Annotated[float, Field(ge=0, le=2000)]
Count = Annotated[int, Field(ge=0, le=500)]
PerSquareMillimetre = Annotated[float, Field(ge=0, le=1000)]

Span = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]


class Reported(BaseModel, Generic[V]):
    """One value with the evidence behind it. ``value=None`` means the source does not state it.

    ``span`` is ``[start, end)`` in characters of the source text; ``region_ids`` name the slide
    regions a drafted value rests on. A value without either is an unsupported claim, which the
    extractors and the report agent never produce.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: V | None = None
    span: Span | None = None
    region_ids: list[str] = Field(default_factory=list)
    basis: str | None = Field(
        None,
        description="How the value was reached when the source does not write it as such, "
        "e.g. 'AJCC 8th breast: tumour size 23 mm'; the span then points at that evidence",
    )

    @field_validator("span")
    @classmethod
    def _ordered(cls, span: Span | None) -> Span | None:
        if span is not None and span[0] >= span[1]:
            raise ValueError(f"a span must have start < end, got {list(span)}")
        return span

    @property
    def stated(self) -> bool:
        return self.value is not None


def _field(description: str) -> Any:
    return Field(default_factory=Reported, description=description)


# --- Elements shared by the sites ----------------------------------------------------------


class SynopticBase(BaseModel):
    """Elements every cancer schema asks for. Subclasses add the site's own."""

    # validate_default: an element left out is built as its own field's type, so a report
    # holding it serializes without warnings inside a union of schemas.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    procedure: Reported[str] = _field("Surgical procedure, e.g. 'lobectomy', 'core needle biopsy'")
    tumor_site: Reported[str] = _field("Anatomic site of the tumour as written")
    laterality: Reported[Laterality] = _field("Side of a paired organ")
    histologic_type: Reported[str] = _field("Histologic type in WHO terms, e.g. 'adenocarcinoma'")
    histologic_type_icdo3: Reported[ICDO3Morphology] = _field(
        "ICD-O-3 morphology code with behaviour, e.g. '8140/3'"
    )
    grade: Reported[str] = _field("Histologic grade in the site's system, e.g. 'G2'")
    tumor_size_mm: Reported[Millimetres] = _field("Greatest dimension of the tumour, in mm")
    tumor_focality: Reported[Focality] = _field("One tumour or several")
    # pT/pN/pM: the names AJCC and every registry use, so they keep their case.
    pT: Reported[TCategory] = _field("AJCC 8th T with prefix, e.g. 'pT2a'")  # noqa: N815
    pN: Reported[NCategory] = _field("AJCC 8th N with prefix, e.g. 'pN1a'")  # noqa: N815
    pM: Reported[MCategory] = _field("AJCC 8th M; pathologic M is only pM1")  # noqa: N815
    stage_group: Reported[str] = _field("AJCC prognostic stage group, e.g. 'IIA'")
    margin_status: Reported[MarginStatus] = _field(
        "Invasive tumour at a margin (positive), within the site's close distance, or clear"
    )
    margin_distance_mm: Reported[Millimetres] = _field("Distance to the closest margin, in mm")
    closest_margin: Reported[str] = _field("Which margin is closest or involved")
    residual_tumor: Reported[ResidualTumour] = _field("Residual tumour (R) classification")
    lymphovascular_invasion: Reported[Presence] = _field("Tumour in lymphatic or blood vessels")
    perineural_invasion: Reported[Presence] = _field("Tumour along or within nerves")
    lymph_nodes_examined: Reported[Count] = _field("Regional lymph nodes examined")
    lymph_nodes_positive: Reported[Count] = _field("Regional lymph nodes with metastasis")
    extranodal_extension: Reported[Presence] = _field("Nodal tumour beyond the node capsule")


class GenericSite(SynopticBase):
    """Any other site: the shared elements only."""

    schema_name: Literal["generic"] = "generic"


class BreastInvasive(SynopticBase):
    """Invasive carcinoma of the breast (excision, mastectomy or biopsy)."""

    schema_name: Literal["breast_invasive"] = "breast_invasive"
    grade: Reported[Literal["1", "2", "3"]] = _field("Nottingham histologic grade (1–3)")
    tubule_score: Reported[Literal[1, 2, 3]] = _field("Nottingham glandular (tubule) score")
    nuclear_score: Reported[Literal[1, 2, 3]] = _field("Nottingham nuclear pleomorphism score")
    mitotic_score: Reported[Literal[1, 2, 3]] = _field("Nottingham mitotic count score")
    dcis_present: Reported[Presence] = _field("Ductal carcinoma in situ alongside the invasion")
    er_status: Reported[ReceptorStatus] = _field("Oestrogen receptor (ASCO/CAP: ≥1 % positive)")
    er_percent: Reported[Percent] = _field("Share of tumour nuclei staining for ER")
    er_intensity: Reported[StainIntensity] = _field("Average ER staining intensity")
    pr_status: Reported[ReceptorStatus] = _field("Progesterone receptor status")
    pr_percent: Reported[Percent] = _field("Share of tumour nuclei staining for PR")
    pr_intensity: Reported[StainIntensity] = _field("Average PR staining intensity")
    her2_status: Reported[Her2Status] = _field("Overall HER2 status (IHC, with ISH when done)")
    her2_ihc_score: Reported[Her2Score] = _field("HER2 immunohistochemistry score")
    her2_ihc_status: Reported[Her2Status] = _field(
        "HER2 immunohistochemistry category: 0 and 1+ negative, 2+ equivocal, 3+ positive"
    )
    her2_ish_status: Reported[Literal["amplified", "not amplified", "equivocal"]] = _field(
        "HER2 in situ hybridisation result"
    )
    ki67_percent: Reported[Percent] = _field("Ki-67 proliferation index")


class BreastDCIS(SynopticBase):
    """Ductal carcinoma in situ of the breast, without invasion."""

    schema_name: Literal["breast_dcis"] = "breast_dcis"
    grade: Reported[Literal["low", "intermediate", "high"]] = _field("DCIS nuclear grade")
    necrosis: Reported[Literal["absent", "focal", "central (comedo)"]] = _field("Necrosis type")
    architectural_patterns: Reported[str] = _field("Cribriform, solid, micropapillary …")
    er_status: Reported[ReceptorStatus] = _field("Oestrogen receptor status")
    pr_status: Reported[ReceptorStatus] = _field("Progesterone receptor status")


class Colorectal(SynopticBase):
    """Carcinoma of the colon and rectum (resection)."""

    schema_name: Literal["colorectal"] = "colorectal"
    grade: Reported[Literal["low", "high", "G1", "G2", "G3", "G4"]] = _field(
        "Two-tier grade (low/high) or G1–G4"
    )
    tumor_extent: Reported[str] = _field("Deepest layer invaded, e.g. 'into pericolorectal tissue'")
    tumor_deposits: Reported[Count] = _field("Tumour deposits without lymph node structure")
    tumor_budding: Reported[Literal["low", "intermediate", "high"]] = _field("Budding score")
    mismatch_repair: Reported[Literal["proficient", "deficient"]] = _field("MMR protein status")
    treatment_effect: Reported[str] = _field("Response to neoadjuvant therapy, if given")


class ProstateBiopsy(SynopticBase):
    """Prostate needle biopsy."""

    schema_name: Literal["prostate_biopsy"] = "prostate_biopsy"
    gleason_primary: Reported[Literal[3, 4, 5]] = _field("Most extensive Gleason pattern")
    gleason_secondary: Reported[Literal[3, 4, 5]] = _field("Second Gleason pattern")
    gleason_tertiary: Reported[Literal[3, 4, 5]] = _field("Tertiary pattern, if higher")
    gleason_score: Reported[Annotated[int, Field(ge=2, le=10)]] = _field("Primary + secondary")
    grade_group: Reported[Literal[1, 2, 3, 4, 5]] = _field("ISUP/WHO grade group")
    cores_positive: Reported[Count] = _field("Cores with carcinoma")
    cores_examined: Reported[Count] = _field("Cores examined")
    percent_tissue_involved: Reported[Percent] = _field("Share of core tissue with carcinoma")


class ProstateResection(ProstateBiopsy):
    """Radical prostatectomy."""

    schema_name: Literal["prostate_resection"] = "prostate_resection"  # type: ignore[assignment]
    extraprostatic_extension: Reported[Presence] = _field("Tumour beyond the prostate")
    seminal_vesicle_invasion: Reported[Presence] = _field("Tumour in the seminal vesicle wall")
    bladder_neck_invasion: Reported[Presence] = _field("Microscopic bladder neck invasion")


class Lung(SynopticBase):
    """Carcinoma of the lung (resection)."""

    schema_name: Literal["lung"] = "lung"
    visceral_pleural_invasion: Reported[Presence] = _field("Invasion beyond the elastic layer")
    spread_through_air_spaces: Reported[Presence] = _field("STAS beyond the tumour edge")
    predominant_pattern: Reported[str] = _field("Adenocarcinoma predominant pattern")


class Kidney(SynopticBase):
    """Renal cell carcinoma (nephrectomy)."""

    schema_name: Literal["kidney"] = "kidney"
    grade: Reported[Literal["1", "2", "3", "4"]] = _field("WHO/ISUP nucleolar grade (or Fuhrman)")
    sarcomatoid_features: Reported[Presence] = _field("Sarcomatoid differentiation")
    rhabdoid_features: Reported[Presence] = _field("Rhabdoid differentiation")
    tumor_necrosis: Reported[Presence] = _field("Coagulative tumour necrosis")
    perinephric_fat_invasion: Reported[Presence] = _field("Invasion of perinephric fat")
    renal_vein_invasion: Reported[Presence] = _field("Tumour in the renal vein or its branches")


class Thyroid(SynopticBase):
    """Carcinoma of the thyroid (resection)."""

    schema_name: Literal["thyroid"] = "thyroid"
    extrathyroidal_extension: Reported[Literal["none", "microscopic", "gross"]] = _field(
        "Extension beyond the thyroid; only gross extension changes pT in AJCC 8th"
    )
    angioinvasion: Reported[Presence] = _field("Vascular invasion")
    histologic_variant: Reported[str] = _field("E.g. 'follicular variant', 'tall cell'")


class Melanoma(SynopticBase):
    """Cutaneous melanoma (excision)."""

    schema_name: Literal["melanoma"] = "melanoma"
    breslow_thickness_mm: Reported[Millimetres] = _field("Breslow thickness, in mm")
    clark_level: Reported[Literal["I", "II", "III", "IV", "V"]] = _field("Clark level")
    ulceration: Reported[Presence] = _field("Ulceration of the epidermis over the tumour")
    mitotic_rate_per_mm2: Reported[PerSquareMillimetre] = _field("Dermal mitoses/mm²")
    microsatellites: Reported[Presence] = _field("Microsatellite metastases")
    regression: Reported[Presence] = _field("Tumour regression")


SCHEMAS: dict[str, type[SynopticBase]] = {
    model.model_fields["schema_name"].default: model
    for model in (
        BreastInvasive,
        BreastDCIS,
        Colorectal,
        ProstateBiopsy,
        ProstateResection,
        Lung,
        Kidney,
        Thyroid,
        Melanoma,
        GenericSite,
    )
}
"""Every schema by name."""

#: Short names users type; ``breast`` means invasive carcinoma, ``prostate`` a resection.
SCHEMA_ALIASES = {
    "breast": "breast_invasive",
    "prostate": "prostate_resection",
    "colon": "colorectal",
}

FIELDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        name for model in SCHEMAS.values() for name in model.model_fields if name != "schema_name"
    )
)
"""Every field name any schema has, in a stable order (the columns of a CSV)."""


def schema_named(name: str) -> type[SynopticBase]:
    """The schema called ``name`` or one of its aliases."""
    from histopilot.errors import SchemaError

    key = SCHEMA_ALIASES.get(name, name)
    if key not in SCHEMAS:
        choices = ", ".join([*SCHEMAS, *SCHEMA_ALIASES])
        raise SchemaError(f"no report schema called {name!r}; choose one of {choices}")
    return SCHEMAS[key]


def category_group(category: str | None) -> str | None:
    """The coarse category: 'pT1c' → 'T1', 'ypN2a' → 'N2', 'pTis' → 'Tis'."""
    if not category:
        return None
    match = re.search(r"([TNM])(X|is|\d)", category)
    return f"{match.group(1)}{match.group(2)}" if match else None
