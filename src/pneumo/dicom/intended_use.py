"""The intended-use gate: which instances the model may be asked about at all, read from the header.

The model was trained on frontal chest radiographs of children aged 1 to 5. An adult's film, a
hand, a lateral view or a CT slice would still get a confident number from it, so before
anything is decoded the header is checked against :class:`IntendedUse`, and what falls outside
gets a report saying "not analysed: outside intended use" and why, never a finding. Absent
attributes pass (many modalities leave BodyPartExamined or ViewPosition empty); values that are
present and say otherwise are refused. The limits are configurable (``pneumo dicom listen
--max-age-years``, ``--body-part``) because a site may validate the model further.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

from pneumo.core.errors import PneumoError

#: DICOM modalities of a plain radiograph ("DR" is no DICOM term, but vendors write it).
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
#: BodyPartExamined values meaning the chest (the DICOM term is CHEST; vendors write the others).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_PA", "CHEST_AP", "TORAX", "THORAX_PA")
#: ViewPosition values meaning a frontal film: DICOM AP and PA, and vendors' spellings of them.
FRONTAL_VIEW = re.compile(r"^(AP|PA)(\b|_|$)")
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 30.4375, "Y": 365.25}


class OutsideIntendedUse(PneumoError):
    """The header says the instance is not what the model is for; the report says so instead of a finding."""

    code = "outside_intended_use"
    http_status = 422


@dataclass(frozen=True)
class IntendedUse:
    """What the gate lets through.

    Attributes:
        modalities: DICOM Modality values accepted.
        body_parts: BodyPartExamined values accepted (absent passes).
        max_age_years: oldest patient, in years, the model may be asked about (absent age passes).
            The model is for children aged 1 to 5; the default 17 keeps every child and refuses adults.
        frontal_only: refuse a ViewPosition that is present and not AP/PA.
    """

    modalities: tuple[str, ...] = RADIOGRAPH_MODALITIES
    body_parts: tuple[str, ...] = CHEST_BODY_PARTS
    max_age_years: float = 17.0
    frontal_only: bool = True

    def check(self, header: Dataset) -> None:
        """Raise :class:`OutsideIntendedUse` (its ``code`` names the rule) when the header is outside the use.

        Raises:
            OutsideIntendedUse: ``unsupported_modality``, ``body_part_not_chest``, ``lateral_view`` /
                ``view_not_frontal``, or ``patient_too_old``.
        """
        modality = _upper(header, "Modality")
        if modality and modality not in self.modalities:
            raise OutsideIntendedUse(
                f"The modality is {modality}; the model reads plain radiographs ({', '.join(self.modalities)}) only.",
                code="unsupported_modality",
            )
        body_part = _upper(header, "BodyPartExamined")
        if body_part and body_part not in self.body_parts:
            raise OutsideIntendedUse(
                f"The body part examined is {body_part}; the model reads chest films only.",
                code="body_part_not_chest",
            )
        view = _upper(header, "ViewPosition")
        if self.frontal_only and view and not FRONTAL_VIEW.match(view):
            lateral = view in ("LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL")
            raise OutsideIntendedUse(
                f"The view position is {view}; the model reads frontal (AP or PA) chest films only. "
                "Send the frontal film of the study.",
                code="lateral_view" if lateral else "view_not_frontal",
            )
        age = patient_age_years(header)
        if age is not None and age > self.max_age_years:
            raise OutsideIntendedUse(
                f"The patient is {age:.0f} years old; the model is for children (at most "
                f"{self.max_age_years:g} years here; it was trained on ages 1 to 5).",
                code="patient_too_old",
            )


def _upper(header: Dataset, keyword: str) -> str:
    return str(header.get(keyword, "") or "").strip().upper()


def patient_age_years(header: Dataset) -> float | None:
    """The patient's age in years: PatientAge (``045Y``, ``018M``), else StudyDate minus PatientBirthDate."""
    match = _AGE.match(str(header.get("PatientAge", "") or "").strip().upper())
    if match:
        return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25
    birth, study = _date(header, "PatientBirthDate"), _date(header, "StudyDate")
    if birth and study and study >= birth:
        return (study - birth).days / 365.25
    return None


def _date(header: Dataset, keyword: str) -> date | None:
    text = str(header.get(keyword, "") or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if re.fullmatch(r"\d{8}", text) else None
    except ValueError:
        return None
