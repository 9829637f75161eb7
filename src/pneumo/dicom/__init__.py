"""pneumo in the hospital's DICOM flow: a Storage SCP that answers with structured reports, and a DICOMweb worker."""

from pneumo.dicom.analysis import Analyser, Outcome
from pneumo.dicom.audit import AuditLog
from pneumo.dicom.intended_use import IntendedUse

__all__ = ["Analyser", "AuditLog", "IntendedUse", "Outcome"]
